"""Run folders: where a trained run's stages live, and loading them back checked.

Layout (see `uadjax.trainer`): <workdir>/config.json, <workdir>/<stage>/checkpoints/<step>/
(with `train.select_checkpoint = 'best_val'` also <workdir>/<stage>/best_checkpoint/<step>/,
the step of lowest healthy-validation loss), and after evaluation <workdir>/eval/
(results.json, calibration.json, ...). A stage may live in another run folder
(`config.stage_workdirs.<stage>`) and is then loaded, never trained. Evaluation, prediction
and the benchmark load networks only through this module.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import ml_collections
from flax import nnx

from uadjax import checkpointing
from uadjax.methods import get_method
from uadjax.methods.base import Stage
from uadjax.train_state import init_state, merge, stage_config, stage_optimizer

CONFIG_FILE = "config.json"
BEST_DIR = "best_checkpoint"
SELECTIONS = ("latest", "best_val")


def checkpoint_selection(train_config) -> str:
    """`train.select_checkpoint`: 'latest' (the last step) or 'best_val' (the step of lowest
    healthy-validation loss, Behrendt's `ckpt_path: best`)."""
    selection = train_config.get("select_checkpoint", "latest")
    if selection not in SELECTIONS:
        raise ValueError(f"train.select_checkpoint must be one of {SELECTIONS}, "
                         f"got {selection!r}")
    return selection


def stage_dir(workdir: str, stage_name: str) -> str:
    return os.path.join(workdir, stage_name)


def stage_workdir(config, workdir: str, stage_name: str) -> str:
    """The run folder holding a stage: `config.stage_workdirs.<stage>` when set (a stage
    trained once in another run and reused, e.g. one encoder pre-training for several
    seeds), else `workdir`. Such external stages are loaded, never trained here."""
    return config.get("stage_workdirs", {}).get(stage_name) or workdir


def saved_config(ckpt) -> dict | None:
    """The config saved with the latest checkpoint (None for checkpoints saved without one,
    or when it cannot be read: restoring the state then reports the problem)."""
    try:
        return ckpt.restore_config()
    except Exception:  # noqa: BLE001 - an unreadable config is judged by the state restore
        return None


def check_same_method(saved: dict | None, config, directory: str) -> None:
    """Raises CheckpointError when the checkpoint in `directory` belongs to another method."""
    if saved and saved.get("method") != config.method:
        raise checkpointing.CheckpointError(
            f"{directory}: the checkpoint was trained by method {saved.get('method')!r}, "
            f"this config is {config.method!r}. Use another --workdir, or the config that "
            "trained it.")


def restore_checked(ckpt, abstract_state, saved: dict | None, config, *,
                    stage: Stage | None = None, **kwargs):
    """`ckpt.restore`, with a CheckpointError that names the config fields that differ from
    the ones the checkpoint was trained with when no step can be restored (or, for a
    statistics stage saved as a training stage by an older uadjax, says how to redo it)."""
    try:
        return ckpt.restore(abstract_state, **kwargs)
    except checkpointing.CheckpointError as err:
        differences = config_differences(saved, config)
        if differences:
            raise checkpointing.CheckpointError(
                f"{ckpt.directory}: the checkpoint does not fit this config, which differs "
                f"from the one that trained it in {', '.join(differences)}. Use another "
                "--workdir, or the config that trained it.") from err
        if (stage is not None and stage.is_statistics and saved
                and stage.name in (saved.get("stage_train") or {})):
            raise checkpointing.CheckpointError(
                f"{ckpt.directory}: saved by an older uadjax, which ran the {stage.name!r} "
                "statistics pass as a training stage (with an optimiser state). Move "
                f"{os.path.dirname(ckpt.directory.rstrip('/'))} away and run `train "
                f"--stage={stage.name}` to redo the pass (the networks before it are "
                "kept).") from err
        raise


def config_differences(saved: dict | None, config) -> list[str]:
    """The network and input fields (model*, data.modalities, data.image_size) in which
    `config` differs from a checkpoint's saved config."""
    if not saved:
        return []
    current = json.loads(config.to_json_best_effort())
    out = []
    for key in sorted(k for k in set(saved) | set(current) if k.startswith("model")):
        a, b = saved.get(key) or {}, current.get(key) or {}
        out += [f"{key}.{f}" for f in sorted(set(a) | set(b))
                if _as_list(a.get(f)) != _as_list(b.get(f))]
    for f in ("modalities", "image_size"):
        if _as_list(saved.get("data", {}).get(f)) != _as_list(current["data"].get(f)):
            out.append(f"data.{f}")
    return out


def _as_list(value):
    return list(value) if isinstance(value, list | tuple) else value


def is_external(config, workdir: str, stage_name: str) -> bool:
    source = stage_workdir(config, workdir, stage_name)
    return os.path.realpath(source) != os.path.realpath(workdir)


def load_stage_models(config, workdir: str, stage: Stage, *, use_ema: bool = True,
                      require_finished: bool = False) -> nnx.Module:
    """Rebuilds a trained stage's networks from its latest readable checkpoint (EMA params
    by default); `load_stage_checkpoint` also says which step that was."""
    return load_stage_checkpoint(config, workdir, stage, use_ema=use_ema,
                                 require_finished=require_finished)[0]


def load_stage_checkpoint(config, workdir: str, stage: Stage, *, use_ema: bool = True,
                          require_finished: bool = False) -> tuple[nnx.Module, dict]:
    """Rebuilds a trained stage's networks from its selected checkpoint: the latest readable
    step, or with `train.select_checkpoint = 'best_val'` the best-validation copy (the
    latest when the run kept none, e.g. it had no validation data: a warning says so).

    Returns:
      (networks, {"directory", "step": the step restored, "latest_step": the newest step
      folder of that directory, "fell_back": step != latest_step (newer checkpoints were
      unreadable; a warning names them, and results computed from the networks should say
      so), "selection": 'latest' | 'best_val', "val_loss": the validation loss of a
      best-validation step (else None), "trained_steps": the optimiser steps in the
      restored state, "num_steps": the steps the stage was configured to train,
      "finished_steps": the newest step of the stage's training checkpoints}).

    The optimiser state is restored with the structure of the optimiser the checkpoint was
    trained with (its saved config), so a stage trained elsewhere under another recipe loads.

    Raises:
      FileNotFoundError: the stage has no checkpoint.
      RuntimeError: `require_finished` and the training is short of the stage's steps.
    """
    config = stage_config(config, stage.name)
    latest_dir = os.path.join(stage_dir(workdir, stage.name), "checkpoints")
    if not checkpointing.has_checkpoint(latest_dir):  # before orbax creates the folder
        raise FileNotFoundError(
            f"stage {stage.name!r} has no checkpoint in {latest_dir}; train it first "
            f"(`train --stage={stage.name}`, or `train` without --stage for all stages)")
    directory, selection = latest_dir, checkpoint_selection(config.train)
    if selection == "best_val":
        best_dir = os.path.join(stage_dir(workdir, stage.name), BEST_DIR)
        if checkpointing.has_checkpoint(best_dir):
            directory = best_dir
        elif not stage.is_statistics:
            warnings.warn(f"{stage_dir(workdir, stage.name)}: select_checkpoint='best_val' "
                          "but the run kept no best-validation checkpoint (no validation "
                          "data?); using the latest step", stacklevel=2)
            selection = "latest"
        else:
            selection = "latest"  # a statistics pass has no validation loss
    ckpt = checkpointing.Checkpointer(directory, asynchronous=False, read_only=True)
    try:
        saved = saved_config(ckpt)
        check_same_method(saved, config, directory)
        saved_train = saved.get("train") if saved else None
        train_cfg = ml_collections.ConfigDict(saved_train) if saved_train else config.train
        graphdef, state = init_state(stage, config, stage_optimizer(stage, train_cfg),
                                      seed=config.seed)
        restored = restore_checked(ckpt, checkpointing.abstract_like(state), saved, config,
                                   stage=stage)
        record = ckpt.restore_selection(ckpt.restored_step) if selection == "best_val" else None
        provenance = {"directory": directory, "step": ckpt.restored_step,
                      "latest_step": ckpt.latest_step(),
                      "fell_back": ckpt.restored_step != ckpt.latest_step(),
                      "selection": selection,
                      "val_loss": float(record["value"]) if record else None,
                      "trained_steps": int(restored["step"]),
                      "num_steps": int(train_cfg.num_steps)}
    finally:
        ckpt.close()
    provenance["finished_steps"] = (provenance["trained_steps"] if directory == latest_dir
                                    else _latest_step_folder(latest_dir))
    if require_finished and provenance["finished_steps"] < provenance["num_steps"]:
        raise RuntimeError(
            f"stage {stage.name!r} in {latest_dir} stopped at step "
            f"{provenance['finished_steps']} of {provenance['num_steps']}; finish it before "
            "starting the stages after it")
    params = restored["ema_params"] if use_ema else restored["params"]
    return merge(graphdef, params, restored["rest"]), provenance


def _latest_step_folder(directory: str) -> int:
    return max((int(name) for name in os.listdir(directory) if name.isdigit()), default=0)


# ------------------------------------------------------------------------------------------
# A whole run.

def run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run folder was trained with (its config.json)."""
    config_path = Path(workdir) / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: not a trained run directory")
    return ml_collections.ConfigDict(json.loads(config_path.read_text()))


def load_run(workdir: str):
    """(config, models, calibration) of a trained and evaluated run directory; the
    calibration holds the segmentation threshold (RuntimeError when evaluation had no
    lesion-validation volumes to select one on)."""
    config = run_config(workdir)
    calibration_path = Path(workdir) / "eval" / "calibration.json"
    if not calibration_path.is_file():
        raise FileNotFoundError(f"{calibration_path}: run `evaluate` first; it calibrates "
                                "the segmentation threshold on the lesion-validation set")
    calibration = json.loads(calibration_path.read_text())
    if "threshold" not in calibration:
        raise RuntimeError(f"{workdir}: evaluation found no lesion-validation volumes, so no "
                           "segmentation threshold was calibrated")
    return config, load_models(config, workdir), calibration


def load_models(config, workdir: str) -> dict:
    """stage name -> trained (EMA) networks of the stages `config.method` scores with."""
    return load_models_and_steps(config, workdir)[0]


def load_models_and_steps(config, workdir: str) -> tuple[dict, dict]:
    """(stage name -> networks, stage name -> {"step", "latest_step", "fell_back",
    "selection", "val_loss", "trained_steps", "num_steps", "finished_steps"}): which
    checkpoint each scoring stage was restored from (the latest or the best-validation step;
    an older step than the newest on disk when that one is unreadable), and how far it was
    trained, for the results."""
    models, steps = {}, {}
    for stage in get_method(config.method).scoring_stages(config):
        models[stage.name], info = load_stage_checkpoint(
            config, stage_workdir(config, workdir, stage.name), stage)
        steps[stage.name] = {k: v for k, v in info.items() if k != "directory"}
    return models, steps
