"""The bad-input corpus: every kind of broken input raises `DataError` naming the file and
the problem; preparation reports it per subject, goes on with the others, and exits non-zero
(without a traceback) when nothing could be prepared.

Sections: (1) file-level cases of `nifti.load_nifti`, one table; (2) unreadable files and
memory; (3) one subject's files against each other (shapes, affines, labels, contrast);
(4) manifests (ids, emptiness); (5) preparation as a whole (per-subject reports, exit
statuses, the cache). Dataset-adapter cases (duplicate ids after sanitising, spaces and
non-ASCII paths, unexpected label values of a dataset's labelling, ids that cannot leave the
output folder, 4D series) are in tests/test_datasets.py; config keys that do not exist in
tests/test_cli.py.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers_data import DEFAULT_AFFINE, tiny_config, write_tiny_dataset

from uadjax.data import builder, dataset_folder, nifti, preprocess
from uadjax.data.schema import DataError

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILE = ROOT / "configs" / "data.py"
SHAPE = (10, 12, 8)
TWO_SUBJECTS = (("sub-0001", "train", "healthy"), ("sub-0002", "train", "healthy"))


def _save(path, array, affine=DEFAULT_AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


def _write_raw(path, shape=(4, 5, 6), data=None, **fields):
    """A single-file NIfTI written byte by byte, so header fields stay as given (nibabel's
    writer would 'fix' a zero pixdim or refuse a zero affine)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    for key, value in fields.items():
        header[key] = value
    if data is None:
        data = np.ones(shape, np.float32).tobytes(order="F")
    Path(path).write_bytes(header.binaryblock + b"\0" * 4 + data)
    return path


def _sform(rows):
    rows = np.asarray(rows, np.float64)
    return {"sform_code": 1, "srow_x": rows[0], "srow_y": rows[1], "srow_z": rows[2]}


@pytest.fixture()
def dataset(tmp_path):
    return write_tiny_dataset(tmp_path / "ds", shape=SHAPE)


def _entry(root, sid):
    return next(e for e in nifti.read_manifest(root)["subjects"] if e["id"] == sid)


def _load(root, sid, modalities=("t1", "t2"), **overrides):
    files = nifti.subject_files(root, _entry(root, sid), modalities)
    return preprocess.preprocess_files(files, tiny_config(image_size=(8, 8), **overrides))


def _edit_manifest(root, edit):
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


# --------------------------------------------------------------- (1) one file: the table


def _truncated_gzip(tmp_path, name="cut_t1.nii.gz"):
    path = _save(tmp_path / name, np.random.default_rng(0).normal(size=SHAPE))
    path.write_bytes(path.read_bytes()[:200])
    return path


def _directory(tmp_path):
    path = tmp_path / "folder.nii.gz"
    path.mkdir()
    return path


def _bytes(name, content=b""):
    def make(tmp_path):
        path = tmp_path / name
        path.write_bytes(content)
        return path
    return make


def _with_bad_voxel(value):
    def make(tmp_path):
        data = np.ones((4, 5, 6), np.float32)
        data[1, 2, 3] = value
        return _save(tmp_path / "bad_t2.nii.gz", data)
    return make


def _shaped(shape):
    return lambda tmp_path: _save(tmp_path / "shaped.nii.gz", np.ones(shape, np.float32),
                                  np.eye(4))


def _voxel_affine(spacing):
    return lambda tmp_path: _save(tmp_path / "vox.nii.gz", np.ones((4, 5, 6), np.float32),
                                  np.diag([*spacing, 1.0]))


def _raw(**fields):
    return lambda tmp_path: _write_raw(tmp_path / "hdr.nii", **fields)


