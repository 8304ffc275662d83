"""Multi-host data parallelism with jax.distributed: two CPU processes on this machine.

Two processes (one CPU device each, localhost coordinator, gloo collectives) train a tiny
config for 2 steps, stop, and resume to 4 from their checkpoint; a single process with two
devices trains 4 steps straight. Each process reads only its rows of every global batch
(tests/test_pipeline.py checks that the parts form the single-process batch), so the
parameters at the end must agree. The same command line runs on a TPU pod slice or a GPU
cluster with the coordinator's address (launch.sh).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from uadjax.metric_writer import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _train_args(tiny_data, workdir, steps):
    return [sys.executable, "-m", "uadjax.main", "train", "--config=configs/ddpm.py:tiny",
            f"--workdir={workdir}", f"--config.data.phantom_dir={tiny_data.phantom_dir}",
            f"--config.data.data_dir={tiny_data.data_dir}", f"--config.train.num_steps={steps}",
            "--config.train.checkpoint_every_steps=100", "--config.train.val_every_steps=0",
            "--config.train.batch_size=8", "--config.train.tensorboard=False",
            "--config.train.learning_rate=0.001", "--config.train.log_every_steps=1"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_", "XLA_FLAGS", "UADJAX_DISTRIBUTED"))}
    env.update(JAX_PLATFORMS="cpu", **{k: str(v) for k, v in extra.items()})
    return env


def _run_processes(tiny_data, workdir, steps, num_processes):
    port = _free_port()
    procs = [subprocess.Popen(
        _train_args(tiny_data, workdir, steps), cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
        env=_env(JAX_NUM_CPU_DEVICES=1, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                 JAX_NUM_PROCESSES=num_processes, JAX_PROCESS_ID=i))
        for i in range(num_processes)]
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=300)
            outputs.append(out)
    finally:
        for proc in procs:
            proc.kill()
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-3000:]
    return outputs


def _params(model):
    from flax import nnx

    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _config(tiny_data, steps):
    from configs import ddpm

    config = ddpm.get_config("tiny")
    config.data.phantom_dir = tiny_data.phantom_dir
    config.data.data_dir = tiny_data.data_dir
    config.train.update(num_steps=steps, checkpoint_every_steps=100, val_every_steps=0,
                        batch_size=8, tensorboard=False, learning_rate=1e-3,
                        log_every_steps=1)
    return config


@pytest.mark.slow
def test_two_processes_train_stop_resume_like_one(tiny_data, tmp_path):
    from uadjax import jobs, runs, train_state, trainer
    from uadjax.methods import get_method

    stage = get_method("ddpm").stages[0]
    config = _config(tiny_data, 4)
    # The reference: this (single) process, all of its devices, 4 steps straight.
    out = trainer.train_stage(stage, config, str(tmp_path / "single"),
                            jobs.make_train_data(config, stage), progress=False)
    single = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(out["state"]["params"]))]

    _run_processes(tiny_data, tmp_path / "multi", 2, num_processes=2)  # then "preempted"
    ckpt = tmp_path / "multi" / "diffusion" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) == ["2"]
    outputs = _run_processes(tiny_data, tmp_path / "multi", 4, num_processes=2)
    assert all("resuming from the checkpoint of step 2" in out for out in outputs), outputs
    assert max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == 4

    _, init = trainer.init_state(stage, config, train_state.make_optimizer(config.train), seed=0)
    moved = max(float(np.max(np.abs(a - np.asarray(b)))) for a, b in
                zip(single, jax.tree.leaves(jax.device_get(init["params"])), strict=True))
    assert moved > 1e-3  # training moved the parameters far beyond the tolerance below

    # The same global batches and the same maths: loss and gradient norm of every step.
    logs = {name: [r for r in read_metrics(str(tmp_path / name / "diffusion" / "metrics.jsonl"))
                   if r["split"] == "train"] for name in ("single", "multi")}
    assert [r["step"] for r in logs["multi"]] == [1, 2, 3, 4]  # process 0 alone writes them
    for a, b in zip(logs["single"], logs["multi"], strict=True):
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a, b)

    model = runs.load_stage_models(config, str(tmp_path / "multi"), stage, use_ema=False)
    multi = _params(model)
    assert len(multi) == len(single)
    diff = np.concatenate([np.abs(a - b).ravel() for a, b in zip(single, multi, strict=True)])
    # Float noise only (8 devices here, 2 there: other reduction orders). Adam turns it into
    # up to one learning-rate step (1e-3) where a gradient is nothing but noise (zero-
    # initialised outputs: the update is lr * sign(g)); everywhere else it stays tiny.
    assert diff.max() < 1e-3, diff.max()
    assert np.mean(diff < 1e-5) > 0.99, np.mean(diff < 1e-5)
