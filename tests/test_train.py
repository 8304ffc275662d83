"""Trainer: sharded == single device, kill/resume == uninterrupted, non-finite and SIGTERM."""

import copy
import math
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers_train import NanBatches

from configs import ddpm
from uadjax import checkpointing, jobs, parallel, runs, train_state, trainer
from uadjax.methods import get_method
from uadjax.methods.base import Stage
from uadjax.metric_writer import read_metrics


def _tiny_config(tiny_run, **train_overrides):
    config = copy.deepcopy(tiny_run)
    for key, value in train_overrides.items():
        config.train[key] = value
    return config


def _stage():
    return get_method("ddpm").stage("diffusion")


def test_tiny_run_wrote_everything(tiny_run):
    workdir = tiny_run.workdir
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "diffusion", "checkpoints"))
    assert ckpt.latest_step() == tiny_run.train.num_steps
    ckpt.close()
    for name in ("results.json", "subjects.csv", "report.md", "calibration.json"):
        assert os.path.getsize(os.path.join(workdir, "eval", name)) > 0
    assert jax.device_count() == 8


def test_sharded_step_matches_single_device(tiny_run):
    """One update on 8 devices equals one on 1 device: loss, parameters and the gradient's
    norm, and the norm equals a plain unjitted jax.grad of the loss on the host batch (an
    Adam step alone is blind to the gradient's scale)."""
    config = _tiny_config(tiny_run)
    stage = _stage()
    tx = train_state.make_optimizer(config.train)
    data = jobs.make_train_data(config, stage)
    host_batch = next(data.train_iter)
    outputs = []
    for n in (8, 1):
        mesh = parallel.make_mesh(n)
        graphdef, state = trainer.init_state(stage, config, tx, seed=0)
        state = parallel.replicate(state, mesh)
        step = jax.jit(trainer.make_train_step(stage, graphdef, tx, config,
                                             base_key=jax.random.key(0)))
        state, metrics = step(state, parallel.to_global(host_batch, mesh))
        outputs.append((jax.device_get(state["params"]), float(metrics["loss"]),
                        float(metrics["grad_norm"])))
    (p8, loss8, norm8), (p1, loss1, norm1) = outputs
    assert loss8 == pytest.approx(loss1, rel=1e-5)
    assert norm8 == pytest.approx(norm1, rel=1e-4)
    for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    graphdef, state = trainer.init_state(stage, config, tx, seed=0)
    key = jax.random.fold_in(jax.random.key(0), 0)
    batch = {k: jnp.asarray(v) for k, v in host_batch.items()}

    def loss_of(params):
        model = train_state.merge(graphdef, params, state["rest"])
        return stage.loss_fn(model, batch, key, config)[0]

    grads = jax.grad(loss_of)(state["params"])
    reference = float(np.sqrt(sum(np.sum(np.square(np.asarray(g)))
                                  for g in jax.tree.leaves(grads))))
    assert norm1 == pytest.approx(reference, rel=1e-4)


def _train(config, workdir, *, stop_at_step=None):
    stage = _stage()
    return trainer.train_stage(stage, config, workdir, jobs.make_train_data(config, stage),
                             progress=False, stop_at_step=stop_at_step)


def test_stop_and_resume_in_process_equals_uninterrupted(tiny_run, tmp_path):
    """A graceful stop (`stop_at_step`, as after SIGTERM) and a resume in the same process
    give the uninterrupted run's state bitwise, with the step-dependent recipe on (EMA,
    warm-up + cosine, clipping). Real kills (SIGKILL) are tests/test_faults.py's."""
    config = _tiny_config(tiny_run, num_steps=4, checkpoint_every_steps=100, val_every_steps=0,
                          ema_decay=0.99, warmup_steps=2, lr_schedule="cosine", grad_clip=1.0)
    straight = _train(config, str(tmp_path / "straight"))
    first = _train(config, str(tmp_path / "resumed"), stop_at_step=2)
    assert first["step"] == 2
    resumed = _train(config, str(tmp_path / "resumed"))
    assert resumed["step"] == 4
    for key in ("step", "params", "ema_params", "opt_state", "rest"):
        for a, b in zip(jax.tree.leaves(jax.device_get(straight["state"][key])),
                        jax.tree.leaves(jax.device_get(resumed["state"][key])), strict=True):
            np.testing.assert_array_equal(a, b)


