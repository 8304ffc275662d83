"""Tests for uadjax.inference.postprocess against plain SciPy / scikit-image loops."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from uadjax.inference import postprocess

CROSS = ndi.generate_binary_structure(2, 1)


def _ellipsoid(shape=(8, 24, 20)):
    d, h, w = np.mgrid[: shape[0], : shape[1], : shape[2]]
    centre = [(s - 1) / 2 for s in shape]
    radii = [s / 2.2 for s in shape]
    return ((d - centre[0]) / radii[0]) ** 2 + ((h - centre[1]) / radii[1]) ** 2 + (
        (w - centre[2]) / radii[2]
    ) ** 2 < 1


@pytest.mark.parametrize("iterations", [1, 3])
def test_erode_brain_mask_equals_per_slice_loop(iterations):
    rng = np.random.default_rng(iterations)
    mask = _ellipsoid() | (rng.random((8, 24, 20)) < 0.05)
    mask[:, 0, 5:9] = True  # touches the image border
    expected = np.stack(
        [ndi.binary_erosion(s, structure=CROSS, iterations=iterations) for s in mask]
    )
    out = postprocess.erode_brain_mask(mask.astype(np.uint8), iterations)
    assert out.dtype == bool
    np.testing.assert_array_equal(out, expected)


def test_erode_brain_mask_disabled():
    mask = _ellipsoid()
    np.testing.assert_array_equal(postprocess.erode_brain_mask(mask, 0), mask)
    np.testing.assert_array_equal(postprocess.erode_brain_mask(mask, None), mask)
    with pytest.raises(ValueError):
        postprocess.erode_brain_mask(mask[0], 3)


@pytest.mark.parametrize("size", [3, 4, 5])
def test_median_filter_3d_equals_scipy(size):
    rng = np.random.default_rng(size)
    score = (rng.random((8, 24, 20)).astype(np.float32)) * postprocess.erode_brain_mask(
        _ellipsoid(), 1
    )
    score[0, 0, 0] = 2.0  # a non-zero voxel on the corner
    np.testing.assert_array_equal(
        postprocess.median_filter_3d(score, size), ndi.median_filter(score, size=size)
    )
    dense = rng.random((5, 9, 7))
    np.testing.assert_array_equal(
        postprocess.median_filter_3d(dense, size), ndi.median_filter(dense, size=size)
    )
    zeros = np.zeros((4, 5, 6), np.float32)
    np.testing.assert_array_equal(postprocess.median_filter_3d(zeros, size), zeros)


@pytest.mark.parametrize("connectivity", [1, 2, 3])
@pytest.mark.parametrize("min_size", [2, 8])
def test_remove_small_components_matches_skimage(connectivity, min_size):
    from skimage import measure
    rng = np.random.default_rng(connectivity * 10 + min_size)
    binary = rng.random((10, 16, 16)) < 0.04
    if min_size > 2:  # grow some blobs past the size limit
        binary = ndi.binary_dilation(binary)
    binary |= rng.random(binary.shape) < 0.05
    labels = measure.label(binary, connectivity=connectivity)
    expected = binary.copy()
    for region in measure.regionprops(labels):
        if region.area < min_size:
            expected[labels == region.label] = False
    out = postprocess.remove_small_components(binary, min_size, connectivity)
    np.testing.assert_array_equal(out, expected)
    assert out.sum() < binary.sum()


def test_remove_small_components_disabled_and_empty():
    binary = np.zeros((3, 4, 5), bool)
    binary[1, 1, 1] = True
    np.testing.assert_array_equal(postprocess.remove_small_components(binary, 0), binary)
    assert not postprocess.remove_small_components(binary, 2).any()
    empty = np.zeros((3, 4, 5), bool)
    assert not postprocess.remove_small_components(empty).any()


def test_postprocess_scores_switches():
    rng = np.random.default_rng(0)
    score = rng.random((8, 24, 20)).astype(np.float32)
    brain = _ellipsoid()
    eroded = np.stack([ndi.binary_erosion(s, structure=CROSS, iterations=3) for s in brain])

    full = postprocess.postprocess_scores(score, brain)
    np.testing.assert_array_equal(full, ndi.median_filter(score * eroded, size=5))
    assert full.dtype == np.float32

    no_median = postprocess.postprocess_scores(score, brain, median_size=None)
    np.testing.assert_array_equal(no_median, score * eroded)

    no_erosion = postprocess.postprocess_scores(score, brain, erode_iterations=0, median_size=0)
    np.testing.assert_array_equal(no_erosion, score * brain)

    no_mask = postprocess.postprocess_scores(score, None, median_size=3)
    np.testing.assert_array_equal(no_mask, ndi.median_filter(score, size=3))

    untouched = postprocess.postprocess_scores(score, None, median_size=None)
    np.testing.assert_array_equal(untouched, score)


def test_binarize():
    score = np.zeros((5, 10, 10), np.float32)
    score[1:4, 2:5, 2:5] = 0.9  # 27 voxels, kept
    score[0, 8, 8] = 0.9  # single voxel, removed
    score[4, 0, 0] = 0.3  # below threshold
    out = postprocess.binarize(score, 0.5)
    assert out.dtype == bool
    assert out.sum() == 27 and not out[0, 8, 8]
    raw = postprocess.binarize(score, 0.5, min_component_size=None)
    np.testing.assert_array_equal(raw, score > 0.5)
    assert postprocess.binarize(score, 0.2, min_component_size=0).sum() == 29
