"""Preprocessing: normalisations against their formulas, geometry, slicing and `to_native`."""

import json

import nibabel as nib
import numpy as np
import pytest
from helpers_data import DEFAULT_AFFINE, tiny_config, write_tiny_dataset
from scipy import ndimage

from uadjax.data import nifti, preprocess
from uadjax.data.preprocess import PreprocessedVolume, VolumeGeometry


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("ds"))


def _files(root, sid="sub-0005", modalities=("t1", "t2")):
    entry = next(e for e in nifti.read_manifest(root)["subjects"] if e["id"] == sid)
    return nifti.subject_files(root, entry, modalities)


def _volume_and_brain(seed=0):
    rng = np.random.default_rng(seed)
    x = np.zeros((6, 7, 8), np.float32)
    mask = np.zeros_like(x, bool)
    mask[1:5, 1:6, 2:7] = True
    x[mask] = rng.uniform(50.0, 150.0, size=mask.sum())
    return x, mask


def test_percentile_normalise_matches_torchio_formula():
    x, mask = _volume_and_brain()
    out = preprocess.percentile_normalise(x, mask, (1.0, 99.0))
    p1, p99 = np.percentile(x[mask], [1.0, 99.0])
    clipped = np.clip(x, p1, p99)
    np.testing.assert_allclose(out, (clipped - p1) / (p99 - p1), atol=1e-6)
    assert out.min() == 0.0 and out.max() == pytest.approx(1.0)
    assert np.all(out[~mask] == 0.0)


def test_percentile_normalise_positive_background_uses_clipped_min_max():
    x, mask = _volume_and_brain()
    x = x + 10.0  # Background 10 lies below p1 of the brain: still clipped up to p1.
    out = preprocess.percentile_normalise(x, mask, (5.0, 95.0))
    p5, p95 = np.percentile(x[mask], [5.0, 95.0])
    np.testing.assert_allclose(out, (np.clip(x, p5, p95) - p5) / (p95 - p5), atol=1e-6)


def test_quantile_normalise_matches_disyre_formula():
    x, _ = _volume_and_brain()
    x[0, 0, 0] = -5.0  # Negatives are clipped to 0 first.
    out = preprocess.quantile_normalise(x, 0.98)
    v = np.maximum(x, 0)
    q0, q98 = np.quantile(v, [0.0, 0.98])
    np.testing.assert_allclose(out, np.clip((v - q0) / (q98 - q0), 0, 1), atol=1e-6)
    assert out.min() == 0.0 and out.max() == 1.0


def test_mmccd_normalise_brain_percentiles():
    x, mask = _volume_and_brain()
    out = preprocess.mmccd_normalise(x, mask, (2.0, 90.0), (-3.0, 3.0), "brain")
    lo, hi = np.percentile(x[mask], 2.0), np.percentile(x[mask], 90.0)
    np.testing.assert_allclose(out, (x - lo) / (hi - lo) * 6.0 - 3.0, rtol=1e-5, atol=1e-5)
    assert np.mean(out[mask] <= -3.0 + 1e-5) == pytest.approx(0.02, abs=0.01)
    assert np.mean(out[mask] > 3.0) == pytest.approx(0.10, abs=0.01)


def test_mmccd_normalise_volume_lower_is_code_behaviour():
    x, mask = _volume_and_brain()
    out = preprocess.mmccd_normalise(x, mask, (2.0, 90.0), (-3.0, 3.0), "volume")
    u = np.percentile(x[mask], 90.0)
    np.testing.assert_allclose(out, 6.0 * x / u - 3.0, rtol=1e-5, atol=1e-5)
    assert np.all(out[~mask] == -3.0)


def test_normalise_dispatch_and_unknown_name():
    x, mask = _volume_and_brain()
    np.testing.assert_array_equal(
        preprocess.normalise(x, mask, tiny_config(normalisation="none")), x)
    with pytest.raises(ValueError, match="normalisation"):
        tiny_config(normalisation="zscore")


def test_preprocess_shapes_dtypes_and_geometry_json(dataset):
    vol = preprocess.preprocess_files(_files(dataset), tiny_config())
    d = vol.num_slices
    assert vol.images.shape == (d, 16, 20, 2) and vol.images.dtype == np.float32
    assert vol.brain_mask.shape == (d, 16, 20) and vol.brain_mask.dtype == bool
    assert vol.seg.shape == (d, 16, 20) and vol.seg.dtype == np.uint8
    assert set(np.unique(vol.seg)) == {0, 1}
    assert vol.images.min() == 0.0 and vol.images.max() == pytest.approx(1.0)
    text = json.dumps(vol.geometry.to_dict())
    assert VolumeGeometry.from_dict(json.loads(text)) == vol.geometry
    assert vol.subject_id == "sub-0005" and vol.kind == "tumour"


