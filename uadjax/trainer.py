"""One generic trainer for every method: a method supplies its loss, the trainer owns the loop.

train(config, workdir) trains each stage of `config.method` in order (or one named stage):
mesh over every device, replicated state, batches sharded over 'data', one jitted and donated
update step, EMA of the parameters, orbax checkpoints holding the state, the grain iterator
position and the config. Running the same command again resumes from the last checkpoint;
SIGTERM forces a save; a non-finite loss stops the run naming the step, and the step that
produced it is not applied, so no checkpoint ever holds non-finite parameters.

Workdir layout:
  <workdir>/config.json
  <workdir>/<stage>/checkpoints/<step>/   state, data_iter, config
  <workdir>/<stage>/best_checkpoint/<step>/   with `train.select_checkpoint = 'best_val'`:
                                          the step of lowest healthy-validation loss so far
  <workdir>/<stage>/metrics.jsonl, tb/    training and validation curves
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from uadjax import atomic, checkpointing, parallel
from uadjax.methods import get_method
from uadjax.methods.base import Stage
from uadjax.metric_writer import MetricWriter
from uadjax.progress import progress_bar
from uadjax.runs import (
    BEST_DIR,
    check_same_method,
    checkpoint_selection,
    is_external,
    load_stage_models,
    restore_checked,
    saved_config,
    stage_dir,
    stage_workdir,
)
from uadjax.train_state import ema_decay_at, init_state, merge, stage_config, stage_optimizer


class NonFiniteLossError(RuntimeError):
    """Raised when a training step produced a non-finite loss or gradient."""


@dataclasses.dataclass
class TrainData:
    """Where a stage's batches come from.

    Attributes:
      train_iter: grain iterator (or any iterator with get_state/set_state) of host batches.
      val_batches: callable returning a fresh iterable of host validation batches (or None).
      identity: what identifies the training data ({'dataset_dir', 'manifest_sha256'}), or
        None: a stage never resumes on data other than the data it started on.
    """

    train_iter: Iterator[dict]
    val_batches: Callable[[], Any] | None = None
    identity: dict | None = None


DATA_IDENTITY_FILE = "data.json"


def check_same_data(directory: str, identity: dict | None, resuming: bool) -> None:
    """Records the training data's identity in a stage folder, or checks it on resume.

    Raises:
      CheckpointError: the stage's checkpoints were trained on other data (another
        dataset, or the same one regenerated differently, e.g. by a newer phantom
        generator): resuming would silently mix the two.
    """
    if identity is None:
        return
    path = os.path.join(directory, DATA_IDENTITY_FILE)
    if resuming and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if saved.get("manifest_sha256") != identity.get("manifest_sha256"):
            raise checkpointing.CheckpointError(
                f"{directory}: this stage was trained on other data ({saved.get('dataset_dir')}"
                f", manifest sha256 {str(saved.get('manifest_sha256'))[:12]}); the data is now "
                f"{identity.get('dataset_dir')} (sha256 {identity['manifest_sha256'][:12]}). "
                "Resuming would mix the two: use another --workdir, or delete this run "
                "folder to train again.")
        return
    atomic.write_json(path, identity)


def make_train_step(stage: Stage, graphdef, tx, config, *, base_key):
    """The pure update step: state, batch -> state, metrics. Jit it with donation."""
    ema_decay = float(config.train.ema_decay)
    # 'skip' drops the update and goes on: the step is not recorded as a stop reason (a
    # later resume under 'stop' must not stop for an update that was never applied).
    record_non_finite = _non_finite_policy(config.train) == "stop"

    def step_fn(state, batch):
        key = jax.random.fold_in(base_key, state["step"])

        def loss_of(params):
            model = merge(graphdef, params, state["rest"])
            loss, metrics = stage.loss_fn(model, batch, key, config)
            _, _, new_rest = nnx.split(model, nnx.Param, ...)
            return loss, (metrics, nnx.to_pure_dict(new_rest))

        (loss, (metrics, new_rest)), grads = jax.value_and_grad(loss_of, has_aux=True)(
            state["params"])
        grad_norm = optax.tree_utils.tree_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        if ema_decay > 0:
            d = ema_decay_at(state["step"], ema_decay)
            ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state["ema_params"], params)
        else:
            ema = params
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        proposed = {"params": params, "ema_params": ema, "opt_state": opt_state, "rest": new_rest}
        kept = {k: state[k] for k in proposed}
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), proposed, kept)
        new["step"] = state["step"] + 1
        new["nonfinite_step"] = jnp.where(
            (state["nonfinite_step"] < 0) & ~finite & record_non_finite, state["step"],
            state["nonfinite_step"])
        metrics = {"loss": loss, "grad_norm": grad_norm, **metrics,
                   "skipped": 1.0 - finite.astype(jnp.float32)}
        return new, metrics

    return step_fn


def make_statistics_step(stage: Stage, graphdef, config, *, base_key):
    """The pure step of a statistics pass: state, batch -> state, metrics. The networks stay
    as they are; `stage.statistics_fn` updates the non-parameter variables ('rest')."""

    def step_fn(state, batch):
        key = jax.random.fold_in(base_key, state["step"])
        model = merge(graphdef, state["params"], state["rest"])
        metrics = stage.statistics_fn(model, batch, key, config)
        _, _, rest = nnx.split(model, nnx.Param, ...)
        new = {**state, "rest": nnx.to_pure_dict(rest), "step": state["step"] + 1}
        return new, {**metrics, "skipped": jnp.zeros((), jnp.float32)}

    return step_fn


def make_eval_loss_fn(stage: Stage, graphdef, config):
    """Validation loss with the EMA parameters and a fixed key (pure; jit it)."""

    def eval_fn(state, batch, key):
        model = merge(graphdef, state["ema_params"], state["rest"])
        loss, metrics = stage.loss_fn(model, batch, key, config)
        return {"loss": loss, **metrics}

    return eval_fn


class _BestKeeper:
    """Keeps a copy of the step with the lowest validation loss in `<stage>/best_checkpoint`
    (Behrendt: Lightning's ModelCheckpoint on the validation loss, tested with
    `ckpt_path: best`). The best value so far is read back from that copy on resume, so a
    killed run keeps the same choice."""

    METRIC = "val/loss"

    def __init__(self, directory: str):
        self.ckpt = checkpointing.Checkpointer(os.path.join(directory, BEST_DIR), max_to_keep=1)
        saved = self.ckpt.restore_selection()
        self.value = float(saved["value"]) if saved else float("inf")

    def offer(self, step: int, val_metrics: dict, state, config) -> None:
        value = float(val_metrics.get("loss", float("nan")))
        if np.isfinite(value) and value < self.value:
            self.ckpt.save(step, state, config=config,
                           selection={"metric": self.METRIC, "value": value, "step": step})
            self.value = value

    def close(self) -> None:
        self.ckpt.close()


class _SigtermFlag:
    """Turns SIGTERM into a flag the loop checks, so the run saves before it exits."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train_stage(stage: Stage, config, workdir: str, data: TrainData, *, earlier=None,
                mesh=None, progress: bool = True, stop_at_step: int | None = None) -> dict:
    """Trains one stage to its `num_steps` (resuming if a checkpoint exists).

    Args:
      config: the method config; the stage's overrides (`stage_config`) are applied here.
      stop_at_step: stop (and save) after this step, as if killed; for tests and preemption.
    Returns:
      {'state': final state, 'graphdef': graphdef, 'step': int, 'finished': bool}; not
      finished after SIGTERM or `stop_at_step`.
    """
    config = stage_config(config, stage.name)
    tcfg = config.train
    mesh = mesh or parallel.make_mesh()
    parallel.check_batch_size(tcfg.batch_size, mesh)
    tx = stage_optimizer(stage, tcfg)
    graphdef, state = init_state(stage, config, tx, seed=config.seed, earlier=earlier)
    state = parallel.replicate(state, mesh)
    directory = stage_dir(workdir, stage.name)
    ckpt = checkpointing.Checkpointer(os.path.join(directory, "checkpoints"),
                                      max_to_keep=tcfg.max_checkpoints)
    best = (_BestKeeper(directory) if checkpoint_selection(tcfg) == "best_val"
            and not stage.is_statistics else None)
    resuming = ckpt.latest_step() is not None
    check_same_data(directory, data.identity, resuming)
    if resuming:
        saved = saved_config(ckpt)
        check_same_method(saved, config, ckpt.directory)
        state = restore_checked(ckpt, checkpointing.abstract_like(state), saved, config,
                                stage=stage, data_iter=data.train_iter, quarantine=True)
        print(f"{stage.name}: resuming from the checkpoint of step {int(state['step'])}")
    start = int(state["step"])
    num_steps = int(tcfg.num_steps)
    if start >= num_steps:
        ckpt.close()
        if best is not None:
            best.close()
        return {"state": state, "graphdef": graphdef, "step": start, "finished": True}

    base_key = jax.random.key(config.seed)
    if stage.is_statistics:
        step_fn = make_statistics_step(stage, graphdef, config, base_key=base_key)
        eval_fn = None
    else:
        step_fn = make_train_step(stage, graphdef, tx, config, base_key=base_key)
        eval_fn = jax.jit(make_eval_loss_fn(stage, graphdef, config))
    replicated = parallel.replicated(mesh)
    state_sharding = jax.tree.map(lambda _: replicated, state)
    jit_step = jax.jit(step_fn, donate_argnums=(0,), out_shardings=(state_sharding, replicated))
    writer = MetricWriter(directory, tensorboard=tcfg.tensorboard)
    log_every = int(tcfg.log_every_steps)
    ckpt_every = int(tcfg.checkpoint_every_steps)
    val_every = int(tcfg.val_every_steps)
    last = stop_at_step if stop_at_step is not None else num_steps
    last = min(last, num_steps)
    bar = progress_bar(total=num_steps, initial=start, disable=not progress,
                       desc=f"train/{stage.name}", dynamic_ncols=True)
    t_last, n_last = time.perf_counter(), 0
    pending = []
    step = start
    skip_non_finite = _non_finite_policy(tcfg) == "skip"
    skipped = 0
    try:
        with _SigtermFlag() as sigterm:
            while step < last:
                host_batch = next(data.train_iter)
                batch = parallel.to_global(host_batch, mesh)
                state, metrics = jit_step(state, batch)
                step += 1
                pending.append(metrics)
                n_last += tcfg.batch_size
                if step % log_every == 0 or step == last or sigterm.raised:
                    pending = jax.device_get(pending)
                    if skip_non_finite:
                        skipped = _count_skipped(pending, step, skipped, tcfg)
                    else:
                        _check_finite(state)
                    means = {k: float(np.mean([m[k] for m in pending if k != "skipped"
                                               and np.isfinite(m[k])] or [np.nan]))
                             for k in pending[0]}
                    means["skipped"] = float(sum(m["skipped"] for m in pending))
                    pending = []
                    now = time.perf_counter()
                    means["slices_per_s"] = n_last / max(now - t_last, 1e-9)
                    t_last, n_last = now, 0
                    writer.write(step, means, split="train")
                    shown = "loss" if "loss" in means else next(iter(means))
                    bar.set_postfix(**{shown: f"{means[shown]:.4g}",
                                       "sl_s": f"{means['slices_per_s']:.0f}"})
                if (val_every and eval_fn is not None and data.val_batches is not None
                        and step % val_every == 0):
                    val_metrics = _validate(eval_fn, state, data.val_batches, mesh, base_key)
                    writer.write(step, val_metrics, split="val")
                    if best is not None:
                        best.offer(step, val_metrics, state, config)
                if step % ckpt_every == 0 or step == last or sigterm.raised:
                    if not skip_non_finite:
                        _check_finite(state)
                    ckpt.save(step, state, data_iter=data.train_iter, config=config)
                bar.update(1)
                if sigterm.raised:
                    print(f"SIGTERM: saved checkpoint at step {step}; rerun to resume.")
                    break
    finally:
        bar.close()
        writer.close()
        ckpt.close()
        if best is not None:
            best.close()
    return {"state": state, "graphdef": graphdef, "step": step, "finished": step >= num_steps}


