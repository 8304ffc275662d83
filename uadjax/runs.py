"""Run folders: where a trained run's stages live, and loading them back checked.

Layout (see `uadjax.trainer`): <workdir>/config.json, <workdir>/<stage>/checkpoints/<step>/,
and after evaluation <workdir>/eval/ (results.json, calibration.json, ...). A stage may live
in another run folder (`config.stage_workdirs.<stage>`) and is then loaded, never trained.
Evaluation, prediction and the benchmark load networks only through this module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_collections
from flax import nnx

from uadjax import checkpointing
from uadjax.methods import get_method
from uadjax.methods.base import Stage
from uadjax.train_state import init_state, merge, stage_config, stage_optimizer

CONFIG_FILE = "config.json"


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
    """Rebuilds a trained stage's networks from its latest readable checkpoint.

    Returns:
      (networks, {"directory", "step": the step folder restored, "latest_step": the newest
      step folder on disk, "trained_steps": the optimiser steps in the restored state,
      "num_steps": the steps the stage was configured to train}); "step" and "latest_step"
      differ when newer checkpoints were unreadable (a warning names them), and results
      computed from the networks should say so.

    The optimiser state is restored with the structure of the optimiser the checkpoint was
    trained with (its saved config), so a stage trained elsewhere under another recipe loads.

    Raises:
      FileNotFoundError: the stage has no checkpoint.
      RuntimeError: `require_finished` and the checkpoint is short of the stage's steps.
    """
    config = stage_config(config, stage.name)
    directory = os.path.join(stage_dir(workdir, stage.name), "checkpoints")
    if not checkpointing.has_checkpoint(directory):  # before orbax creates the folder
        raise FileNotFoundError(
            f"stage {stage.name!r} has no checkpoint in {directory}; train it first "
            f"(`train --stage={stage.name}`, or `train` without --stage for all stages)")
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
        step = int(restored["step"])
        provenance = {"directory": directory, "step": ckpt.restored_step,
                      "latest_step": ckpt.latest_step(), "trained_steps": step,
                      "num_steps": int(train_cfg.num_steps)}
        if require_finished and step < int(train_cfg.num_steps):
            raise RuntimeError(
                f"stage {stage.name!r} in {directory} stopped at step {step} of "
                f"{int(train_cfg.num_steps)}; finish it before starting the stages after it")
    finally:
        ckpt.close()
    params = restored["ema_params"] if use_ema else restored["params"]
    return merge(graphdef, params, restored["rest"]), provenance


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
    "trained_steps", "num_steps"}): which checkpoint each scoring stage was restored from
    (an older step than the newest on disk when that one is unreadable), and how far it
    was trained, for the results."""
    models, steps = {}, {}
    for stage in get_method(config.method).scoring_stages(config):
        models[stage.name], info = load_stage_checkpoint(
            config, stage_workdir(config, workdir, stage.name), stage)
        steps[stage.name] = {"step": info["step"], "latest_step": info["latest_step"],
                             "fell_back": info["step"] != info["latest_step"],
                             "trained_steps": info["trained_steps"],
                             "num_steps": info["num_steps"]}
    return models, steps