FILE_CASES = [
    pytest.param(lambda p: p / "absent_t1.nii.gz", r"^file not found$", id="missing"),
    pytest.param(_bytes("zero.nii.gz"), r"^empty file \(0 bytes\)$", id="zero-length-nii-gz"),
    pytest.param(_bytes("zero.nii"), r"^empty file \(0 bytes\)$", id="zero-length-nii"),
    pytest.param(_directory, r"^is a directory, not a NIfTI file$", id="directory"),
    pytest.param(_bytes("garbage.nii", b"not a nifti header" * 30),
                 "^unreadable or truncated NIfTI file", id="not-nifti"),
    pytest.param(_bytes("fake.nii.gz", b"\x1f\x8b\x08\x00 not gzip"),
                 "^unreadable or truncated NIfTI file", id="not-gzip"),
    pytest.param(_truncated_gzip, "unreadable or truncated", id="truncated-gzip"),
    pytest.param(lambda p: _truncated_gzip(p, "süb 1 T1 ü.nii.gz"), "truncated",
                 id="non-ascii-name-with-spaces"),
    pytest.param(_shaped((6, 7)), r"expected a 3D volume, got a 2D image of shape \(6, 7\)",
                 id="2d"),
    pytest.param(_shaped((4, 5, 6, 2)), r"3D volume, got a 4D file with 2 volumes", id="4d"),
    pytest.param(_shaped((4, 5, 6, 1, 2)),
                 r"expected a 3D volume, got a 5D image of shape \(4, 5, 6, 1, 2\)", id="5d"),
    pytest.param(_shaped((10, 0, 8)), r"zero-sized axis in shape \(10, 0, 8\)",
                 id="zero-sized-axis"),
    pytest.param(_with_bad_voxel(np.nan), "^1 NaN/Inf voxels$", id="nan"),
    pytest.param(_with_bad_voxel(np.inf), "^1 NaN/Inf voxels$", id="inf"),
    pytest.param(_with_bad_voxel(-np.inf), "^1 NaN/Inf voxels$", id="minus-inf"),
    pytest.param(_raw(pixdim=[1, 0, 1, 1, 1, 1, 1, 1]), r"absurd voxel size \(pixdim \(0, 1, 1\)",
                 id="pixdim-zero"),
    pytest.param(_raw(pixdim=[1, -1.5, 1, 1, 1, 1, 1, 1]),
                 r"absurd voxel size \(pixdim \(-1.5, 1, 1\)", id="pixdim-negative"),
    pytest.param(_raw(pixdim=[1, np.nan, 1, 1, 1, 1, 1, 1]), r"absurd voxel size.*nan",
                 id="pixdim-nan"),
    pytest.param(_raw(**_sform(np.zeros((3, 4)))), r"absurd voxel size \(0, 0, 0\) mm",
                 id="zero-affine"),
    pytest.param(_raw(**_sform([[np.nan, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]])),
                 r"non-finite affine \(voxel size \(nan, 1, 1\) mm\)", id="nan-affine"),
    pytest.param(_raw(**_sform([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]])),
                 r"singular affine", id="singular-affine"),
    pytest.param(_voxel_affine((50.0, 1.0, 1.0)), r"absurd voxel size \(50, 1, 1\) mm "
                 r"\(expected 0.01 to 20 mm per axis\)", id="voxel-50mm"),
    pytest.param(_voxel_affine((1.0, 0.001, 1.0)), r"absurd voxel size \(1, 0.001, 1\) mm",
                 id="voxel-1um"),
]


@pytest.mark.parametrize("make, problem", FILE_CASES)
def test_bad_file(tmp_path, make, problem):
    path = make(tmp_path)
    with pytest.raises(DataError) as info:
        nifti.load_nifti(path)
    assert info.value.path == str(path)
    assert str(info.value).startswith(f"{path}: ")
    assert re.search(problem, info.value.problem), info.value.problem


def test_singleton_trailing_axes_are_3d(tmp_path):
    for shape in ((4, 5, 6, 1), (4, 5, 6, 1, 1)):
        assert nifti.load_nifti(_shaped(shape)(tmp_path)).data.shape == (4, 5, 6)


def test_non_ascii_name_with_spaces_loads(tmp_path):
    path = _save(tmp_path / "Zürich scan 1_t2.nii.gz", np.ones((4, 5, 6), np.float32))
    assert nifti.load_nifti(path).path == path


# ------------------------------------------------------- (2) unreadable files and memory


