"""Offline spatial preprocessing (SimpleITK): conversions, registration accuracy against a known
affine, determinism, atlas mask, N4 and the per-subject pipeline."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from uadjax.data import datasets, spatial
from uadjax.data.nifti import Volume
from uadjax.data.phantom_template import load_template
from uadjax.data.schema import DataError

VOXEL_MM = 2.0  # the vendored template grid


def _rotation(axis, degrees):
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[j, j], r[i, j], r[j, i] = c, c, -s, s
    return r


def _matrix(transform):
    """(A [3, 3], b [3]) with transform(p) = A p + b (ITK: A (p - c) + t + c)."""
    a = np.reshape(transform.GetMatrix(), (3, 3))
    c = np.asarray(transform.GetCenter())
    return a, np.asarray(transform.GetTranslation()) + c - a @ c


def _brain_points(mask):
    """[N, 3] LPS mm centres of the non-zero voxels of `mask`."""
    data, affine = spatial.from_sitk(mask)
    ijk = np.argwhere(data > 0)
    ras = ijk @ affine[:3, :3].T + affine[:3, 3]
    return ras * [-1.0, -1.0, 1.0]


def _errors_mm(true, estimate, points):
    a_true, b_true = _matrix(true)
    a_est, b_est = _matrix(estimate)
    return np.linalg.norm(points @ (a_est - a_true).T + (b_est - b_true), axis=1)


def _volume(data, affine, name):
    return Volume(path=Path(f"/subject/{name}.nii.gz"), data=np.asarray(data),
                  affine=np.asarray(affine, np.float64), header=nib.Nifti1Header())


def _dice(a, b):
    return 2.0 * np.sum(a & b) / (np.sum(a) + np.sum(b))


@pytest.fixture(scope="module")
def moved():
    """The template moved by a known affine (template -> subject points) onto a padded grid."""
    fixed = spatial.template_image("t1")
    mask = spatial.template_brain_mask()
    points = _brain_points(mask)
    true = sitk.AffineTransform(3)
    true.SetMatrix((1.05 * _rotation(0, 8.0) @ _rotation(2, 5.0)).ravel().tolist())
    true.SetCenter(points.mean(axis=0).tolist())
    true.SetTranslation((6.0, -4.0, 5.0))
    grid = sitk.ConstantPad(fixed, [10] * 3, [10] * 3)
    inverse = true.GetInverse()
    return {
        "fixed": fixed, "points": points, "true": true, "grid": grid,
        "t1": spatial.resample_to(fixed, grid, inverse, label=False),
        "t2": spatial.resample_to(spatial.template_image("t2"), grid, inverse, label=False),
        "mask": spatial.resample_to(mask, grid, inverse, label=True),
    }


@pytest.fixture(scope="module")
def estimate_t1(moved):
    return spatial.register_affine(moved["t1"], moved["fixed"], seed=0)


# ---------------------------------------------------------------- numpy <-> SimpleITK


def _oblique():
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) @ _rotation(2, -20.0)
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.9, 1.1, 3.0])
    affine[:3, 3] = (-90.3, 12.1, 40.7)
    return affine


AFFINES = {
    "ras": np.array([[2.0, 0, 0, -86.5], [0, 2.0, 0, -118.5], [0, 0, 2.0, -80.5], [0, 0, 0, 1]]),
    "lps": np.array([[-1.0, 0, 0, 90], [0, -1.0, 0, 120], [0, 0, 1.5, -70], [0, 0, 0, 1]]),
    "permuted": np.array([[0, 0, -1.2, 3.0], [1.5, 0, 0, -7.0], [0, 2.0, 0, 11.0], [0, 0, 0, 1]]),
    "oblique": _oblique(),
}


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_sitk_round_trip_and_physical_points(name):
    affine = AFFINES[name]
    data = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    image = spatial.to_sitk(data, affine)
    assert image.GetSize() == (5, 6, 7)
    assert image.GetPixel(4, 1, 2) == data[4, 1, 2]
    back, back_affine = spatial.from_sitk(image)
    assert back.dtype == np.float32 and np.array_equal(back, data)
    np.testing.assert_allclose(back_affine, affine, rtol=0, atol=1e-12)
    for ijk in [(0, 0, 0), (4, 5, 6), (1, 3, 2)]:
        ras = affine @ (*ijk, 1.0)
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(ijk),
                                   ras[:3] * [-1, -1, 1], atol=1e-9)


def test_template_image_grids():
    native = spatial.template_image("t2")
    assert native.GetSize() == (88, 104, 88) and native.GetSpacing() == (2.0, 2.0, 2.0)
    np.testing.assert_array_equal(spatial.from_sitk(native)[0], load_template().t2)
    np.testing.assert_array_equal(spatial.from_sitk(spatial.template_image("flair"))[0],
                                  load_template().t2)
    coarse = spatial.template_image("t1", brain_only=True, spacing=(4.0, 4.0, 4.0))
    assert coarse.GetSize() == (44, 52, 44) and coarse.GetSpacing() == (4.0, 4.0, 4.0)
    corner = (-0.5, -0.5, -0.5)  # voxel edges: the field of view is kept
    np.testing.assert_allclose(coarse.TransformContinuousIndexToPhysicalPoint(corner),
                               native.TransformContinuousIndexToPhysicalPoint(corner))
    assert spatial.template_brain_mask(spacing=(4.0, 4.0, 4.0)).GetSize() == (44, 52, 44)
    brain_only = spatial.from_sitk(spatial.template_image("t1", brain_only=True))[0]
    assert not np.any(brain_only[~load_template().brainmask])
    with pytest.raises(ValueError, match="template modality"):
        spatial.template_image("dwi")


# ---------------------------------------------------------------- registration


def test_register_recovers_known_affine_t1(moved, estimate_t1):
    errors = _errors_mm(moved["true"], estimate_t1, moved["points"]) / VOXEL_MM
    print(f"T1->T1 registration error: mean {errors.mean():.4f}, max {errors.max():.4f} voxels")
    assert errors.max() < 0.25


def test_register_recovers_known_affine_across_contrasts(moved):
    estimate = spatial.register_affine(moved["t2"], moved["fixed"], seed=0)
    errors = _errors_mm(moved["true"], estimate, moved["points"]) / VOXEL_MM
    print(f"T2->T1 registration error: mean {errors.mean():.4f}, max {errors.max():.4f} voxels")
    assert errors.mean() < 0.5
    assert errors.max() < 1.0


def test_register_is_bitwise_deterministic(moved, estimate_t1):
    again = spatial.register_affine(moved["t1"], moved["fixed"], seed=0)
    assert again.GetParameters() == estimate_t1.GetParameters()
    assert again.GetFixedParameters() == estimate_t1.GetFixedParameters()


def test_atlas_brain_mask_overlaps_moved_mask(moved, estimate_t1):
    atlas = spatial.atlas_brain_mask(moved["t1"], estimate_t1)
    assert atlas.GetSize() == moved["grid"].GetSize()
    assert atlas.GetPixelID() == sitk.sitkUInt8
    truth = sitk.GetArrayFromImage(moved["mask"]) > 0
    found = sitk.GetArrayFromImage(atlas)
    assert set(np.unique(found)) <= {0, 1}
    assert _dice(found > 0, truth) > 0.95


# ---------------------------------------------------------------- resampling and N4


def test_resample_to_clips_ringing_and_keeps_labels_binary():
    data = np.zeros((12, 12, 12), np.float32)
    data[4:8, 4:8, 4:8] = 100.0
    image = spatial.to_sitk(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    shift = sitk.TranslationTransform(3, (0.7, -1.3, 0.4))
    out = sitk.GetArrayFromImage(spatial.resample_to(image, image, shift, label=False))
    assert out.min() >= 0.0 and out.max() <= 100.0 and out.max() > 90.0
    label = spatial.resample_to(image > 50, image, shift, label=True)
    assert label.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayFromImage(label))) == {0, 1}


def test_n4_removes_a_linear_bias_field():
    template = load_template()
    t1 = template.t1 * template.brainmask
    ramp = np.linspace(0.0, 1.0, t1.shape[0])[:, None, None]
    biased = t1 * (1.0 + 0.3 * ramp)
    wm = template.wm > 0.9

    def cov(x):
        return float(np.std(x[wm]) / np.mean(x[wm]))

    corrected = spatial.n4_correct(spatial.to_sitk(biased, template.affine),
                                   spatial.template_brain_mask(), shrink=2,
                                   iterations=(50, 50, 50))
    out, affine = spatial.from_sitk(corrected)
    np.testing.assert_allclose(affine, template.affine, atol=1e-12)
    print(f"white-matter CoV: unbiased {cov(t1):.4f}, biased {cov(biased):.4f}, "
          f"N4 {cov(out):.4f}")
    assert cov(out) < 0.6 * cov(biased)
    assert cov(out) < 1.15 * cov(t1)
    assert np.all(out[~template.brainmask] == 0.0)


# ---------------------------------------------------------------- standardise_subject


def _affine_transform(a, b):
    """sitk.AffineTransform p -> a p + b."""
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(np.asarray(a).ravel().tolist())
    transform.SetTranslation(np.asarray(b).tolist())
    return transform


@pytest.fixture(scope="module")
def subject(moved):
    """T1 + T2 + seg on one LPS 2 mm grid (the template moved by `moved['true']`) and PD on a
    3 mm RAS grid, acquired after the head moved again (4 degrees, 3 mm).

    Returns (volumes, seg, template -> PD-scan true transform).
    """
    a, b = _matrix(moved["true"])
    motion = _rotation(2, 4.0), np.array([3.0, 2.0, -3.0])
    centre = a @ moved["points"].mean(axis=0) + b
    motion_b = motion[1] + centre - motion[0] @ centre  # rotation about the brain centre
    true_pd = _affine_transform(motion[0] @ a, motion[0] @ b + motion_b)
    ref_grid = spatial.to_sitk(np.zeros((96, 112, 96), np.uint8),
                               np.array([[-2.0, 0, 0, 95], [0, -2.0, 0, 100],
                                         [0, 0, 2.0, -90], [0, 0, 0, 1]]))
    pd_grid = spatial.to_sitk(np.zeros((64, 74, 64), np.uint8),
                              np.array([[3.0, 0, 0, -96], [0, 3.0, 0, -120],
                                        [0, 0, 3.0, -92], [0, 0, 0, 1]]))
    vols = {}
    for mod, grid, true in (("t1", ref_grid, moved["true"]), ("t2", ref_grid, moved["true"]),
                            ("pd", pd_grid, true_pd)):
        data, affine = spatial.from_sitk(spatial.resample_to(
            spatial.template_image(mod), grid, true.GetInverse(), label=False))
        vols[mod] = _volume(data, affine, mod)
    # A 10 mm-radius lesion around the brain centre, in subject space.
    _, ref_affine = spatial.from_sitk(ref_grid)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in ref_grid.GetSize()], indexing="ij"), -1)
    lps = (ijk @ ref_affine[:3, :3].T + ref_affine[:3, 3]) * [-1, -1, 1]
    seg = (np.linalg.norm(lps - centre, axis=-1) <= 10.0).astype(np.uint8)
    return vols, _volume(seg, ref_affine, "seg"), true_pd


def test_standardise_subject_registers_strips_and_corrects(subject, moved):
    vols, seg, true_pd = subject
    options = spatial.SpatialOptions(register=True, spacing=(2.5, 2.5, 2.5), n4=True,
                                     atlas_mask=True, skull_strip=True)
    out = spatial.standardise_subject(vols, seg, None, options)
    assert set(out) == {"t1", "t2", "pd", "seg", "brainmask"}
    grid = spatial.template_brain_mask(spacing=options.spacing)
    template_mask, grid_affine = spatial.from_sitk(grid)
    np.testing.assert_allclose(np.abs(np.diag(grid_affine)[:3]), 2.5)
    brain = out["brainmask"][0] > 0
    for key, (data, affine) in out.items():
        assert data.shape == (70, 83, 70), key
        np.testing.assert_allclose(affine, grid_affine, atol=1e-9)
    assert out["seg"][0].dtype == np.uint8 and out["brainmask"][0].dtype == np.uint8
    assert set(np.unique(out["seg"][0])) == {0, 1}
    # Template space is the subject space shrunk by the true affine's determinant (1.05^3).
    lesion_ml = out["seg"][0].sum() * 2.5 ** 3 / 1000
    det = np.linalg.det(_matrix(moved["true"])[0])
    assert lesion_ml == pytest.approx(seg.data.sum() * 2.0 ** 3 / 1000 / det, rel=0.1)
    assert _dice(brain, template_mask > 0) > 0.95
    for mod in ("t1", "t2", "pd"):
        assert out[mod][0].dtype == np.float32 and not np.any(out[mod][0][~brain])

    # PD (other grid, moved between scans) is registered on its own: it matches the PD scan
    # resampled with its true transform far better than with the T1 scan's transform.
    def correlation(transform):
        pd = spatial.to_sitk(vols["pd"].data, vols["pd"].affine)
        ideal = spatial.from_sitk(spatial.resample_to(pd, grid, transform, label=False))[0]
        return np.corrcoef(out["pd"][0][brain], ideal[brain])[0, 1]

    own, shared = correlation(true_pd), correlation(moved["true"])
    print(f"PD correlation with its true alignment {own:.3f}, with T1's {shared:.3f}")
    assert own > 0.85 and own > shared + 0.1


def test_standardise_subject_without_registration_keeps_grids(subject):
    vols, seg, _ = subject
    mask = _volume((vols["t1"].data > 0.2 * vols["t1"].data.max()).astype(np.uint8),
                   vols["t1"].affine, "brainmask")
    out = spatial.standardise_subject(vols, seg, mask, spatial.SpatialOptions(skull_strip=True))
    for mod, vol in vols.items():
        data, affine = out[mod]
        assert data.shape == vol.data.shape and np.array_equal(affine, vol.affine)
    np.testing.assert_array_equal(out["brainmask"][0], mask.data)
    np.testing.assert_array_equal(out["seg"][0], seg.data)
    np.testing.assert_array_equal(out["t1"][0], vols["t1"].data * mask.data)
    assert out["pd"][0].shape == (64, 74, 64) and np.any(out["pd"][0])
    # Behrendt's reader smooths each image with CurvatureFlow (time step 0.125, 3
    # iterations); masks and labels stay as they were.
    smooth = spatial.standardise_subject(
        vols, seg, mask, spatial.SpatialOptions(skull_strip=True, curvature_flow=True))
    reference = sitk.CurvatureFlow(
        image1=spatial.to_sitk(out["t1"][0], out["t1"][1]), timeStep=0.125,
        numberOfIterations=3)
    np.testing.assert_allclose(smooth["t1"][0], spatial.from_sitk(reference)[0] * mask.data,
                               atol=1e-6)  # stripped again
    assert not np.allclose(smooth["t1"][0], out["t1"][0], atol=1e-3)
    np.testing.assert_array_equal(smooth["brainmask"][0], mask.data)
    np.testing.assert_array_equal(smooth["seg"][0], seg.data)
    assert "curvature_flow" in datasets.get_preset("behrendt").spatial


def test_standardise_subject_errors(subject):
    vols, seg, _ = subject
    t1 = vols["t1"]
    empty = _volume(np.zeros_like(seg.data), t1.affine, "brainmask")
    with pytest.raises(DataError, match="empty brain mask") as info:
        spatial.standardise_subject({"t1": t1}, None, empty, spatial.SpatialOptions())
    assert info.value.path.endswith("brainmask.nii.gz")
    blank = _volume(np.zeros_like(t1.data), t1.affine, "t1_blank")
    full = _volume(np.ones_like(seg.data), t1.affine, "brainmask")
    with pytest.raises(DataError, match="registration") as info:
        spatial.standardise_subject({"t1": blank}, None, full,
                                    spatial.SpatialOptions(register=True))
    assert info.value.path.endswith("t1_blank.nii.gz")
    with pytest.raises(DataError, match="not on the grid"):
        spatial.standardise_subject({"t1": t1}, _volume(seg.data[1:], t1.affine, "seg"), None,
                                    spatial.SpatialOptions())
