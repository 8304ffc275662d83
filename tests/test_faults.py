"""Faults: kill -9 (also mid checkpoint write), corrupted checkpoints, non-finite updates,
checkpoints of another config, full or unwritable output folders, same seed same result."""

import copy
import errno
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
import pytest
from helpers_train import NanBatches

from configs import ddpm
from uadjax import atomic, checkpointing, evaluation, jobs, prediction, runs, train_state, trainer
from uadjax.methods import get_method

ROOT = Path(__file__).resolve().parents[1]

# Runs `python -m uadjax.main <args>`, but SIGKILLs itself right after `Checkpointer.save`
# of step $KILL_AFTER_SAVE_STEP returns, i.e. while orbax is still writing that step.
_KILL_DURING_SAVE = """
import os, signal, sys
from uadjax import checkpointing, main
kill_at = int(os.environ["KILL_AFTER_SAVE_STEP"])
save = checkpointing.Checkpointer.save
def save_then_die(self, step, *args, **kwargs):
    out = save(self, step, *args, **kwargs)
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
checkpointing.Checkpointer.save = save_then_die
sys.argv = ["uadjax", *sys.argv[1:]]
main.run()
"""

STEPS = 16


# The step-dependent parts of the real recipe (configs/common.cpu_training): an EMA of the
# weights, warm-up then cosine decay, gradient clipping. The kill / resume tests train with
# them, so a resume that lost the step count or the EMA would not be bitwise identical.
RECIPE = {"ema_decay": 0.99, "warmup_steps": 3, "lr_schedule": "cosine", "grad_clip": 1.0,
          "learning_rate": 1e-3}


def _config(tiny_data, **train):
    config = ddpm.get_config("tiny")
    config.data.phantom_dir = tiny_data.phantom_dir
    config.data.data_dir = tiny_data.data_dir
    config.train.update({"num_steps": STEPS, "checkpoint_every_steps": 1, "log_every_steps": 1,
                         "val_every_steps": 0, "tensorboard": False, **train})
    return config


def _cli_args(config, workdir):
    t = config.train
    return ["train", "--config=configs/ddpm.py:tiny", f"--workdir={workdir}",
            f"--config.data.phantom_dir={config.data.phantom_dir}",
            f"--config.data.data_dir={config.data.data_dir}",
            f"--config.train.num_steps={t.num_steps}",
            f"--config.train.checkpoint_every_steps={t.checkpoint_every_steps}",
            f"--config.train.log_every_steps={t.log_every_steps}",
            f"--config.train.ema_decay={t.ema_decay}",
            f"--config.train.warmup_steps={t.warmup_steps}",
            f"--config.train.lr_schedule={t.lr_schedule}",
            f"--config.train.grad_clip={t.grad_clip}",
            f"--config.train.learning_rate={t.learning_rate}",
            "--config.train.val_every_steps=0", "--config.train.tensorboard=False"]


def _env(**extra):
    # The subprocesses share the session's persistent compilation cache (conftest.py): the
    # reruns load the train step compiled before instead of compiling it again.
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def _stage():
    return get_method("ddpm").stage("diffusion")


def _train(config, workdir, **kwargs):
    stage = _stage()
    return trainer.train_stage(stage, config, str(workdir), jobs.make_train_data(config, stage),
                             progress=False, **kwargs)


def _saved_state(config, workdir, step=None):
    stage = _stage()
    _, state = trainer.init_state(stage, config, train_state.make_optimizer(config.train), seed=0)
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "diffusion", "checkpoints"),
                                      asynchronous=False)
    try:
        return jax.device_get(ckpt.restore(checkpointing.abstract_like(state), step=step))
    finally:
        ckpt.close()


def _assert_same_weights(a, b):
    for key in ("step", "params", "ema_params", "opt_state"):
        for x, y in zip(jax.tree.leaves(a[key]), jax.tree.leaves(b[key]), strict=True):
            np.testing.assert_array_equal(x, y)