def test_reorientation_and_preprocessed_affine_point_to_the_same_voxels(dataset):
    files = _files(dataset)
    vol = preprocess.preprocess_files(files, tiny_config(normalisation="none"))
    original = nib.load(str(files.images["t2"]))
    data = np.asarray(original.dataobj)
    to_voxel = np.linalg.inv(original.affine) @ vol.geometry.preprocessed_affine
    # Canonical (RAS) order: the stored affine flips x, so the canonical x axis runs R->L.
    assert vol.geometry.canonical_affine[0][0] > 0
    for d, h, w in [(3, 5, 7), (10, 8, 2), (0, 15, 19)]:
        i, j, k = np.rint(to_voxel @ [d, h, w, 1.0])[:3].astype(int)
        inside = all(0 <= a < n for a, n in zip((i, j, k), data.shape))
        expected = data[i, j, k] if inside else 0.0
        assert vol.images[d, h, w, 1] == pytest.approx(expected)


def test_to_native_round_trip_is_exact_inside_crop_without_resampling(dataset):
    files = _files(dataset)
    config = tiny_config(normalisation="none", image_size=(12, 14), num_slices=10)
    vol = preprocess.preprocess_files(files, config)
    native = preprocess.to_native(vol.images[..., 0], vol.geometry)
    region = preprocess.to_native(np.ones(vol.images.shape[:3], np.float32), vol.geometry,
                                  order=0) > 0
    original = np.asarray(nib.load(str(files.images["t1"])).dataobj)
    assert native.shape == original.shape
    assert region.sum() == 12 * 14 * 10
    np.testing.assert_array_equal(native[region], original[region])
    assert np.all(native[~region] == 0)
    labels = preprocess.to_native(vol.seg, vol.geometry, order=0)
    assert labels.dtype == np.uint8
    seg = np.asarray(nib.load(str(files.seg)).dataobj)
    np.testing.assert_array_equal(labels[region], seg[region])


def test_to_native_with_resampling_restores_shape_and_affine(dataset, tmp_path):
    files = _files(dataset)
    config = tiny_config(normalisation="none", target_spacing=(3.0, 3.0, 3.0),
                         image_size=(16, 16))
    vol = preprocess.preprocess_files(files, config)
    g = vol.geometry
    assert g.spacing_after == (3.0, 3.0, 3.0)
    assert g.resampled_shape == preprocess.resampled_shape(g.canonical_shape,
                                                           g.spacing_before, (3, 3, 3))
    path = nifti.save_nifti_atomic(tmp_path / "map.nii.gz",
                                   preprocess.to_native(vol.images[..., 1], g),
                                   np.asarray(g.original_affine))
    img = nib.load(str(path))
    original = nib.load(str(files.images["t2"]))
    assert img.shape == original.shape
    np.testing.assert_allclose(img.affine, original.affine)


def test_to_native_with_resampling_reproduces_a_linear_image(dataset):
    subject = nifti.load_subject(_files(dataset))
    ref = subject.images["t2"]
    grid = np.meshgrid(*[np.arange(n) for n in ref.data.shape], indexing="ij")
    ramp = (1.0 + grid[0] + 2.0 * grid[1] + 3.0 * grid[2]).astype(np.float32)
    subject.images["t2"] = nifti.Volume(ref.path, ramp, ref.affine, ref.header)
    config = tiny_config(normalisation="none", target_spacing=(3.0, 3.0, 3.0),
                         image_size=(16, 16))
    vol = preprocess.preprocess_subject(subject, config)
    native = preprocess.to_native(vol.images[..., 1], vol.geometry, order=1)
    region = preprocess.to_native(np.ones(vol.images.shape[:3], np.float32), vol.geometry,
                                  order=0) > 0
    interior = ndimage.binary_erosion(region, iterations=2)
    assert interior.sum() > 1000
    np.testing.assert_allclose(native[interior], ramp[interior], atol=0.05)


