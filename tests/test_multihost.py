"""Multi-host runs with jax.distributed: two CPU processes on this machine.

Training: two processes (one CPU device each, localhost coordinator, gloo collectives) train
a tiny config for 2 steps, stop, and resume to 4 from their checkpoint; a single process
trains 4 steps straight. Each process reads only its rows of every global batch
(tests/test_pipeline.py checks that the parts form the single-process batch), so the
parameters at the end must agree.

Evaluation and prediction: each process scores its share of the volumes (scans); the
results must equal one process's, every scan is written by one process, and a run stopped
mid-way leaves no result and is completed by the rerun. The same command lines run on a TPU
pod slice or a GPU cluster with the coordinator's address (launch.sh).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
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


def _start(args, num_processes, args_of=None):
    """`num_processes` processes of one jax.distributed job (one CPU device each);
    `args_of(i, args)` may give process i other command-line arguments."""
    port = _free_port()
    distributed = {} if num_processes == 1 else {
        "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": num_processes}
    return [subprocess.Popen(
        args if args_of is None else args_of(i, args), cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
        env=_env(JAX_NUM_CPU_DEVICES=1, **distributed,
                 **({"JAX_PROCESS_ID": i} if distributed else {})))
        for i in range(num_processes)]


# `python -m uadjax.main ...`, except that the process freezes itself (SIGSTOP, as a lost
# host) right after it has saved its first scored volume: a deterministic point mid-way,
# past every barrier before scoring, whatever the machine's speed.
_FREEZE_AFTER_FIRST_VOLUME = """
import os, runpy, signal
from uadjax.inference import volume_store
save = volume_store.VolumeStore.save
def save_then_freeze(self, split, volume):
    save(self, split, volume)
    os.kill(os.getpid(), signal.SIGSTOP)
volume_store.VolumeStore.save = save_then_freeze
runpy.run_module("uadjax.main", run_name="__main__", alter_sys=True)
"""


def _freeze_process_1(i, args):
    assert args[1:3] == ["-m", "uadjax.main"]
    return args if i != 1 else [args[0], "-c", _FREEZE_AFTER_FIRST_VOLUME, *args[3:]]


def _stopped(proc) -> bool:
    """Whether the process is stopped (state T in /proc/<pid>/stat)."""
    stat = Path(f"/proc/{proc.pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "T"


def _run_processes(tiny_data, workdir, steps, num_processes):
    return _wait(_start(_train_args(tiny_data, workdir, steps), num_processes))


def _wait(procs):
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


def _evaluate_args(tiny_data, workdir):
    return [sys.executable, "-m", "uadjax.main", "evaluate", "--config=configs/ddpm.py:tiny",
            f"--workdir={workdir}", f"--config.data.phantom_dir={tiny_data.phantom_dir}",
            f"--config.data.data_dir={tiny_data.data_dir}"]


def _trained_copy(tiny_run, folder):
    """The tiny run's trained checkpoints, without its evaluation."""
    shutil.copytree(tiny_run.workdir, folder, ignore=shutil.ignore_patterns("eval"))
    return folder


def _results_without_timing(eval_dir):
    data = json.loads((eval_dir / "results.json").read_text())
    data.pop("timing")
    return data


