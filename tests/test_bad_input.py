"""Every kind of bad input raises DataError naming the file; preparation survives them."""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers_data import DEFAULT_AFFINE, tiny_config, write_tiny_dataset

from uadjax.data import builder, nifti, preprocess
from uadjax.data.schema import DataError

CONFIG_FILE = Path(__file__).resolve().parents[1] / "configs" / "data.py"


def _save(path, array, affine=DEFAULT_AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


@pytest.fixture()
def dataset(tmp_path):
    return write_tiny_dataset(tmp_path / "ds", shape=(10, 12, 8))


def _entry(root, sid):
    return next(e for e in nifti.read_manifest(root)["subjects"] if e["id"] == sid)


def _load(root, sid, modalities=("t1", "t2")):
    files = nifti.subject_files(root, _entry(root, sid), modalities)
    return preprocess.preprocess_files(files, tiny_config(image_size=(8, 8)))


def test_missing_file(tmp_path):
    path = tmp_path / "absent_t1.nii.gz"
    with pytest.raises(DataError, match="absent_t1.nii.gz.*not found"):
        nifti.load_nifti(path)


def test_missing_file_listed_in_manifest(dataset):
    (dataset / "sub-0002" / "sub-0002_t2.nii.gz").unlink()
    with pytest.raises(DataError, match="sub-0002_t2.nii.gz"):
        _load(dataset, "sub-0002")


def test_truncated_gzip(dataset):
    path = dataset / "sub-0001" / "sub-0001_t1.nii.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="sub-0001_t1.nii.gz.*truncated") as info:
        nifti.load_nifti(path)
    assert info.value.path == str(path)


def test_not_a_nifti_file(tmp_path):
    path = tmp_path / "garbage.nii"
    path.write_bytes(b"not a nifti header at all" * 20)
    with pytest.raises(DataError, match="garbage.nii.*unreadable"):
        nifti.load_nifti(path)


def test_two_dimensional_volume(tmp_path):
    path = _save(tmp_path / "flat.nii.gz", np.ones((6, 7), np.float32), np.eye(4))
    with pytest.raises(DataError, match=r"flat.nii.gz.*3D.*\(6, 7\)"):
        nifti.load_nifti(path)


def test_four_dimensional_volume(tmp_path):
    path = _save(tmp_path / "series.nii.gz", np.ones((4, 5, 6, 2), np.float32), np.eye(4))
    with pytest.raises(DataError, match=r"series.nii.gz.*3D.*\(4, 5, 6, 2\)"):
        nifti.load_nifti(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_voxels(tmp_path, bad):
    data = np.ones((4, 5, 6), np.float32)
    data[1, 2, 3] = bad
    path = _save(tmp_path / "bad_t2.nii.gz", data)
    with pytest.raises(DataError, match="bad_t2.nii.gz.*1 NaN/Inf"):
        nifti.load_nifti(path)


def test_empty_brain_mask_file(dataset):
    path = dataset / "sub-0001" / "sub-0001_brainmask.nii.gz"
    _save(path, np.zeros((10, 12, 8), np.uint8))
    with pytest.raises(DataError, match="sub-0001_brainmask.nii.gz.*empty brain mask"):
        _load(dataset, "sub-0001")


def test_empty_brain_from_nonzero_voxels(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds", shape=(10, 12, 8), with_brainmask=False)
    for mod in ("t1", "t2"):
        _save(root / "sub-0001" / f"sub-0001_{mod}.nii.gz", np.zeros((10, 12, 8), np.float32))
    with pytest.raises(DataError, match="sub-0001_t1.nii.gz.*empty brain mask"):
        _load(root, "sub-0001")


def test_seg_shape_mismatch(dataset):
    path = dataset / "sub-0003" / "sub-0003_seg.nii.gz"
    _save(path, np.zeros((10, 12, 9), np.uint8))
    with pytest.raises(DataError, match=r"sub-0003_seg.nii.gz.*shape \(10, 12, 9\)"):
        _load(dataset, "sub-0003")


def test_mask_shape_mismatch(dataset):
    path = dataset / "sub-0001" / "sub-0001_brainmask.nii.gz"
    _save(path, np.ones((11, 12, 8), np.uint8))
    with pytest.raises(DataError, match=r"sub-0001_brainmask.nii.gz.*shape"):
        _load(dataset, "sub-0001")


def test_modality_affine_mismatch(dataset):
    path = dataset / "sub-0001" / "sub-0001_t2.nii.gz"
    img = nib.load(str(path))
    shifted = DEFAULT_AFFINE.copy()
    shifted[0, 3] += 0.5
    _save(path, np.asarray(img.dataobj), shifted)
    with pytest.raises(DataError, match="sub-0001_t2.nii.gz.*affine differs"):
        _load(dataset, "sub-0001")


def test_affine_difference_within_tolerance_is_accepted(dataset):
    path = dataset / "sub-0001" / "sub-0001_t2.nii.gz"
    img = nib.load(str(path))
    _save(path, np.asarray(img.dataobj), DEFAULT_AFFINE + 1e-5)
    assert _load(dataset, "sub-0001").images.shape[-1] == 2


def test_subject_missing_a_modality(dataset):
    with pytest.raises(DataError, match="sub-0004.*no 'pd' modality"):
        _load(dataset, "sub-0004", modalities=("t1", "pd"))


def test_missing_manifest(tmp_path):
    with pytest.raises(DataError, match="manifest.json"):
        nifti.read_manifest(tmp_path)


def test_prepare_skips_broken_subject_and_reports_it(tmp_path, dataset):
    broken = dataset / "sub-0002" / "sub-0002_t1.nii.gz"
    broken.write_bytes(broken.read_bytes()[:100])
    manifest = json.loads((dataset / "manifest.json").read_text())
    del manifest["subjects"][5]["files"]["t2"]  # sub-0006 (test_lesion) lacks t2.
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    config = tiny_config(image_size=(8, 8))
    data_dir = tmp_path / "data"
    report = builder.prepare_dataset(dataset, data_dir, config, progress=False)

    assert not report.ok
    failed = {f["subject"]: f for f in report.failures}
    assert set(failed) == {"sub-0002", "sub-0006"}
    assert "sub-0002_t1.nii.gz" in failed["sub-0002"]["path"]
    assert "t2" in failed["sub-0006"]["problem"]
    assert report.num_subjects == {"train": 2, "val_healthy": 1, "val_lesion": 1,
                                   "test_healthy": 1}
    index = builder.load_volumes_index(data_dir, config)
    assert {e["id"] for e in index["subjects"]} == {
        "sub-0001", "sub-0003", "sub-0004", "sub-0005", "sub-0007"}
    assert {f["subject"] for f in index["failures"]} == {"sub-0002", "sub-0006"}
    assert len(builder.load_split(data_dir, config, "val_lesion")) == 8
    with pytest.raises(KeyError, match="test_lesion"):
        builder.load_split(data_dir, config, "test_lesion")
    # Nothing temporary is left next to the shards.
    assert [p.name for p in data_dir.iterdir()] == ["uadjax_slices"]
    assert not any("tmp" in p.name or "incomplete" in p.name for p in data_dir.rglob("*"))


def test_prepare_cli_exit_status_on_failure(tmp_path, dataset):
    from data_prep import prepare

    shutil.rmtree(dataset / "sub-0007")
    status = prepare.main(["--dataset_dir", str(dataset), "--out", str(tmp_path / "data"),
                           "--config", f"{CONFIG_FILE}:tiny", "--modalities", "t1,t2",
                           "--quiet"])
    assert status == 1
    index = builder.load_volumes_index(tmp_path / "data", _cli_config())
    assert [f["subject"] for f in index["failures"]] == ["sub-0007"]
    assert len(index["subjects"]) == 6


def _cli_config():
    from configs import data as data_config

    config = data_config.get_config("tiny:t1,t2")
    config.dataset = "tiny"
    return config