def _non_finite_policy(tcfg) -> str:
    policy = tcfg.on_non_finite
    if policy not in ("stop", "skip"):
        raise ValueError(f"config.train.on_non_finite must be 'stop' or 'skip', not {policy!r}")
    return policy


def _count_skipped(metrics: list[dict], step: int, skipped: int, tcfg) -> int:
    """Warns about the updates skipped (non-finite) among the steps ending at `step`;
    raises NonFiniteLossError past `max_skipped_steps` in all. Returns the new total."""
    first = step - len(metrics)  # 0-based index of the first of these steps (as in 'stop')
    bad = [first + i for i, m in enumerate(metrics) if m["skipped"]]
    if bad:
        skipped += len(bad)
        print(f"warning: non-finite loss or gradient at step(s) {bad}: update skipped "
              f"({skipped} skipped so far)")
    limit = int(tcfg.max_skipped_steps)
    if skipped > limit:
        raise NonFiniteLossError(
            f"{skipped} updates skipped for a non-finite loss or gradient (last at step "
            f"{bad[-1]}), more than train.max_skipped_steps={limit}; the last checkpoint is "
            "kept. Lower the learning rate or check the data.")
    return skipped


def _check_finite(state) -> None:
    bad = int(jax.device_get(state["nonfinite_step"]))
    if bad >= 0:
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {bad}; the run stopped and the last "
            "checkpoint (before that step) is kept. Lower the learning rate or check the data.")


