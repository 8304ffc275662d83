"""predict: maps come back with the input's shape and affine; batches resume and report."""

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from uadjax import jobs, predict, runs


def _phantom_t2(tiny_run):
    root = jobs.dataset_dir(tiny_run)
    sid = min(p.name for p in root.iterdir() if p.is_dir())
    return nib.load(str(root / sid / f"{sid}_t2.nii.gz"))


def _reoriented(img):
    """Same anatomy, other voxel order (LPS-like flips, swapped axes) and 1.5 mm voxels."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    data = np.flip(np.swapaxes(data, 0, 1), axis=1)
    affine = np.diag([-1.5, 1.5, 1.5, 1.0])
    affine[:3, 3] = [60.0, -80.0, -50.0]
    return nib.Nifti1Image(np.ascontiguousarray(data), affine)


def test_predict_keeps_shape_and_affine_and_resumes(tiny_run, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    original = _phantom_t2(tiny_run)
    nib.save(original, str(inputs / "scanA.nii.gz"))
    moved = _reoriented(original)
    nib.save(moved, str(inputs / "scanB.nii.gz"))
    (inputs / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    out = tmp_path / "out"
    report = predict.predict_paths(tiny_run.workdir, str(inputs), str(out), progress=False)
    assert len(report.failures) == 1 and "broken.nii.gz" in report.failures[0][0]
    assert not report.ok
    for name, img in (("scanA", original), ("scanB", moved)):
        for suffix in ("_anomaly.nii.gz", "_segmentation.nii.gz"):
            result = nib.load(str(out / f"{name}{suffix}"))
            assert result.shape == img.shape
            np.testing.assert_allclose(result.affine, img.affine, atol=1e-5)
        seg = np.asarray(nib.load(str(out / f"{name}_segmentation.nii.gz")).dataobj)
        assert set(np.unique(seg)) <= {0, 1}
        assert (out / f"{name}_overview.png").stat().st_size > 0
    assert not [p for p in os.listdir(out) if ".tmp" in p]
    again = predict.predict_paths(tiny_run.workdir, str(inputs), str(out), progress=False)
    assert sorted(again.skipped) == ["scanA", "scanB"] and not again.written


def test_predict_needs_an_evaluated_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a trained run"):
        runs.load_run(str(tmp_path))


def test_find_scans_groups_modalities(tmp_path):
    for name in ("s1_t2.nii.gz", "s1_flair.nii.gz", "s2_t2.nii.gz", "s1_t2_anomaly.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    scans = predict.find_scans(str(tmp_path), ("t2", "flair"))
    assert set(scans) == {"s1", "s2"} and set(scans["s1"]) == {"t2", "flair"}
    single = predict.find_scans(str(tmp_path), ("t2",))
    assert "s1_t2_anomaly" not in single and len(single) == 3
    with pytest.raises(Exception, match="not found"):
        predict.find_scans(str(Path(tmp_path) / "nope"), ("t2",))