class _Totals(nnx.Module):
    """A statistics stage's module: a parameter it must leave alone, and two counters."""

    def __init__(self, config, rngs):
        self.scale = nnx.Param(jnp.full((), 2.0))
        self.total = nnx.Variable(jnp.zeros(()))
        self.count = nnx.Variable(jnp.zeros(()))


def _add_batch(model, batch, key, config):
    inside = batch["brain_mask"].astype(jnp.float32)
    model.total[...] += model.scale[...] * jnp.sum(batch["image"][..., 0] * inside)
    model.count[...] += jnp.sum(inside)
    return {"mean": model.total[...] / jnp.maximum(model.count[...], 1.0)}


TOTALS = Stage(name="totals", make_model=_Totals, statistics_fn=_add_batch)


def test_a_statistics_stage_counts_its_batches_resumes_and_has_no_optimiser(tiny_run, tmp_path):
    config = _tiny_config(tiny_run, log_every_steps=1)
    config.stage_statistics = {"totals": {"data_split": "val_healthy", "augment": False,
                                          "num_batches": 3}}
    cfg = trainer.stage_config(config, "totals")
    assert (cfg.train.num_steps, cfg.train.checkpoint_every_steps,
            cfg.train.val_every_steps, cfg.train.data_split) == (3, 3, 0, "val_healthy")
    # The independent reference: the same three batches summed in NumPy.
    it = jobs.make_train_data(cfg, TOTALS).train_iter
    batches = [next(it) for _ in range(3)]
    total = sum(2.0 * np.sum(b["image"][..., 0] * b["brain_mask"]) for b in batches)
    count = sum(np.sum(b["brain_mask"]) for b in batches)

    def run(workdir, stop_at_step=None):
        return trainer.train_stage(TOTALS, config, workdir, jobs.make_train_data(cfg, TOTALS),
                                 progress=False, stop_at_step=stop_at_step)

    straight = run(str(tmp_path / "straight"))
    assert straight["finished"] and "opt_state" not in straight["state"]
    rest = jax.device_get(straight["state"]["rest"])
    np.testing.assert_allclose(rest["total"], total, rtol=1e-5)
    assert float(rest["count"]) == count
    assert float(jax.device_get(straight["state"]["params"]["scale"])) == 2.0
    # Stopped after one batch and resumed: the same counts, bitwise (the data position is
    # checkpointed as in training).
    assert run(str(tmp_path / "resumed"), stop_at_step=1)["step"] == 1
    resumed = run(str(tmp_path / "resumed"))
    assert resumed["step"] == 3
    for a, b in zip(jax.tree.leaves(jax.device_get(resumed["state"])),
                    jax.tree.leaves(jax.device_get(straight["state"])), strict=True):
        np.testing.assert_array_equal(a, b)
    model, info = runs.load_stage_checkpoint(config, str(tmp_path / "resumed"), TOTALS,
                                             require_finished=True)
    assert info["trained_steps"] == info["num_steps"] == 3
    np.testing.assert_allclose(float(model.total[...]), total, rtol=1e-5)
    # A checkpoint of the pass saved as a training stage (an older uadjax: an optimiser
    # state, lr 0) is refused with what to do.
    old = _tiny_config(tiny_run, num_steps=1, data_split="val_healthy", augment=False,
                       learning_rate=0.0)
    old.stage_train = {"totals": {"num_steps": 1}}
    as_training = Stage(name="totals", make_model=_Totals, loss_fn=lambda m, b, k, c: (
        0.0 * m.scale[...], _add_batch(m, b, k, c)))
    trainer.train_stage(as_training, old, str(tmp_path / "old"),
                      jobs.make_train_data(trainer.stage_config(old, "totals"), as_training),
                      progress=False)
    with pytest.raises(checkpointing.CheckpointError, match="older uadjax.*--stage=totals"):
        runs.load_stage_checkpoint(config, str(tmp_path / "old"), TOTALS)
    with pytest.raises(ValueError, match="exactly one of loss_fn"):
        Stage(name="both", make_model=_Totals, loss_fn=_add_batch, statistics_fn=_add_batch)
    config.stage_train = {"totals": {"num_steps": 3}}
    with pytest.raises(ValueError, match="both config.stage_train and config.stage_statistics"):
        trainer.stage_config(config, "totals")


