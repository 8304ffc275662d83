"""NIfTI loading, subject loading and the atomic writer."""

import nibabel as nib
import numpy as np
import pytest
from helpers_data import DEFAULT_AFFINE, write_tiny_dataset

from uadjax.data import nifti
from uadjax.data.schema import DataError


def _save(path, array, affine=DEFAULT_AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


def test_load_nifti_reads_data_and_affine(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    vol = nifti.load_nifti(_save(tmp_path / "a.nii.gz", data))
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, DEFAULT_AFFINE)
    assert vol.data.dtype == np.float32


def test_load_nifti_squeezes_singleton_fourth_axis(tmp_path):
    data = np.ones((4, 5, 6, 1), np.float32)
    vol = nifti.load_nifti(_save(tmp_path / "a.nii.gz", data))
    assert vol.data.shape == (4, 5, 6)


def test_load_label_binarises(tmp_path):
    data = np.array([0, 1, 2, 0, 5, 0], np.int16).reshape(1, 2, 3)
    vol = nifti.load_label(_save(tmp_path / "seg.nii.gz", data))
    assert vol.data.dtype == np.uint8
    np.testing.assert_array_equal(vol.data, (data > 0).astype(np.uint8))


def test_save_nifti_atomic_round_trip_leaves_no_temp_file(tmp_path):
    data = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)
    out = nifti.save_nifti_atomic(tmp_path / "sub" / "map.nii.gz", data, DEFAULT_AFFINE)
    img = nib.load(str(out))
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)
    np.testing.assert_allclose(img.affine, DEFAULT_AFFINE)
    assert [p.name for p in out.parent.iterdir()] == ["map.nii.gz"]


def test_save_nifti_atomic_bool_and_header(tmp_path):
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm")
    out = nifti.save_nifti_atomic(tmp_path / "m.nii", np.ones((2, 2, 2), bool), np.eye(4),
                                  header=header)
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.uint8
    assert img.header.get_xyzt_units()[0] == "mm"


def test_load_subject_from_manifest(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds")
    manifest = nifti.read_manifest(root)
    entry = next(e for e in manifest["subjects"] if e["kind"] != "healthy")
    files = nifti.subject_files(root, entry, ("t2", "t1"))
    assert list(files.images) == ["t2", "t1"]
    subject = nifti.load_subject(files)
    assert subject.reference.path.name.endswith("_t2.nii.gz")
    assert subject.seg.data.sum() > 0
    assert subject.brainmask.data.dtype == np.uint8


def test_subject_files_missing_modality_names_subject(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds")
    entry = nifti.read_manifest(root)["subjects"][0]
    with pytest.raises(DataError, match=r"sub-0001.*'flair'"):
        nifti.subject_files(root, entry, ("t1", "flair"))