def test_slice_range_and_num_slices(dataset):
    files = _files(dataset)
    config = tiny_config(num_slices=12, slice_range=(2, 9), normalisation="none")
    vol = preprocess.preprocess_files(files, config)
    assert vol.images.shape[0] == 7
    assert vol.geometry.slice_range == (2, 9) and vol.geometry.crop_shape[2] == 12
    native = preprocess.to_native(np.ones((7, 16, 20), np.float32), vol.geometry, order=0)
    assert native.sum() == 7 * 16 * 20
    with pytest.raises(preprocess.DataError, match="slice range"):
        preprocess.preprocess_files(files, tiny_config(slice_range=(40, 50)))


def _synthetic_volume(fractions, lesion_slices):
    d, h, w = len(fractions), 10, 10
    mask = np.zeros((d, h, w), bool)
    for i, f in enumerate(fractions):
        mask[i].flat[: round(f * h * w)] = True
    seg = np.zeros((d, h, w), np.uint8)
    for i in lesion_slices:
        seg[i, 0, 0] = 1
    geometry = VolumeGeometry((d, h, w), np.eye(4).tolist(), [[0, 1], [1, 1], [2, 1]],
                              (h, w, d), np.eye(4).tolist(), (1.0,) * 3, (1.0,) * 3,
                              (h, w, d), (0, 0, 0), (h, w, d), (0, d))
    return PreprocessedVolume(np.zeros((d, h, w, 1), np.float32), mask, seg, geometry)


def test_min_brain_fraction_filter():
    vol = _synthetic_volume([0.0, 0.04, 0.05, 0.3, 1.0], lesion_slices=[])
    idx = preprocess.training_slice_indices(vol, min_brain_fraction=0.05,
                                            lesion_free_only=True)
    np.testing.assert_array_equal(idx, [2, 3, 4])
    idx = preprocess.training_slice_indices(vol, min_brain_fraction=0.0,
                                            lesion_free_only=True)
    np.testing.assert_array_equal(idx, [1, 2, 3, 4])  # Slices without brain never train.


def test_lesion_free_slice_option():
    vol = _synthetic_volume([0.5] * 6, lesion_slices=[1, 2, 4])
    free = preprocess.training_slice_indices(vol, min_brain_fraction=0.1,
                                             lesion_free_only=True)
    np.testing.assert_array_equal(free, [0, 3, 5])
    every = preprocess.training_slice_indices(vol, min_brain_fraction=0.1,
                                              lesion_free_only=False)
    np.testing.assert_array_equal(every, np.arange(6))


def test_brain_mask_from_nonzero_voxels(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds", with_brainmask=False)
    vol = preprocess.preprocess_files(_files(root, "sub-0001"), tiny_config())
    assert vol.brain_mask.sum() > 0
    assert np.all(vol.images[~vol.brain_mask] == 0.0)


def test_config_from_configdict_and_builder_name():
    from configs import data as data_config

    cfg = preprocess.PreprocessConfig.from_config(data_config.get_config("paper"))
    assert cfg.image_size == (96, 96) and cfg.target_spacing == (2.0, 2.0, 2.0)
    assert cfg.builder_config_name == "phantom_t2_96"
    cpu = preprocess.PreprocessConfig.from_config(data_config.get_config("cpu:t2,flair"))
    assert cpu.builder_config_name == "phantom_t2_flair_64"
    disyre = preprocess.PreprocessConfig.from_config(data_config.get_config("disyre"))
    assert disyre.builder_config_name == "phantom_t2_96_quantile"
    assert DEFAULT_AFFINE.shape == (4, 4)


def test_data_config_is_the_dataclass_defaults_and_unknown_keys_are_refused():
    import dataclasses

    from configs import common
    from configs import data as data_config

    defaults = data_config.preprocessing_defaults()
    for field in dataclasses.fields(preprocess.PreprocessConfig):
        assert defaults[field.name] == field.default, field.name
    # every variant, and a method's full data section, is accepted as it is
    for variant in ("paper", "mmccd_brats", "disyre_upd", "cpu", "disyre", "mmccd", "tiny"):
        preprocess.PreprocessConfig.from_config(data_config.get_config(variant))
    preprocess.PreprocessConfig.from_config(common.base_config("cpu").data)
    bad = data_config.get_config("cpu")
    bad.normalization = "quantile"  # misspelt: would silently keep 'percentile'
    with pytest.raises(ValueError, match="unknown data config keys.*normalization"):
        preprocess.PreprocessConfig.from_config(bad)