def test_a_stage_never_resumes_on_other_data(tiny_run, tmp_path):
    """A run folder trained on one dataset refuses to resume on another (e.g. a phantom
    regenerated by a newer generator) instead of mixing them; the same data resumes."""
    config = _tiny_config(tiny_run, num_steps=4, checkpoint_every_steps=100, val_every_steps=0)
    workdir = str(tmp_path / "run")
    assert _train(config, workdir, stop_at_step=2)["step"] == 2
    saved = os.path.join(workdir, "diffusion", trainer.DATA_IDENTITY_FILE)
    identity = jobs.data_identity(config)
    assert len(identity["manifest_sha256"]) == 64
    stage = _stage()
    data = jobs.make_train_data(config, stage)
    other = trainer.TrainData(train_iter=data.train_iter, val_batches=data.val_batches,
                            identity={**identity, "manifest_sha256": "0" * 64})
    with pytest.raises(checkpointing.CheckpointError, match="trained on other data"):
        trainer.train_stage(stage, config, workdir, other, progress=False)
    assert trainer.check_same_data(os.path.dirname(saved), identity, resuming=True) is None
    assert _train(config, workdir)["step"] == 4  # the same data resumes


def test_non_finite_loss_stops_and_keeps_good_checkpoint(tiny_run, tmp_path):
    config = _tiny_config(tiny_run, num_steps=6, checkpoint_every_steps=2, log_every_steps=1,
                          val_every_steps=0)
    stage = _stage()
    data = jobs.make_train_data(config, stage)
    data.train_iter = NanBatches(data.train_iter, bad=lambda i: i >= 3)  # step 3 on: NaN
    workdir = str(tmp_path / "nan")
    with pytest.raises(trainer.NonFiniteLossError, match="at step 3"):
        trainer.train_stage(stage, config, workdir, data, progress=False)
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "diffusion", "checkpoints"))
    assert ckpt.latest_step() == 2
    restored = ckpt.restore(checkpointing.abstract_like(
        trainer.init_state(stage, config, train_state.make_optimizer(config.train), seed=0)[1]))
    ckpt.close()
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored["params"]))


def test_sigterm_saves_and_resume_finishes(tiny_run, tmp_path):
    config = _tiny_config(tiny_run, num_steps=5, checkpoint_every_steps=100, val_every_steps=0)
    stage = _stage()
    data = jobs.make_train_data(config, stage)
    inner = data.train_iter

    class SigtermAfterTwo(NanBatches):
        def __next__(self):
            if self.count == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            self.count += 1
            return next(self.it)

    data.train_iter = SigtermAfterTwo(inner, bad=lambda i: False)
    workdir = str(tmp_path / "sigterm")
    out = trainer.train_stage(stage, config, workdir, data, progress=False)
    assert out["step"] == 3 and not out["finished"]
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "diffusion", "checkpoints"))
    assert ckpt.latest_step() == 3
    ckpt.close()
    assert _train(config, workdir)["step"] == 5


