"""Trainer: sharded == single device, kill/resume == uninterrupted, non-finite and SIGTERM."""

import copy
import os
import signal

import jax
import numpy as np
import pytest
from helpers_train import NanBatches

from configs import ddpm
from uadjax import checkpointing, jobs, parallel, train
from uadjax.methods import get_method


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
    config = _tiny_config(tiny_run)
    stage = _stage()
    tx = train.make_optimizer(config.train)
    data = jobs.make_train_data(config, stage)
    host_batch = next(data.train_iter)
    outputs = []
    for n in (8, 1):
        mesh = parallel.make_mesh(n)
        graphdef, state = train.init_state(stage, config, tx, seed=0)
        state = parallel.replicate(state, mesh)
        step = jax.jit(train.make_train_step(stage, graphdef, tx, config,
                                             base_key=jax.random.key(0)))
        state, metrics = step(state, parallel.to_global(host_batch, mesh))
        outputs.append((jax.device_get(state["params"]), float(metrics["loss"])))
    (p8, loss8), (p1, loss1) = outputs
    assert loss8 == pytest.approx(loss1, rel=1e-5)
    for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _train(config, workdir, *, stop_at_step=None):
    stage = _stage()
    return train.train_stage(stage, config, workdir, jobs.make_train_data(config, stage),
                             progress=False, stop_at_step=stop_at_step)


def test_kill_and_resume_equals_uninterrupted(tiny_run, tmp_path):
    config = _tiny_config(tiny_run, num_steps=4, checkpoint_every_steps=100, val_every_steps=0)
    straight = _train(config, str(tmp_path / "straight"))
    first = _train(config, str(tmp_path / "resumed"), stop_at_step=2)
    assert first["step"] == 2
    resumed = _train(config, str(tmp_path / "resumed"))
    assert resumed["step"] == 4
    for key in ("params", "ema_params", "opt_state"):
        for a, b in zip(jax.tree.leaves(jax.device_get(straight["state"][key])),
                        jax.tree.leaves(jax.device_get(resumed["state"][key]))):
            np.testing.assert_array_equal(a, b)


def test_non_finite_loss_stops_and_keeps_good_checkpoint(tiny_run, tmp_path):
    config = _tiny_config(tiny_run, num_steps=6, checkpoint_every_steps=2, log_every_steps=1,
                          val_every_steps=0)
    stage = _stage()
    data = jobs.make_train_data(config, stage)
    data.train_iter = NanBatches(data.train_iter, bad=lambda i: i >= 3)  # step 3 on: NaN
    workdir = str(tmp_path / "nan")
    with pytest.raises(train.NonFiniteLossError, match="at step 3"):
        train.train_stage(stage, config, workdir, data, progress=False)
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "diffusion", "checkpoints"))
    assert ckpt.latest_step() == 2
    restored = ckpt.restore(checkpointing.abstract_like(
        train.init_state(stage, config, train.make_optimizer(config.train), seed=0)[1]))
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
    out = train.train_stage(stage, config, workdir, data, progress=False)
    assert out["step"] == 3 and not out["finished"]
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "diffusion", "checkpoints"))
    assert ckpt.latest_step() == 3
    ckpt.close()
    assert _train(config, workdir)["step"] == 5


def test_optimizer_schedules():
    cfg = ddpm.get_config("cpu").train
    tx = train.make_optimizer(cfg)
    assert tx is not None
    with pytest.raises(ValueError, match="unknown optimizer"):
        bad = copy.deepcopy(cfg)
        bad.optimizer = "sgd"
        train.make_optimizer(bad)


def test_ema_warmup_formula():
    assert float(train.ema_decay_at(0, 0.999)) == pytest.approx(0.1)
    assert float(train.ema_decay_at(10_000, 0.999)) == pytest.approx(0.999)
