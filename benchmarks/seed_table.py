"""Multi-seed results table: train and evaluate methods over seeds, print mean ± std.

    python -m benchmarks.seed_table [--rows=DDPM,pDDPM] [--seeds=0,1,2] [--root=runs/table]
    python -m benchmarks.seed_table --aggregate_only      # rebuild the table from results

Each row is a training config (configs/<file>.py:<arg>) plus, optionally, test-time modifiers
(e.g. `ens`) evaluated on the same trained run into `eval_<modifiers>/`. Runs live in
`<root>/<config>/seed<k>/` and are reused (a finished run is not trained again, a killed one
resumes), so the command can be rerun until the table is complete. Every run uses the same
phantom (its own seed fixed); only the training seed changes.

Writes `<root>/table.md` and `<root>/table.json`: per lesion kind Dice at the validation-
selected threshold and AUPRC (per-volume means, then mean ± std over seeds, in percent), and
the wall time of scoring per volume (compilation and data loading included).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import time

import numpy as np
from absl import app, flags

from uadjax import atomic

_ROWS = flags.DEFINE_list("rows", None, "Row labels to run (default: all).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds.")
_ROOT = flags.DEFINE_string("root", "runs/table", "Where runs and the table go.")
_AGGREGATE_ONLY = flags.DEFINE_bool("aggregate_only", False, "Only rebuild the table.")
_REVERSE = flags.DEFINE_bool("reverse", False, "Take the runs in reverse order (for a second "
                             "process sharing the work).")

KINDS = ("tumour", "stroke", "ms")


@dataclasses.dataclass(frozen=True)
class Row:
    label: str
    config: str          # 'ddpm:cpu,short' = configs/ddpm.py with arg 'cpu,short'
    test_modifiers: str = ""  # extra config modifiers applied only at evaluation ('ens')
    source: str = ""     # results entry to read ('' = the method; 'threshold' = the baseline)

    def config_name(self) -> str:
        return self.config.replace(":", "-").replace(",", "_")

    def eval_dir_name(self) -> str:
        return "eval" if not self.test_modifiers else "eval_" + self.test_modifiers.replace(",", "_")


# In run order within a seed. pDDPM-ENS is left out of the default table: 3 t x 4 patches =
# 12 network calls per slice (about 11 minutes of scoring per seed on 2 CPU cores); the
# config supports it (`pddpm:cpu,short` + `ens`).
ROWS = (
    Row("DDPM", "ddpm:cpu,short"),
    Row("pDDPM", "pddpm:cpu,short"),
    Row("cDDPM w/o pre-training", "cddpm:cpu,short,nopretrain"),
    Row("cDDPM-ENS w/o pre-training", "cddpm:cpu,short,nopretrain", "ens"),
    Row("cDDPM", "cddpm:cpu,short"),
    Row("cDDPM-ENS", "cddpm:cpu,short", "ens"),
    Row("AE", "ae:cpu,short"),
    Row("VAE", "vae:cpu,short"),
    Row("DAE", "dae:cpu,short"),
    # Evaluated beside every method; read from the DDPM runs (deterministic: std 0).
    Row("intensity threshold", "ddpm:cpu,short", source="threshold"),
)
# Run on request (--rows=...): DDPM-ENS (not part of the first table, 3 calls per slice) and
# the second group of methods (issues 5-8; the README reports them for seed 0 so far).
EXTRA_ROWS = (
    Row("DDPM-ENS", "ddpm:cpu,short", "ens"),
    Row("DISYRE", "disyre:cpu,short"),
    Row("DISYRE multi-step", "disyre:cpu,short", "multistep"),
    Row("MAEDiff", "maediff:cpu,short"),
    Row("MAEDiff (s = p grid)", "maediff:cpu,short", "grid"),
    Row("LDM (Pinaya)", "ldm:cpu,short"),
    Row("MMCCD (FLAIR→T2)", "mmccd:cpu,short"),
    Row("Cyclic UNet (FLAIR→T2)", "mmccd:cpu,short,cyclic"),
    Row("MMCCD (T1→T2)", "mmccd:cpu,short,t1-t2"),
    Row("Cyclic UNet (T1→T2)", "mmccd:cpu,short,cyclic,t1-t2"),
)


def load_config(spec: str, extra: str = ""):
    name, _, arg = spec.partition(":")
    arg = ",".join(a for a in (arg, extra) if a)
    return importlib.import_module(f"configs.{name}").get_config(arg)


class Busy(Exception):
    """Another seed_table process is working on this run."""


@contextlib.contextmanager
def run_lock(workdir: str):
    """Exclusive use of a run folder among concurrent seed_table processes (a lock file
    holding the owner's pid; a lock left by a dead process is taken over)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, ".seed_table.lock")
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                with open(path) as f:
                    os.kill(int(f.read().strip() or 0), 0)
                raise Busy(workdir) from None
            except PermissionError:  # the pid is alive (another user's process)
                raise Busy(workdir) from None
            except (ProcessLookupError, ValueError, FileNotFoundError):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)  # stale: its owner is gone
    else:
        raise Busy(workdir)
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        os.remove(path)


