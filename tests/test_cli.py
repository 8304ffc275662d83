"""The command line: modes, config files with overrides, clear errors."""

import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, "-m", "uadjax.main", *args], capture_output=True, check=False,
                          text=True, timeout=120)


def _clean_error(out, needle):
    """Exit status 2, no traceback anywhere, and the message on one line of stderr."""
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if needle in line]
    assert lines, out.stderr[-2000:]


def test_unknown_override_key_is_an_error(tmp_path):
    out = _run("train", "--config=configs/ddpm.py:tiny", f"--workdir={tmp_path}",
               "--config.train.no_such_key=1")
    _clean_error(out, "the config has no key 'no_such_key'")


def test_unknown_config_modifier_and_value_are_errors(tmp_path):
    out = _run("train", "--config=configs/ddpm.py:tiny,nope", f"--workdir={tmp_path}")
    _clean_error(out, "unknown ddpm config modifiers ['nope']")
    out = _run("train", "--config=configs/ddpm.py:tiny", f"--workdir={tmp_path}",
               "--config.train.optimizer=sgd")
    _clean_error(out, "unknown optimizer 'sgd'")


def test_unknown_mode_and_missing_workdir(tmp_path):
    out = _run("fly", "--config=configs/ddpm.py:tiny")
    _clean_error(out, "modes: phantom, prepare")
    out = _run("train", "--config=configs/ddpm.py:tiny")
    _clean_error(out, "needs --workdir")


def test_predict_without_a_run_fails_clearly(tmp_path):
    out = _run("predict", f"--workdir={tmp_path}", f"--input={tmp_path}",
               f"--output={tmp_path / 'o'}")
    _clean_error(out, "not a trained run")


# Bad input at the command line, for the modes that take a trained run: one line naming the
# input and the problem, no traceback; exit 2 when nothing could be done, 1 when some
# inputs failed and the others were written (reported one per line).


def _tiny_args(tiny_run):
    return ["--config=configs/ddpm.py:tiny", f"--config.data.phantom_dir={tiny_run.data.phantom_dir}",
            f"--config.data.data_dir={tiny_run.data.data_dir}"]


def _no_traceback(out):
    assert "Traceback" not in out.stderr, out.stderr[-3000:]


def test_predict_bad_inputs_are_reported_per_file(tiny_run, tmp_path):
    from uadjax import jobs

    root = jobs.dataset_dir(tiny_run)
    sid = min(p.name for p in root.iterdir() if p.is_dir())
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "good scan é.nii.gz").write_bytes((root / sid / f"{sid}_t2.nii.gz").read_bytes())
    (scans / "empty.nii.gz").write_bytes(b"")
    (scans / "notes.nii").write_text("not an image")
    out = _run("predict", f"--workdir={tiny_run.workdir}", f"--input={scans}",
               f"--output={tmp_path / 'maps'}")
    _no_traceback(out)
    assert out.returncode == 1
    assert "1 scan(s) written" in out.stdout and "2 failed" in out.stdout
    assert "empty.nii.gz: empty file (0 bytes)" in out.stdout
    assert "notes.nii: unreadable or truncated NIfTI file" in out.stdout
    assert (tmp_path / "maps" / "good scan é_anomaly.nii.gz").is_file()
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    out = _run("predict", f"--workdir={tiny_run.workdir}", f"--input={empty}",
               f"--output={tmp_path / 'maps2'}")
    _no_traceback(out)
    assert out.returncode == 2 and f"{empty}: no NIfTI scans" in out.stderr


def test_evaluate_or_train_on_a_foreign_or_missing_run(tiny_run, tmp_path):
    out = _run("evaluate", *_tiny_args(tiny_run), f"--workdir={tmp_path / 'never_trained'}")
    _no_traceback(out)
    assert out.returncode == 2 and "has no checkpoint" in out.stderr
    # tiny_run is a DDPM run: resuming it as pDDPM is refused, naming both methods.
    out = _run("train", "--config=configs/pddpm.py:tiny",
               f"--config.data.phantom_dir={tiny_run.data.phantom_dir}",
               f"--config.data.data_dir={tiny_run.data.data_dir}", f"--workdir={tiny_run.workdir}")
    _no_traceback(out)
    assert out.returncode == 2 and "trained by method 'ddpm'" in out.stderr