def test_optimizer_schedules_against_closed_forms():
    """Warm-up and cosine learning rates at chosen steps, and global-norm clipping."""
    cfg = ddpm.get_config("cpu").train  # lr 1e-3, warm-up 50, cosine to 1 % at 1000 steps
    lr, warmup, total = cfg.learning_rate, cfg.warmup_steps, cfg.num_steps
    schedule = train_state.learning_rate_schedule(cfg)
    end = 0.01 * lr

    def cosine(step):
        return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * (step - warmup) /
                                                       (total - warmup)))

    for step, expected in [(0, 0.0), (10, lr * 10 / warmup), (warmup, lr),
                           (300, cosine(300)), (total - 1, cosine(total - 1)), (total, end),
                           (total + 100, end)]:
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-12), step
    constant = copy.deepcopy(cfg)
    constant.lr_schedule, constant.warmup_steps = "constant", 4
    schedule = train_state.learning_rate_schedule(constant)
    assert [float(schedule(s)) for s in (0, 2, 4, 500)] == pytest.approx(
        [0.0, lr / 2, lr, lr])
    constant.warmup_steps = 0
    assert train_state.learning_rate_schedule(constant) == lr
    # Clipping: a first gradient of norm 100 or 1000 (same direction) clips to norm 1, so
    # with the same small second gradient (norm < 1, not clipped) two Adam steps give the
    # same updates; without clipping Adam's moments remember the scale and they differ.
    params = {"w": jnp.zeros(4)}
    direction = jnp.array([1.0, -2.0, 0.5, 3.0])
    direction = direction / jnp.linalg.norm(direction)
    second = jnp.array([0.3, 0.1, -0.2, 0.4])

    def two_steps(tcfg, scale):
        tx = train_state.make_optimizer(tcfg)
        state = tx.init(params)
        up1, state = tx.update({"w": scale * direction}, state, params)
        up2, _ = tx.update({"w": second}, state, params)
        return np.concatenate([np.asarray(up1["w"]), np.asarray(up2["w"])])

    clipped = copy.deepcopy(constant)
    clipped.grad_clip = 1.0
    np.testing.assert_allclose(two_steps(clipped, 100.0), two_steps(clipped, 1000.0),
                               rtol=1e-6)
    unclipped = copy.deepcopy(constant)
    unclipped.grad_clip = 0.0
    assert not np.allclose(two_steps(unclipped, 100.0), two_steps(unclipped, 1000.0))
    with pytest.raises(ValueError, match="unknown optimizer"):
        bad = copy.deepcopy(cfg)
        bad.optimizer = "sgd"
        train_state.make_optimizer(bad)


def test_ema_warmup_formula():
    assert float(trainer.ema_decay_at(0, 0.999)) == pytest.approx(0.1)
    assert float(trainer.ema_decay_at(10_000, 0.999)) == pytest.approx(0.999)


def test_best_validation_checkpoint_is_kept_selected_and_recorded(tiny_run, tmp_path):
    """select_checkpoint='best_val' (Behrendt's `ckpt_path: best`): the kept step is the
    argmin of the logged validation losses, also across a resume whose later steps are worse
    (resumed with a negative learning rate: gradient ascent); it holds the same parameters
    as a run stopped at that step; evaluation uses it and results.json names the selection,
    the step and its loss."""
    config = _tiny_config(tiny_run, num_steps=3, checkpoint_every_steps=1, val_every_steps=1,
                          log_every_steps=1, select_checkpoint="best_val")
    workdir = str(tmp_path / "best")
    _train(config, workdir)
    worse = _tiny_config(tiny_run, num_steps=6, checkpoint_every_steps=1, val_every_steps=1,
                         log_every_steps=1, select_checkpoint="best_val",
                         learning_rate=-10 * config.train.learning_rate)
    _train(worse, workdir)
    records = [r for r in read_metrics(os.path.join(workdir, "diffusion",
                                                            "metrics.jsonl"))
               if r["split"] == "val"]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    best = min(records, key=lambda r: r["loss"])
    assert best["step"] <= 3 < 6, records  # the ascent made every later step worse
    model, info = runs.load_stage_checkpoint(worse, workdir, _stage())
    assert (info["selection"], info["step"], info["finished_steps"]) == ("best_val",
                                                                         best["step"], 6)
    assert info["val_loss"] == pytest.approx(best["loss"], rel=1e-6)
    stopped = _train(config, str(tmp_path / "stopped"), stop_at_step=best["step"])
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                    jax.tree.leaves(jax.device_get(stopped["state"]["ema_params"])),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    latest = _tiny_config(worse, select_checkpoint="latest")
    assert runs.load_stage_checkpoint(latest, workdir, _stage())[1]["step"] == 6
    with pytest.raises(ValueError, match="select_checkpoint"):
        runs.checkpoint_selection(_tiny_config(worse, select_checkpoint="best").train)
    summary = jobs.evaluate(worse, workdir, progress=False)
    recorded = summary["checkpoints"]["diffusion"]
    assert (recorded["selection"], recorded["step"]) == ("best_val", best["step"])
    assert recorded["val_loss"] == pytest.approx(best["loss"], rel=1e-6)
    report = open(os.path.join(workdir, "eval", "report.md"), encoding="utf-8").read()
    assert f"diffusion step {best['step']} (lowest healthy-validation loss" in report