def test_unreadable_file_permission_denied(tmp_path, monkeypatch):
    path = _save(tmp_path / "locked_t1.nii.gz", np.ones((4, 5, 6), np.float32))
    path.chmod(0)
    if os.access(path, os.R_OK):  # root ignores permissions: simulate what others get.
        def denied(file, *args, **kwargs):
            if Path(file) == path:
                raise PermissionError(13, "Permission denied", str(file))
            return open(file, *args, **kwargs)
        monkeypatch.setattr(nifti, "open", denied, raising=False)
    try:
        with pytest.raises(DataError, match=r"locked_t1.nii.gz: not readable \(permission "
                                            r"denied\)$"):
            nifti.load_nifti(path)
    finally:
        path.chmod(0o644)


def test_available_memory_is_known_here():
    free = nifti.available_memory()
    assert free is None or free > 0


def test_too_large_for_memory_refused_from_the_header(tmp_path, monkeypatch):
    """The header claims 4000 x 4000 x 3000 voxels but holds 4 bytes: the refusal comes
    before any voxel is read (reading would report a truncated file)."""
    monkeypatch.setattr(nifti, "available_memory", lambda: int(15.6 * nifti.GIB))
    path = _write_raw(tmp_path / "huge_t1.nii", shape=(4000, 4000, 3000), data=b"\0" * 4)
    message = (r"huge_t1.nii: image of shape \(4000, 4000, 3000\) would need 178.8 GiB as "
               r"float32, more than the 15.6 GiB of memory available")
    with pytest.raises(DataError, match=message):
        nifti.load_nifti(path)
    with pytest.raises(DataError, match=message):  # the dataset adapters' header check
        dataset_folder.check_header(path)


def test_too_large_for_memory_small_file(tmp_path, monkeypatch):
    monkeypatch.setattr(nifti, "available_memory", lambda: 1000)
    path = _save(tmp_path / "t1.nii.gz", np.ones((10, 10, 10), np.float32))
    with pytest.raises(DataError, match=r"t1.nii.gz: image of shape \(10, 10, 10\) would "
                                        r"need 3.9 KiB as float32, more than the 1000 B"):
        nifti.load_nifti(path)


def test_resampling_too_large_for_memory_refused_before_resampling(dataset, monkeypatch):
    monkeypatch.setattr(nifti, "available_memory", lambda: 10 * 2 ** 20)
    with pytest.raises(DataError, match=r"sub-0001_t1.nii.gz: resampled image of shape "
                                        r"\(\d+, \d+, \d+\) would need [\d.]+ [KMG]iB as "
                                        r"float32, more than the 10.0 MiB"):
        _load(dataset, "sub-0001", target_spacing=(0.05, 0.05, 0.05))


# ------------------------------------------------------ (3) one subject's files together


def test_missing_file_listed_in_manifest(dataset):
    (dataset / "sub-0002" / "sub-0002_t2.nii.gz").unlink()
    with pytest.raises(DataError, match="sub-0002_t2.nii.gz: file not found"):
        _load(dataset, "sub-0002")


def test_subject_missing_a_modality(dataset):
    with pytest.raises(DataError, match="sub-0004: subject sub-0004 has no 'pd' modality"):
        _load(dataset, "sub-0004", modalities=("t1", "pd"))


@pytest.mark.parametrize("value, problem", [(5, r"file of 't1' is 5, not a path"),
                                            ("  ", r"file of 't1' is '  ', not a path"),
                                            (None, "has no 't1' modality")])
def test_manifest_file_entry_is_not_a_path(dataset, value, problem):
    _edit_manifest(dataset, lambda m: m["subjects"][0]["files"].update(t1=value))
    with pytest.raises(DataError, match=f"sub-0001: subject sub-0001.*{problem}"):
        _load(dataset, "sub-0001")


def test_empty_brain_mask_file(dataset):
    _save(dataset / "sub-0001" / "sub-0001_brainmask.nii.gz", np.zeros(SHAPE, np.uint8))
    with pytest.raises(DataError, match="sub-0001_brainmask.nii.gz: empty brain mask"):
        _load(dataset, "sub-0001")