def _assert_ema_is_its_own_state(state):
    """With EMA on, the averaged weights differ from the raw ones (else comparing both
    would compare the parameters twice)."""
    pairs = zip(jax.tree.leaves(state["ema_params"]), jax.tree.leaves(state["params"]),
                strict=True)
    assert not all(np.array_equal(e, p) for e, p in pairs)


def _checkpoints(workdir):
    return sorted(os.listdir(os.path.join(workdir, "diffusion", "checkpoints")))


def _finished_steps(workdir) -> int:
    return max((int(n) for n in _checkpoints(workdir) if n.isdigit()), default=0)


def test_kill9_at_random_moments_and_sigterm_then_rerun_is_bitwise_identical(tiny_data,
                                                                           tmp_path):
    config = _config(tiny_data, **RECIPE)
    straight = _train(config, tmp_path / "straight")["state"]
    _assert_ema_is_its_own_state(jax.device_get(straight))
    workdir = tmp_path / "killed"
    args = [*_cli_args(config, workdir)]

    # 1. killed while step 2's checkpoint is being written: a temporary folder is left.
    out = subprocess.run([sys.executable, "-c", _KILL_DURING_SAVE, *args], check=False, cwd=ROOT,
                         env=_env(KILL_AFTER_SAVE_STEP="2"), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    left = _checkpoints(workdir)
    assert "1" in left and "2" not in left and any("tmp" in name for name in left), left

    # 2., 3. killed at random moments once the resumed run is under way (seeded delays
    # after its first new checkpoint; a kill may land in a step or in a checkpoint write).
    rng = random.Random(0)
    for resume_from in (1, None):
        delay = rng.uniform(0.0, 0.3)
        before = _finished_steps(workdir)
        proc = subprocess.Popen([sys.executable, "-m", "uadjax.main", *args], cwd=ROOT,
                                env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        deadline = time.monotonic() + 300
        while _finished_steps(workdir) <= before and proc.poll() is None:
            assert time.monotonic() < deadline, "the resumed run never saved a checkpoint"
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        log = proc.communicate(timeout=60)[0]
        assert proc.returncode == -signal.SIGKILL, f"finished before the kill at +{delay:.2f} s"
        assert f"resuming from the checkpoint of step {resume_from or ''}" in log, log[-2000:]
        assert _finished_steps(workdir) < STEPS

    # 4. SIGTERM (a preemption notice): the run saves the step it is at and exits cleanly.
    before = _finished_steps(workdir)
    proc = subprocess.Popen([sys.executable, "-m", "uadjax.main", *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while _finished_steps(workdir) <= before and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, log[-2000:]
    saved = int(log.split("SIGTERM: saved checkpoint at step ")[1].split(";")[0])
    assert saved == _finished_steps(workdir) < STEPS

    # 5. the same command again finishes the run.
    out = subprocess.run([sys.executable, "-m", "uadjax.main", *args], check=False, cwd=ROOT,
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resuming from the checkpoint of step" in out.stdout
    assert not any("tmp" in name for name in _checkpoints(workdir))
    _assert_same_weights(_saved_state(config, str(workdir)), jax.device_get(straight))


def test_corrupted_latest_checkpoint_falls_back_with_a_warning(tiny_data, tmp_path):
    config = _config(tiny_data, num_steps=4, checkpoint_every_steps=2, **RECIPE)
    straight = _train(config, tmp_path / "straight")["state"]
    _assert_ema_is_its_own_state(jax.device_get(straight))
    workdir = tmp_path / "run"
    _train(config, workdir)
    ckpt_dir = workdir / "diffusion" / "checkpoints"
    # Step 4's arrays replaced by step 2's: every file is valid, so OCDBT alone would
    # restore wrong weights under step 4's name; only the saved digest can tell.
    shutil.rmtree(ckpt_dir / "4" / "state")
    shutil.copytree(ckpt_dir / "2" / "state", ckpt_dir / "4" / "state")
    with pytest.warns(UserWarning, match="falling back to step 2.*integrity check failed"):
        assert int(_saved_state(config, str(workdir))["step"]) == 2
    # Evaluation scores with step 2 and says so in results.json and the report.
    with pytest.warns(UserWarning, match="falling back to step 2"):
        _, steps = runs.load_models_and_steps(config, str(workdir))
    assert steps == {"diffusion": {"step": 2, "latest_step": 4, "fell_back": True,
                                   "selection": "latest", "val_loss": None,
                                   "trained_steps": 2, "num_steps": 4, "finished_steps": 2}}
    line = evaluation._checkpoint_line({"checkpoints": steps})
    assert ("diffusion step 2 (**unfinished**: 2 of 4 steps) (**not the latest**: step 4 "
            "could not be read") in line
    assert evaluation._checkpoint_line({"checkpoints": {}}) == "none (no trained stages)."
    # Training resumes from step 2, sets the bad step aside and redoes it exactly.
    config.train.num_steps = 4
    with pytest.warns(UserWarning, match="falling back to step 2"):
        resumed = _train(config, workdir)
    assert resumed["step"] == 4
    assert os.listdir(str(ckpt_dir) + "_corrupt")[0].startswith("4-")
    _assert_same_weights(jax.device_get(resumed["state"]), jax.device_get(straight))


def test_multi_host_runs_stop_instead_of_falling_back(tmp_path, monkeypatch):
    """With more than one process a bad latest step is an error naming it (each host would
    otherwise choose its own fallback step), and nothing is moved aside; one process falls
    back (the control)."""
    directory = tmp_path / "checkpoints"
    ckpt = checkpointing.Checkpointer(str(directory), asynchronous=False)
    state = {"w": np.arange(8, dtype=np.float32), "step": np.int32(0)}
    for step in (1, 2):
        ckpt.save(step, {**state, "step": np.int32(step)}, config={"method": "ddpm"})
    ckpt.close()
    shutil.rmtree(directory / "2" / "state")
    shutil.copytree(directory / "1" / "state", directory / "2" / "state")  # digest mismatch
    abstract = checkpointing.abstract_like(state)
    with monkeypatch.context() as patch:
        patch.setattr(checkpointing, "_multi_host", lambda: True)
        ckpt = checkpointing.Checkpointer(str(directory), asynchronous=False)
        with pytest.raises(checkpointing.CheckpointError,
                           match=r"step 2: integrity check failed.*multi-host runs do not fall "
                                 r"back on their own"):
            ckpt.restore(abstract, quarantine=True)
        ckpt.close()
    assert (directory / "2").is_dir() and not (tmp_path / "checkpoints_corrupt").exists()
    ckpt = checkpointing.Checkpointer(str(directory), asynchronous=False)
    with pytest.warns(UserWarning, match="falling back to step 1"):
        assert int(ckpt.restore(abstract)["step"]) == 1
    ckpt.close()


def test_half_written_or_unreadable_checkpoints(tiny_data, tmp_path):
    config = _config(tiny_data, num_steps=4, checkpoint_every_steps=2)
    workdir = tmp_path / "run"
    _train(config, workdir)
    ckpt_dir = workdir / "diffusion" / "checkpoints"
    # A step folder that never got renamed (killed mid-write, or a save in progress) is
    # ignored; loading for evaluation leaves it alone, training removes it.
    os.rename(ckpt_dir / "4", ckpt_dir / "4.orbax-checkpoint-tmp-1")
    _, steps = runs.load_models_and_steps(config, str(workdir))
    assert steps["diffusion"]["step"] == 2 and not steps["diffusion"]["fell_back"]
    assert (ckpt_dir / "4.orbax-checkpoint-tmp-1").is_dir()
    assert int(_saved_state(config, str(workdir))["step"]) == 2
    assert not (ckpt_dir / "4.orbax-checkpoint-tmp-1").exists()
    # Every step unreadable: an error naming the folder and each step, never a silent restart.
    for step in ("2",):
        for name in glob.glob(str(ckpt_dir / step / "state" / "ocdbt.process_0" / "d" / "*")):
            Path(name).write_bytes(b"")
    with pytest.raises(checkpointing.CheckpointError, match=r"no checkpoint can be restored.*step 2"):
        _train(config, workdir)


def test_checkpoint_of_another_method_or_network_is_refused(tiny_data, tmp_path):
    config = _config(tiny_data, num_steps=2, checkpoint_every_steps=2)
    _train(config, tmp_path / "run")
    wider = copy.deepcopy(config)
    wider.model.base_channels = 16
    with pytest.raises(checkpointing.CheckpointError, match=r"differs .* model\.base_channels"):
        _train(wider, tmp_path / "run")
    other = copy.deepcopy(config)
    other.method = "pddpm"
    with pytest.raises(checkpointing.CheckpointError, match="trained by method 'ddpm'"):
        runs.load_stage_models(other, str(tmp_path / "run"), _stage())


def test_non_finite_updates_are_skipped_when_configured(tiny_data, tmp_path, capsys):
    """'skip': the NaN batch's update is dropped (parameters, EMA and optimiser state after
    it equal those before it); 'stop' (past max_skipped_steps): the run raises naming the
    step and the last checkpoint is the last good state."""
    config = _config(tiny_data, num_steps=5, checkpoint_every_steps=1, max_checkpoints=10,
                     on_non_finite="skip", max_skipped_steps=1, **RECIPE)
    stage = _stage()
    data = jobs.make_train_data(config, stage)
    data.train_iter = NanBatches(data.train_iter, bad=lambda i: i == 2)  # step 3
    out = trainer.train_stage(stage, config, str(tmp_path / "skip"), data, progress=False)
    assert out["finished"] and "non-finite loss or gradient at step(s) [2]" in capsys.readouterr().out
    before = _saved_state(config, str(tmp_path / "skip"), step=2)
    after = _saved_state(config, str(tmp_path / "skip"), step=3)
    for key in ("params", "ema_params", "opt_state"):
        for x, y in zip(jax.tree.leaves(before[key]), jax.tree.leaves(after[key]), strict=True):
            np.testing.assert_array_equal(x, y)
    later = _saved_state(config, str(tmp_path / "skip"), step=4)  # good batches train again
    assert not all(np.array_equal(x, y) for x, y in zip(
        jax.tree.leaves(after["params"]), jax.tree.leaves(later["params"]), strict=True))
    saved = _saved_state(config, str(tmp_path / "skip"))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved))
    # Past max_skipped_steps the run stops, naming the step; the last checkpoint is the
    # state before that step (finite, the earlier skipped step dropped as well).
    data = jobs.make_train_data(config, stage)
    data.train_iter = NanBatches(data.train_iter, bad=lambda i: i in (1, 3))  # steps 2, 4
    with pytest.raises(trainer.NonFiniteLossError, match="last at step 3"):
        trainer.train_stage(stage, config, str(tmp_path / "stop"), data, progress=False)
    assert _finished_steps(tmp_path / "stop") == 3
    kept = _saved_state(config, str(tmp_path / "stop"))
    assert int(kept["step"]) == 3 and all(np.isfinite(x).all() for x in jax.tree.leaves(kept))
    first = _saved_state(config, str(tmp_path / "stop"), step=1)
    second = _saved_state(config, str(tmp_path / "stop"), step=2)  # step 2 was skipped
    for x, y in zip(jax.tree.leaves(first["params"]), jax.tree.leaves(second["params"]),
                    strict=True):
        np.testing.assert_array_equal(x, y)


def _two_scans(tiny_run, folder):
    root = jobs.dataset_dir(tiny_run)
    ids = sorted(p.name for p in root.iterdir() if p.is_dir())[:2]
    folder.mkdir()
    for sid in ids:
        (folder / f"{sid}.nii.gz").write_bytes((root / sid / f"{sid}_t2.nii.gz").read_bytes())
    return ids


def test_disk_full_during_predict_leaves_no_partial_output_and_rerun_completes(
        tiny_run, tmp_path, monkeypatch):
    ids = _two_scans(tiny_run, tmp_path / "in")
    out = tmp_path / "out"
    real_save = prediction.nifti.save_nifti_atomic
    calls = []

    def full_after_three_files(path, *args, **kwargs):  # scan 1: 2 maps, scan 2: 1 map
        calls.append(path)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(prediction.nifti, "save_nifti_atomic", full_after_three_files)
    with pytest.raises(prediction.OutputError, match=r"No space left on device. 1 of 2 scans"):
        prediction.predict_paths(tiny_run.workdir, str(tmp_path / "in"), str(out), progress=False)
    assert sorted(os.listdir(out)) == sorted(f"{ids[0]}{s}" for s in (
        "_anomaly.nii.gz", "_segmentation.nii.gz", "_overview.png"))
    monkeypatch.setattr(prediction.nifti, "save_nifti_atomic", real_save)
    report = prediction.predict_paths(tiny_run.workdir, str(tmp_path / "in"), str(out),
                                   progress=False)
    assert report.skipped == [ids[0]] and len(report.written) == 3 and report.ok
    assert len(os.listdir(out)) == 6


def test_unwritable_output_folder_fails_before_any_work(tiny_run, tmp_path, monkeypatch):
    _two_scans(tiny_run, tmp_path / "in")
    # /sys is read-only even for root; the CLI reports it in one line, with no traceback.
    out = subprocess.run(
        [sys.executable, "-m", "uadjax.main", "predict", f"--workdir={tiny_run.workdir}",
         f"--input={tmp_path / 'in'}", "--output=/sys/uadjax-out"], check=False, cwd=ROOT,
        env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "error: /sys/uadjax-out: cannot write to the output folder" in out.stderr
    assert "Traceback" not in out.stderr
    # In process, with every entry to scoring replaced by a tripwire: none is reached.
    def tripwire(*args, **kwargs):
        raise AssertionError("scoring started before the output folder was checked")

    with monkeypatch.context() as patch:
        for module, name in ((prediction, "make_batch_scorer"), (prediction, "predict_scan"),
                             (evaluation, "score_splits")):
            patch.setattr(module, name, tripwire)
        with pytest.raises(OSError, match="cannot write to the output folder"):
            prediction.predict_paths(tiny_run.workdir, str(tmp_path / "in"), "/sys/uadjax-out",
                                  progress=False)
        with pytest.raises(OSError, match="cannot write to the output folder"):
            evaluation.run_evaluation(tiny_run, tiny_run.workdir, out_dir="/sys/uadjax-eval",
                                    progress=False)
        # The tripwires are live: a writable folder reaches them.
        with pytest.raises(AssertionError, match="scoring started"):
            evaluation.run_evaluation(tiny_run, tiny_run.workdir, out_dir=str(tmp_path / "ok"),
                                    progress=False)


def test_disk_full_during_evaluation_keeps_the_previous_outputs(tiny_run, tmp_path, monkeypatch):
    out_dir = tmp_path / "eval"
    first = evaluation.run_evaluation(tiny_run, tiny_run.workdir, out_dir=str(out_dir),
                                    progress=False)
    step = int(tiny_run.train.num_steps)
    assert first["checkpoints"] == {"diffusion": {"step": step, "latest_step": step,
                                                  "fell_back": False, "selection": "latest",
                                                  "val_loss": None, "trained_steps": step,
                                                  "num_steps": step, "finished_steps": step}}
    assert f"Checkpoints: diffusion step {step}." in (out_dir / "report.md").read_text()
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "report.md")

    monkeypatch.setattr("uadjax.report.write_report", full)
    with pytest.raises(OSError, match="No space left"):
        evaluation.run_evaluation(tiny_run, tiny_run.workdir, out_dir=str(out_dir),
                                progress=False)
    after = {p.name: p.read_bytes() for p in out_dir.iterdir() if p.is_file()}
    assert after == before  # no new results.json beside an old report
    # No staging folder either; what stays is the store of scored volumes, for the rerun.
    assert [p.name for p in out_dir.iterdir() if p.is_dir()] == [".scored-volumes"]
    monkeypatch.undo()
    again = evaluation.run_evaluation(tiny_run, tiny_run.workdir, out_dir=str(out_dir),
                                    progress=False)
    # Same seed, same scores: every metric of the rerun equals the first evaluation.
    assert json.dumps(again["results"], sort_keys=True) == json.dumps(first["results"],
                                                                     sort_keys=True)
    assert not [p for p in os.listdir(out_dir) if p.startswith(".")]


def test_same_seed_same_prediction(tiny_run, tmp_path):
    _two_scans(tiny_run, tmp_path / "in")
    for name in ("a", "b"):
        report = prediction.predict_paths(tiny_run.workdir, str(tmp_path / "in"),
                                       str(tmp_path / name), progress=False)
        assert report.ok and len(report.written) == 6
    for path in sorted((tmp_path / "a").glob("*.nii.gz")):
        np.testing.assert_array_equal(np.asarray(nib.load(str(path)).dataobj),
                                      np.asarray(nib.load(str(tmp_path / "b" / path.name)).dataobj))


FRESH_PROCESS = """
import json, sys
from uadjax import xla_flags
xla_flags.set_cpu_flags()
import ml_collections
from uadjax import jobs
workdir, scans, maps, eval_dir = sys.argv[1:5]
config = ml_collections.ConfigDict(json.load(open(workdir + "/config.json")))
jobs.evaluate(config, workdir, out_dir=eval_dir, progress=False)
from uadjax import prediction
assert prediction.predict_paths(workdir, scans, maps, progress=False).ok
"""


def _without_timing(results: dict) -> dict:
    """results.json less what a rerun may change: wall-clock timings and the environment."""
    return {k: v for k, v in results.items() if k not in ("timing", "environment", "created")}


def test_same_seed_same_results_in_a_fresh_process(tiny_run, tmp_path):
    """Evaluation and prediction rerun in a new Python process (new JAX runtime, new
    compilation) reproduce this process's results.json, subjects.csv and maps exactly."""
    _two_scans(tiny_run, tmp_path / "in")
    here = prediction.predict_paths(tiny_run.workdir, str(tmp_path / "in"), str(tmp_path / "here"),
                                 progress=False)
    assert here.ok
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, tiny_run.workdir, str(tmp_path / "in"),
                    str(tmp_path / "fresh"), str(tmp_path / "eval")], check=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ours = json.loads((Path(tiny_run.workdir) / "eval" / "results.json").read_text())
    theirs = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert _without_timing(ours) == _without_timing(theirs)
    assert ((Path(tiny_run.workdir) / "eval" / "subjects.csv").read_bytes()
            == (tmp_path / "eval" / "subjects.csv").read_bytes())
    names = sorted(p.name for p in (tmp_path / "here").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "fresh").iterdir()) and len(names) == 6
    for name in names:
        if name.endswith(".nii.gz"):  # the voxels and the header (gzip stamps a time)
            a, b = (nib.load(str(tmp_path / d / name)) for d in ("here", "fresh"))
            np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
            assert a.header.binaryblock == b.header.binaryblock, name


def test_check_writable_names_the_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="cannot write to the output folder") as info:
        atomic.check_writable(blocker / "sub")
    assert info.value.filename == str(blocker / "sub")