def _validate(eval_fn, state, val_batches, mesh, base_key) -> dict:
    key = jax.random.fold_in(base_key, 2**31 - 1)
    sums, count = {}, 0
    for i, host_batch in enumerate(val_batches()):
        if "valid" in host_batch and not np.all(host_batch["valid"]):
            continue  # padded tail batch: skip so every row is a real slice
        batch = parallel.to_global(host_batch, mesh)
        metrics = jax.device_get(eval_fn(state, batch, jax.random.fold_in(key, i)))
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        count += 1
    return {k: v / max(count, 1) for k, v in sums.items()}


def train(config, workdir: str, *, make_data: Callable[[Any, Stage], TrainData],
          stages: list[str] | None = None, progress: bool = True) -> bool:
    """Trains the stages of `config.method` in order, skipping finished ones.

    Args:
      make_data: builds the TrainData of a stage (the data module's job; injectable in tests).
      stages: names of the stages to train; all by default.
    Returns:
      True when every requested stage reached its step count; False when a stage stopped
      early (SIGTERM): later stages are then not started.
    """
    os.makedirs(workdir, exist_ok=True)
    config_path = os.path.join(workdir, "config.json")
    if os.path.isfile(config_path):  # never overwrite another method's run description
        with open(config_path, encoding="utf-8") as f:
            check_same_method(json.load(f), config, workdir)
    atomic.write_json(config_path, json.loads(config.to_json_best_effort()))
    method = get_method(config.method)
    active = method.active_stages(config)
    wanted = [s.name for s in active if stages is None or s.name in stages]
    if stages is not None and set(stages) - set(wanted):
        raise ValueError(f"stages {sorted(set(stages) - set(wanted))} are not trained by this "
                         f"config; its stages: {[s.name for s in active]}")
    external = [s.name for s in active
                if s.name in wanted and is_external(config, workdir, s.name)]
    if stages is not None and external:
        raise ValueError(f"stages {external} are loaded from config.stage_workdirs, not "
                         "trained in this run; train them in their own run folder")
    earlier: dict[str, nnx.Module] = {}
    for stage in active:
        if not wanted:
            break
        if stage.name in wanted:
            wanted.remove(stage.name)
            if not is_external(config, workdir, stage.name):
                out = train_stage(stage, config, workdir,
                                  make_data(stage_config(config, stage.name), stage),
                                  earlier=earlier, progress=progress)
                if not out["finished"]:
                    return False
        if wanted:  # a later stage starts from this one: it must be complete
            earlier[stage.name] = load_stage_models(
                config, stage_workdir(config, workdir, stage.name), stage,
                require_finished=True)
    return True