def test_empty_brain_from_nonzero_voxels(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds", shape=SHAPE, with_brainmask=False)
    for mod in ("t1", "t2"):
        _save(root / "sub-0001" / f"sub-0001_{mod}.nii.gz", np.zeros(SHAPE, np.float32))
    with pytest.raises(DataError, match="sub-0001_t1.nii.gz: empty brain mask"):
        _load(root, "sub-0001")


@pytest.mark.parametrize("name, shape", [("seg", (10, 12, 9)), ("brainmask", (11, 12, 8))])
def test_label_shape_mismatch(dataset, name, shape):
    sid = "sub-0003"
    _save(dataset / sid / f"{sid}_{name}.nii.gz", np.ones(shape, np.uint8))
    with pytest.raises(DataError, match=rf"{sid}_{name}.nii.gz: shape \({shape[0]}, "
                                        rf"{shape[1]}, {shape[2]}\) does not match "
                                        rf"{sid}_t1.nii.gz shape \(10, 12, 8\)"):
        _load(dataset, sid)


@pytest.mark.parametrize("name", ["t2", "seg", "brainmask"])
def test_affine_mismatch(dataset, name):
    path = dataset / "sub-0003" / f"sub-0003_{name}.nii.gz"
    shifted = DEFAULT_AFFINE.copy()
    shifted[0, 3] += 0.5
    _save(path, np.asarray(nib.load(str(path)).dataobj), shifted)
    with pytest.raises(DataError, match=rf"sub-0003_{name}.nii.gz: affine differs from "
                                        r"sub-0003_t1.nii.gz by 0.5 \(tolerance 0.001\)"):
        _load(dataset, "sub-0003")


def test_affine_difference_within_tolerance_is_accepted(dataset):
    path = dataset / "sub-0001" / "sub-0001_t2.nii.gz"
    _save(path, np.asarray(nib.load(str(path)).dataobj), DEFAULT_AFFINE + 1e-5)
    assert _load(dataset, "sub-0001").images.shape[-1] == 2


def _seg_times(dataset, factor, dtype):
    path = dataset / "sub-0003" / "sub-0003_seg.nii.gz"
    seg = np.asarray(nib.load(str(path)).dataobj)
    _save(path, (seg.astype(np.float64) * factor).astype(dtype))
    return seg


@pytest.mark.parametrize("factor, dtype, problem", [
    (-1, np.int16, r"unexpected label values \[-1\]: label maps hold 0..255"),
    (300, np.int16, r"unexpected label values \[300\]: label maps hold 0..255"),
    (0.5, np.float32, r"unexpected label values \[0.5\]: label maps hold whole numbers"),
])
def test_unexpected_segmentation_values(dataset, factor, dtype, problem):
    _seg_times(dataset, factor, dtype)
    with pytest.raises(DataError, match=f"sub-0003_seg.nii.gz: {problem}"):
        _load(dataset, "sub-0003")


def test_segmentation_labels_above_one_are_lesion(dataset):
    """CONTRACTS.md: a dataset folder's seg is uint8 with >0 = lesion (e.g. BraTS 1/2/4)."""
    seg = _seg_times(dataset, 7, np.uint8)
    assert _load(dataset, "sub-0003").seg.sum() == seg.sum() > 0


def test_probability_brain_mask_is_refused(dataset):
    path = dataset / "sub-0001" / "sub-0001_brainmask.nii.gz"
    mask = np.asarray(nib.load(str(path)).dataobj).astype(np.float32)
    _save(path, mask * 0.8)
    with pytest.raises(DataError, match=r"sub-0001_brainmask.nii.gz: unexpected label values "
                                        r"\[0.8\]"):
        _load(dataset, "sub-0001")


@pytest.mark.parametrize("normalisation", preprocess.NORMALISATIONS)
def test_constant_image(dataset, normalisation):
    """Normalisation used to turn it silently into zeros (percentile, quantile) or -3 (mmccd)."""
    _save(dataset / "sub-0001" / "sub-0001_t2.nii.gz", np.full(SHAPE, 5.0, np.float32))
    with pytest.raises(DataError, match=r"sub-0001_t2.nii.gz: constant image \(every voxel is "
                                        r"5\): no contrast to normalise"):
        _load(dataset, "sub-0001", normalisation=normalisation)


def test_constant_zero_modality_without_brain_mask(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds", shape=SHAPE, with_brainmask=False)
    _save(root / "sub-0001" / "sub-0001_t2.nii.gz", np.zeros(SHAPE, np.float32))
    with pytest.raises(DataError, match=r"sub-0001_t2.nii.gz: constant image \(every voxel is "
                                        r"0\)"):
        _load(root, "sub-0001")


def test_no_contrast_inside_the_brain(dataset):
    brain = np.asarray(nib.load(str(dataset / "sub-0001/sub-0001_brainmask.nii.gz")).dataobj)
    _save(dataset / "sub-0001" / "sub-0001_t1.nii.gz", np.where(brain > 0, 5.0, 0.0))
    with pytest.raises(DataError, match=r"sub-0001_t1.nii.gz: no contrast inside the brain "
                                        r"mask \(every brain voxel is 5\)"):
        _load(dataset, "sub-0001")


# ------------------------------------------------------------------------ (4) manifests


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(DataError, match=r"nowhere: dataset folder not found"):
        nifti.read_manifest(tmp_path / "nowhere")


def test_empty_dataset_folder(tmp_path):
    with pytest.raises(DataError, match=r"manifest.json: manifest.json not found \(the "
                                        r"dataset folder is empty\)"):
        nifti.read_manifest(tmp_path)


def test_missing_manifest_in_non_empty_folder(dataset):
    (dataset / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"manifest.json: manifest.json not found$"):
        nifti.read_manifest(dataset)


@pytest.mark.parametrize("text, problem", [("{not json", "unreadable manifest"),
                                           ("[]", "manifest has no 'subjects' list"),
                                           ('{"subjects": {}}', "manifest has no 'subjects' list"),
                                           ('{"subjects": []}', "manifest lists no subjects")])
def test_bad_or_empty_manifest(dataset, text, problem):
    (dataset / "manifest.json").write_text(text)
    with pytest.raises(DataError, match=f"manifest.json: {problem}"):
        nifti.read_manifest(dataset)


@pytest.mark.parametrize("second", ["sub-0001", "SUB-0001"])
def test_duplicate_subject_ids(dataset, second):
    _edit_manifest(dataset, lambda m: m["subjects"][1].update(id=second))
    with pytest.raises(DataError, match=rf"manifest.json: duplicate subject id '{second}' "
                                        r"\(subjects 0 and 1"):
        nifti.read_manifest(dataset)


@pytest.mark.parametrize("sid, problem", [
    ("../x", "unsafe subject id '../x'"), ("/abs", "unsafe subject id '/abs'"),
    ("a/b", "unsafe subject id 'a/b'"), ("a\\b", r"unsafe subject id 'a\\\\b'"),
    ("..", "unsafe subject id '..'"), (".hidden", "unsafe subject id '.hidden'"),
    ("x\x00y", r"unsafe subject id 'x\\x00y'"), (" padded", "unsafe subject id ' padded'"),
    ("", "subject 2 has no id"), (None, "subject 2 has no id"), (7, "subject 2 has no id"),
])
def test_unsafe_subject_ids(dataset, tmp_path, sid, problem):
    """Ids name the cache files `<id>.npz`: none may lead out of the folder."""
    _edit_manifest(dataset, lambda m: m["subjects"][2].update(id=sid))
    with pytest.raises(DataError, match=f"manifest.json: {problem}"):
        nifti.read_manifest(dataset)
    with pytest.raises(DataError, match=f"manifest.json: {problem}"):
        builder.prepare_dataset(dataset, tmp_path / "data", tiny_config(), progress=False)
    assert not list((tmp_path / "data").rglob("*.npz"))
    assert not (tmp_path / "x.npz").exists() and not Path("/abs.npz").exists()


def test_non_ascii_and_space_ids_are_allowed(dataset):
    _edit_manifest(dataset, lambda m: m["subjects"][0].update(id="sub ü1"))
    assert nifti.read_manifest(dataset)["subjects"][0]["id"] == "sub ü1"


# ------------------------------------------------------------- (5) preparation as a whole


def test_prepare_skips_broken_subjects_and_reports_each(tmp_path, dataset):
    broken = dataset / "sub-0002" / "sub-0002_t1.nii.gz"
    broken.write_bytes(broken.read_bytes()[:100])
    _save(dataset / "sub-0004" / "sub-0004_t2.nii.gz", np.zeros(SHAPE, np.float32))
    _edit_manifest(dataset, lambda m: m["subjects"][5]["files"].pop("t2"))  # sub-0006
    config = tiny_config(image_size=(8, 8))
    data_dir = tmp_path / "data"
    report = builder.prepare_dataset(dataset, data_dir, config, progress=False)

    assert not report.ok
    failed = {f["subject"]: f for f in report.failures}
    assert set(failed) == {"sub-0002", "sub-0004", "sub-0006"}
    assert failed["sub-0002"]["path"].endswith("sub-0002_t1.nii.gz")
    assert "truncated" in failed["sub-0002"]["problem"]
    assert "constant image" in failed["sub-0004"]["problem"]
    assert "no 't2' modality" in failed["sub-0006"]["problem"]
    for sid in failed:
        assert f"FAILED {sid}: " in report.summary()
    assert report.num_subjects == {"train": 2, "val_lesion": 1, "test_healthy": 1}
    index = builder.load_volumes_index(data_dir, config)
    assert {e["id"] for e in index["subjects"]} == {"sub-0001", "sub-0003", "sub-0005",
                                                    "sub-0007"}
    assert {f["subject"] for f in index["failures"]} == set(failed)
    assert len(builder.load_split(data_dir, config, "val_lesion")) == 8
    with pytest.raises(KeyError, match="test_lesion"):
        builder.load_split(data_dir, config, "test_lesion")
    # Nothing temporary is left next to the shards.
    assert [p.name for p in data_dir.iterdir()] == ["uadjax_slices"]
    assert not any("tmp" in p.name or "incomplete" in p.name for p in data_dir.rglob("*"))


def test_prepare_where_every_subject_fails_keeps_earlier_shards(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds", subjects=TWO_SUBJECTS, shape=SHAPE)
    config = tiny_config(image_size=(8, 8))
    data_dir = tmp_path / "data"
    assert builder.prepare_dataset(root, data_dir, config, progress=False).ok
    before = builder.load_volumes_index(data_dir, config)
    (root / "sub-0001" / "sub-0001_t1.nii.gz").write_bytes(b"")
    _save(root / "sub-0002" / "sub-0002_t2.nii.gz", np.full(SHAPE, 3.0, np.float32))
    with pytest.raises(DataError) as info:
        builder.prepare_dataset(root, data_dir, config, progress=False)
    assert info.value.path == str(root / "manifest.json")
    lines = info.value.problem.splitlines()
    assert lines[0] == "no subject could be prepared (2 failed):"
    assert lines[1].startswith("  sub-0001: ") and lines[1].endswith(
        "sub-0001_t1.nii.gz: empty file (0 bytes)")
    assert "sub-0002_t2.nii.gz: constant image" in lines[2]
    assert builder.load_volumes_index(data_dir, config) == before
    assert [p.name for p in data_dir.iterdir()] == ["uadjax_slices"]


def _prepare_cli(dataset, out, *extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "data_prep.prepare", "--dataset_dir", str(dataset), "--out",
         str(out), "--config", f"{CONFIG_FILE}:tiny", "--modalities", "t1,t2", "--quiet",
         *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_prepare_cli_every_subject_fails(tmp_path):
    root = write_tiny_dataset(tmp_path / "my data", subjects=TWO_SUBJECTS, shape=SHAPE)
    (root / "sub-0001" / "sub-0001_t1.nii.gz").write_bytes(b"")
    (root / "sub-0002" / "sub-0002_t2.nii.gz").unlink()
    out = _prepare_cli(root, tmp_path / "data")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "no subject could be prepared (2 failed)" in out.stderr
    assert f"{root / 'sub-0001' / 'sub-0001_t1.nii.gz'}: empty file (0 bytes)" in out.stderr
    assert f"{root / 'sub-0002' / 'sub-0002_t2.nii.gz'}: file not found" in out.stderr
    assert not list((tmp_path / "data").iterdir())


def test_main_prepare_every_subject_fails(tmp_path):
    """`python -m uadjax.main prepare` on a dataset folder: exit 2, each failure named."""
    root = write_tiny_dataset(tmp_path / "ds", subjects=TWO_SUBJECTS, shape=SHAPE)
    (root / "sub-0001" / "sub-0001_t1.nii.gz").write_bytes(b"")
    (root / "sub-0002" / "sub-0002_t2.nii.gz").write_bytes(b"\x1f\x8b not gzip")
    out = subprocess.run(
        [sys.executable, "-m", "uadjax.main", "prepare", "--config=configs/ddpm.py:tiny",
         f"--config.data.dataset_dir={root}", f"--config.data.data_dir={tmp_path / 'data'}",
         "--config.data.modalities=t1,t2"], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert f"sub-0001: {root}/sub-0001/sub-0001_t1.nii.gz: empty file (0 bytes)" in out.stderr
    assert f"sub-0002: {root}/sub-0002/sub-0002_t2.nii.gz: unreadable or truncated" in out.stderr


def test_modalities_from_a_flag_are_split():
    for value in ("t1,t2", ("t1,t2",), ["t1", " t2"]):
        assert preprocess.PreprocessConfig.from_config({"modalities": value}).modalities == (
            "t1", "t2")


def test_prepare_cli_some_subjects_fail(tmp_path, dataset):
    from data_prep import prepare

    shutil.rmtree(dataset / "sub-0007")
    status = prepare.main(["--dataset_dir", str(dataset), "--out", str(tmp_path / "data"),
                           "--config", f"{CONFIG_FILE}:tiny", "--modalities", "t1,t2",
                           "--quiet"])
    assert status == 1
    index = builder.load_volumes_index(tmp_path / "data", _cli_config())
    assert [f["subject"] for f in index["failures"]] == ["sub-0007"]
    assert len(index["subjects"]) == 6


@pytest.mark.parametrize("case, message", [
    ("empty folder", "manifest.json not found (the dataset folder is empty)"),
    ("no subjects", "manifest lists no subjects"),
    ("bad config", "config file not found"),
    ("bad variant", "unknown data config variant 'nope'"),
])
def test_prepare_cli_nothing_to_do(tmp_path, capsys, case, message):
    from data_prep import prepare

    root = tmp_path / "ds"
    root.mkdir()
    config = f"{CONFIG_FILE}:tiny"
    if case == "no subjects":
        (root / "manifest.json").write_text('{"dataset": "x", "subjects": []}')
    elif case == "bad config":
        config = str(tmp_path / "missing.py")
    elif case == "bad variant":
        config = f"{CONFIG_FILE}:nope"
    status = prepare.main(["--dataset_dir", str(root), "--out", str(tmp_path / "data"),
                           "--config", config, "--quiet"])
    assert status == 2
    assert message in capsys.readouterr().err


def _cli_config():
    from configs import data as data_config

    config = data_config.get_config("tiny:t1,t2")
    config.dataset = "tiny"
    return config


class _Planted:
    """Unpickling this creates `marker`: stands for any code a pickle can run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_cache_holding_a_pickle_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "sub-0001.npz"
    planted = np.empty(1, dtype=object)
    planted[0] = _Planted(marker)
    np.savez(path, images=planted, brain_mask=np.zeros((2, 3, 3), bool),
             seg=np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(DataError, match=r"sub-0001.npz: cached volume holds pickled Python "
                                        r"objects; refusing to load it"):
        builder.load_cached_volume(path)
    assert not marker.exists()
    # The plant is live: a loader that allowed pickles would have run it.
    with np.load(path, allow_pickle=True) as data:
        assert data["images"].dtype == object
    assert marker.exists()


def test_cache_round_trip_and_missing_array(tmp_path):
    path = tmp_path / "s.npz"
    arrays = {"images": np.ones((2, 3, 3, 1), np.float32),
              "brain_mask": np.ones((2, 3, 3), bool), "seg": np.zeros((2, 3, 3), np.uint8)}
    np.savez(path, **arrays)
    loaded = builder.load_cached_volume(path)
    assert all(np.array_equal(loaded[k], v) for k, v in arrays.items())
    np.savez(path, images=arrays["images"])
    with pytest.raises(DataError, match=r"s.npz: cached volume lacks the arrays "
                                        r"\['brain_mask', 'seg'\]"):
        builder.load_cached_volume(path)