@pytest.mark.slow
def test_two_processes_evaluate_like_one_and_a_stopped_run_resumes(tiny_data, tiny_run,
                                                                     tmp_path):
    single = _trained_copy(tiny_run, tmp_path / "single")
    _wait(_start(_evaluate_args(tiny_data, single), 1))

    # Two processes; process 1 freezes (a lost host) once it has saved its first volume, so
    # process 0 scores its share and waits at the barrier: then both are killed.
    multi = _trained_copy(tiny_run, tmp_path / "multi")
    store = multi / "eval" / ".scored-volumes"
    from uadjax import jobs
    from uadjax.evaluation import EVAL_SPLITS, split_subjects

    index = jobs.ensure_shards(tiny_run, progress=False)
    present = [s for s in EVAL_SPLITS if any(e["split"] == s for e in index["subjects"])]
    entries = split_subjects(index, present)
    share_0 = [store / e["split"] / f"{e['id']}.npz" for e in entries[0::2]]
    assert len(entries[1::2]) >= 2  # process 1 stops with some of its share left
    procs = _start(_evaluate_args(tiny_data, multi), 2, args_of=_freeze_process_1)
    try:
        deadline = time.monotonic() + 600
        while not (_stopped(procs[1]) and all(p.exists() for p in share_0)):
            assert time.monotonic() < deadline, "process 0 did not score its share"
            assert procs[0].poll() is None and procs[1].poll() is None, "a process ended"
            time.sleep(0.05)
        time.sleep(1.0)  # process 0 is now blocked at the barrier; nothing more is written
        assert procs[0].poll() is None
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()
    assert not (multi / "eval" / "results.json").exists()  # nothing looks complete
    kept = len(list(store.glob("*/*.npz")))
    assert kept == len(share_0) + 1  # process 0's share and process 1's first volume

    outputs = _wait(_start(_evaluate_args(tiny_data, multi), 2))
    assert f"resuming an interrupted evaluation: {kept} volume(s) already scored" in outputs[0]
    assert not store.exists()  # removed once the outputs are written
    assert _results_without_timing(multi / "eval") == _results_without_timing(single / "eval")
    assert (multi / "eval" / "subjects.csv").read_bytes() == \
        (single / "eval" / "subjects.csv").read_bytes()
    timing = json.loads((multi / "eval" / "results.json").read_text())["timing"]
    assert timing["processes"] == 2
    # Each process's share of the rerun: the volumes that were missing, nothing twice.
    assert sum(t["volumes_scored"] for t in timing["per_process"]) == len(entries) - kept
    assert timing["per_process"][0]["volumes_scored"] == 0  # its share was already stored


@pytest.mark.slow
def test_two_processes_predict_each_scan_once(tiny_run, tmp_path):
    import nibabel as nib

    from uadjax import jobs

    root = jobs.dataset_dir(tiny_run)
    inputs = tmp_path / "in"
    inputs.mkdir()
    subjects = sorted(p.name for p in root.iterdir() if p.is_dir())[:3]
    for sid in subjects:
        nib.save(nib.load(str(root / sid / f"{sid}_t2.nii.gz")), str(inputs / f"{sid}.nii.gz"))
    out = tmp_path / "out"
    args = [sys.executable, "-m", "uadjax.main", "predict", f"--workdir={tiny_run.workdir}",
            f"--input={inputs}", f"--output={out}"]
    outputs = _wait(_start(args, 2))
    assert "predict: 3 scan(s) written, 0 skipped (outputs exist), 0 failed" in outputs[0]
    assert "predict: 1 scan(s) written" in outputs[1]  # its share: the second scan
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(f"{sid}{suffix}" for sid in subjects
                             for suffix in ("_anomaly.nii.gz", "_segmentation.nii.gz",
                                            "_overview.png"))  # no report left behind
    # The maps equal a single process's.
    single = tmp_path / "single"
    _wait(_start([*args[:-1], f"--output={single}"], 1))
    for sid in subjects:
        a = nib.load(str(out / f"{sid}_anomaly.nii.gz")).get_fdata()
        b = nib.load(str(single / f"{sid}_anomaly.nii.gz")).get_fdata()
        np.testing.assert_array_equal(a, b)
    rerun = _wait(_start(args, 2))
    assert "predict: 0 scan(s) written, 3 skipped" in rerun[0]


_FAIL_ON_PROCESS_1 = """
import jax
from uadjax import parallel
parallel.initialize_distributed()
index = jax.process_index()
print("gathered", parallel.gather_json({"process": index, "text": "é" * index}))
with parallel.together("the test block"):
    if jax.process_index() == 1:
        raise ValueError("boom on process 1")
print("after the block")
"""


@pytest.mark.slow
def test_a_process_that_fails_stops_the_others_instead_of_hanging():
    procs = _start([sys.executable, "-c", _FAIL_ON_PROCESS_1], 2)
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=120)[0])
    finally:
        for proc in procs:
            proc.kill()
    assert all("gathered [{'process': 0, 'text': ''}, {'process': 1, 'text': 'é'}]" in out
               for out in outputs), outputs
    assert procs[1].returncode != 0 and "boom on process 1" in outputs[1]
    assert procs[0].returncode != 0, outputs[0]
    assert "the test block: another process failed" in outputs[0]
    assert not any("after the block" in out for out in outputs)
