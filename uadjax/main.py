"""Command line: `python -m uadjax.main <mode> --config=configs/<method>.py:<variant> ...`.

Modes:
  phantom   generate the built-in phantom dataset (NIfTI + manifest), cached
  prepare   NIfTI dataset folder -> preprocessed ArrayRecord slice shards, cached
  train     train every stage of the configured method (resumes automatically)
  evaluate  score the evaluation splits, select thresholds, compute metrics, write the report
  predict   NIfTI scan(s) -> anomaly map and segmentation NIfTI in the input's space
  run       phantom -> prepare -> train -> evaluate (the main job)

Config overrides: `--config.train.num_steps=100`; unknown keys are errors.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from uadjax import xla_flags
from uadjax.data.schema import DataError

MODES = ("phantom", "prepare", "train", "evaluate", "predict", "run")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Method config: configs/<method>.py:<variant>.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, report).")
_STAGE = flags.DEFINE_list("stage", None, "train: only these stages (default: all).")
_INPUT = flags.DEFINE_string("input", None, "predict: a NIfTI file or a folder of them.")
_OUTPUT = flags.DEFINE_string("output", None, "predict: output folder.")
_BRAIN_MASK = flags.DEFINE_string("brain_mask", None, "predict: optional brain mask NIfTI.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "predict/phantom: replace existing outputs.")


class _UsageError(Exception):
    """A wrong command line: one line on stderr, exit status 2 (no full help page)."""


def _require(flag, mode):
    if flag.value is None:
        raise _UsageError(f"mode {mode!r} needs --{flag.name}")
    return flag.value


class _QuietLibraries(logging.Filter):
    """Drops routine INFO chatter (orbax saves) and TFDS's per-open config warning."""

    def filter(self, record):
        return "Using custom data configuration" not in record.getMessage()


def _configure_logging():
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("absl").addFilter(_QuietLibraries())
    absl_logging.get_absl_handler().addFilter(_QuietLibraries())


def main(argv):
    _configure_logging()
    if len(argv) != 2 or argv[1] not in MODES:
        given = " ".join(argv[1:]) or "none"
        print(f"error: mode {given!r}: usage: python -m uadjax.main <mode> [flags]; modes: "
              f"{', '.join(MODES)} (--helpshort lists the flags)", file=sys.stderr)
        sys.exit(2)
    mode = argv[1]
    from uadjax import parallel  # imported after flag parsing, before JAX picks devices

    parallel.initialize_distributed()
    from uadjax.checkpointing import CheckpointError
    from uadjax.trainer import NonFiniteLossError

    try:
        _dispatch(mode)
    except _UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (DataError, CheckpointError, NonFiniteLossError, ValueError, OSError) as err:
        # User errors: bad data, checkpoints of another run, unusable config values, missing
        # inputs, full or unwritable output folders. The message names the input and the
        # problem; a traceback would hide it (UADJAX_DEBUG=1 shows one).
        if os.environ.get("UADJAX_DEBUG"):
            raise
        message = _os_error_message(err) if isinstance(err, OSError) else str(err)
        hint = "" if isinstance(err, DataError) else " (UADJAX_DEBUG=1 shows the traceback)"
        print(f"error: {message}{hint}", file=sys.stderr)
        sys.exit(2)


def _os_error_message(err: OSError) -> str:
    if err.filename and err.strerror and str(err.filename) not in err.strerror:
        return f"{err.filename}: {err.strerror}"
    return err.strerror or str(err)


def _dispatch(mode: str) -> None:
    from uadjax import api  # the same functions a notebook calls

    if mode == "predict":  # the run directory holds its own config
        report = api.predict(_require(_WORKDIR, mode), _require(_INPUT, mode),
                             _require(_OUTPUT, mode), brain_mask=_BRAIN_MASK.value,
                             overwrite=_OVERWRITE.value)
        print(report.summary())
        sys.exit(0 if report.ok else 1)
    config = _require(_CONFIG, mode)
    if mode == "phantom":
        api.phantom(config, overwrite=_OVERWRITE.value)
    elif mode == "prepare":
        api.prepare(config)
    elif mode == "train":
        api.train(config, _require(_WORKDIR, mode), stages=_STAGE.value)
    elif mode == "evaluate":
        api.evaluate(config, _require(_WORKDIR, mode))
    elif mode == "run":
        api.run_all(config, _require(_WORKDIR, mode))


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a one-line error (no traceback; UADJAX_DEBUG=1 shows it) for
    a config file that fails to load, a bad flag value or an override of a missing key."""
    debug = bool(os.environ.get("UADJAX_DEBUG"))
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:  # a bad flag value, or a config file that fails to load
        if debug:
            raise
        # config_flags puts the config file's traceback in the message: keep its first line
        # (the flag) and its last (the exception).
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        print("error: " + " ".join(dict.fromkeys([lines[0], lines[-1]])), file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        if debug:
            raise
        overrides = [a for a in argv if a.startswith("--config.")]
        key = str(err).strip("\"'")
        culprit = next((a for a in overrides if key and key in a.split("=")[0]), None)
        if culprit:
            print(f"error: {culprit.split('=')[0]}: the config has no key {key!r}",
                  file=sys.stderr)
        else:
            config_arg = next((a for a in argv if a.startswith("--config=")), "--config")
            print(f"error: {config_arg}: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(2)


def run():
    """Console-script entry point (`uadjax <mode> ...`)."""
    xla_flags.set_cpu_flags()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
