"""The command line: modes, config files with overrides, clear errors."""

import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, "-m", "uadjax.main", *args], capture_output=True, check=False,
                          text=True, timeout=120)


def test_unknown_override_key_is_an_error(tmp_path):
    out = _run("train", "--config=configs/ddpm.py:tiny", f"--workdir={tmp_path}",
               "--config.train.no_such_key=1")
    assert out.returncode != 0
    assert "no_such_key" in out.stderr


def test_unknown_mode_and_missing_workdir(tmp_path):
    out = _run("fly", "--config=configs/ddpm.py:tiny")
    assert out.returncode != 0 and "modes" in out.stderr
    out = _run("train", "--config=configs/ddpm.py:tiny")
    assert out.returncode != 0 and "--workdir" in out.stderr


def test_predict_without_a_run_fails_clearly(tmp_path):
    out = _run("predict", f"--workdir={tmp_path}", f"--input={tmp_path}",
               f"--output={tmp_path / 'o'}")
    assert out.returncode != 0 and "not a trained run" in out.stderr