def run_row(row: Row, seed: int, root: str) -> str:
    """Trains (or resumes) the row's config with `seed` and evaluates it; returns results path.

    Raises Busy when another process holds the run.
    """
    workdir = os.path.join(root, row.config_name(), f"seed{seed}")
    results = os.path.join(workdir, row.eval_dir_name(), "results.json")
    if os.path.exists(results):
        return results
    with run_lock(workdir):
        return _train_and_evaluate(row, seed, workdir)


def _train_and_evaluate(row: Row, seed: int, workdir: str) -> str:
    from uadjax import jobs

    out_dir = os.path.join(workdir, row.eval_dir_name())
    results = os.path.join(out_dir, "results.json")
    if os.path.exists(results):
        return results
    config = load_config(row.config, row.test_modifiers)
    config.seed = seed
    config.eval.seed = seed
    # The table reads Dice and AUPRC at the validation threshold: the lesion splits suffice.
    config.eval.splits = ("val_lesion", "test_lesion")
    if not jobs.train(config, workdir, progress=False):
        raise RuntimeError(f"training of {workdir} stopped early; rerun to resume")
    jobs.evaluate(config, workdir, out_dir=out_dir, progress=False)
    return results


def summarise(values: list[float], num_runs: int) -> str:
    """Mean ± sample std in percent (the value alone for one run); '(n=k)' when only k of
    the row's runs have the value."""
    if not values:
        return "-"
    arr = 100.0 * np.asarray(values)
    text = f"{arr.mean():.1f} ± {arr.std(ddof=1):.1f}" if len(arr) > 1 else f"{arr[0]:.1f}"
    return text if len(arr) == num_runs else f"{text} (n={len(arr)})"


def aggregate(rows, seeds, root: str) -> tuple[str, dict]:
    """-> (markdown table, {label: {kind: {'dice': [...], 'auprc': [...]}, 'seconds_per_volume'}})."""
    data = {}
    for row in rows:
        entry = {kind: {"dice": [], "auprc": []} for kind in KINDS}
        entry["seconds_per_volume"], entry["seeds"] = [], []
        for seed in seeds:
            path = os.path.join(root, row.config_name(), f"seed{seed}", row.eval_dir_name(),
                                "results.json")
            if not os.path.exists(path):
                continue
            with open(path) as f:
                res = json.load(f)
            kinds = res["results"][row.source or res["method"]]["kinds"]
            for kind in KINDS:
                per_volume = kinds.get(kind, {}).get("val", {}).get("per_volume", {})
                if per_volume:
                    entry[kind]["dice"].append(per_volume["dice"]["mean"])
                    entry[kind]["auprc"].append(per_volume["ap"]["mean"])
            timing = res["timing"]
            if not row.source:  # a baseline read from another run has no timing of its own
                entry["seconds_per_volume"].append(
                    timing.get("seconds_per_volume",
                               timing["score_seconds"] / max(timing.get("volumes_scored", 1), 1)))
            entry["seeds"].append(seed)
        data[row.label] = entry
    header = ["method", "seeds"] + [f"{k} {m}" for k in KINDS for m in ("Dice", "AUPRC")]
    header.append("s / volume")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, entry in data.items():
        cells = [label, str(len(entry["seeds"]))]
        for kind in KINDS:
            n = len(entry["seeds"])
            cells += [summarise(entry[kind]["dice"], n), summarise(entry[kind]["auprc"], n)]
        spv = entry["seconds_per_volume"]
        cells.append(f"{np.mean(spv):.2f}" if spv else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), data


def main(argv):
    del argv
    known = ROWS + EXTRA_ROWS
    rows = [r for r in known if r.label in _ROWS.value] if _ROWS.value else list(ROWS)
    rows = [r for r in rows if not r.source]  # read-only rows: nothing to run
    unknown = set(_ROWS.value or ()) - {r.label for r in known}
    if unknown:
        raise app.UsageError(f"unknown rows {sorted(unknown)}; rows: {[r.label for r in known]}")
    seeds = [int(s) for s in _SEEDS.value]
    root = _ROOT.value
    failures = []
    if not _AGGREGATE_ONLY.value:
        # Seed-major, so a partial table already has every row once. Several processes may
        # share the work: a run another process holds is skipped and revisited later.
        pending = [(seed, row) for seed in seeds for row in rows]
        if _REVERSE.value:
            pending.reverse()
        while pending:
            busy = []
            for seed, row in pending:
                try:
                    print(f"== {row.label} seed {seed}: {run_row(row, seed, root)}", flush=True)
                except Busy:
                    busy.append((seed, row))
                except Exception as e:  # noqa: BLE001 - report and go on with the other rows
                    failures.append(f"{row.label} seed {seed}: {type(e).__name__}: {e}")
                    print("FAILED", failures[-1], flush=True)
            if busy and len(busy) == len(pending):
                time.sleep(30)
            pending = busy
    table, data = aggregate(ROWS + EXTRA_ROWS, seeds, root)
    atomic.write_text(os.path.join(root, "table.md"), table + "\n")
    atomic.write_json(os.path.join(root, "table.json"), data)
    print(table)
    for failure in failures:
        print("FAILED", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    app.run(main)
