"""Atomic writes: complete files only, usual permissions, nothing left behind on error."""

import json
import os
import stat

import numpy as np
import pytest

from uadjax import atomic


def test_write_json_replaces_atomically_with_umask_permissions(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic.write_json(path, {"x": np.float32(1.5), "n": np.int64(3)})
    assert json.loads(path.read_text()) == {"x": 1.5, "n": 3}
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert os.listdir(path.parent) == ["a.json"]


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "map.nii.gz"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic.atomic_path(path) as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["map.nii.gz"]
