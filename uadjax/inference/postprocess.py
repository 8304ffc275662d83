"""Post-processing of anomaly score volumes (Behrendt et al. pDDPM/cDDPM protocol).

All functions are NumPy/SciPy, method-agnostic and work on volumes laid out as
``[D, H, W]`` with ``D`` the axial slice axis. The Behrendt pipeline is

    score -> score * erode(brain_mask, 3 it., per axial slice) -> 3D median 5^3
          -> (score > tau) -> drop 3D connected components of fewer than 8 voxels.

``postprocess_scores`` does the first two steps (the continuous map used for AP/AUROC),
``binarize`` the last two (the map used for Dice).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

_CROSS_2D = ndi.generate_binary_structure(2, 1)


def _is_disabled(value: int | None) -> bool:
    return value is None or value <= 0


def erode_brain_mask(mask: np.ndarray, iterations: int = 3) -> np.ndarray:
    """Erodes a brain mask slice by slice with a 2D cross (connectivity 1).

    Matches ``scipy.ndimage.binary_erosion(mask[d], structure=cross, iterations=...)``
    called for every axial slice ``d`` (border value 0, so voxels on the image border are
    eroded). Behrendt uses ``iterations = H // 25`` (3 at 96 px).

    Args:
        mask: [D, H, W] bool (or anything whose non-zero voxels are brain).
        iterations: number of erosion steps; 0 or None returns the mask unchanged (as bool).

    Returns:
        [D, H, W] bool eroded mask.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"mask must be [D, H, W], got shape {mask.shape}")
    if _is_disabled(iterations):
        return mask.copy()
    # A [1, 3, 3] structure never couples neighbouring slices: one call = a per-slice loop.
    return ndi.binary_erosion(mask, structure=_CROSS_2D[None], iterations=int(iterations))


def _nonzero_bbox(volume: np.ndarray, margin: int) -> tuple[slice, ...] | None:
    """Bounding box of the non-zero voxels grown by ``margin``; None if all zero."""
    slices = []
    for axis in range(volume.ndim):
        other = tuple(a for a in range(volume.ndim) if a != axis)
        idx = np.flatnonzero(np.any(volume != 0, axis=other))
        if idx.size == 0:
            return None
        slices.append(slice(max(idx[0] - margin, 0), min(idx[-1] + margin + 1, volume.shape[axis])))
    return tuple(slices)


def median_filter_3d(score: np.ndarray, size: int = 5) -> np.ndarray:
    """3D median filter, identical to ``scipy.ndimage.median_filter(score, size=size)``.

    Only the bounding box of the non-zero voxels (grown by ``size // 2``) is filtered; this
    is exact for the default 'reflect' boundary mode, because every window outside that box
    holds only zeros, and reflections at the crop border only see the zero margin.

    Args:
        score: [D, H, W] float.
        size: cubic window edge; 0, 1 or None returns a copy.

    Returns:
        [D, H, W] filtered score, same dtype.
    """
    score = np.asarray(score)
    if _is_disabled(size) or size == 1:
        return score.copy()
    box = _nonzero_bbox(score, size // 2)
    out = np.zeros_like(score)
    if box is not None:
        out[box] = ndi.median_filter(score[box], size=int(size))
    return out


def remove_small_components(
    binary: np.ndarray, min_size: int = 8, connectivity: int = 3
) -> np.ndarray:
    """Removes connected components with fewer than ``min_size`` voxels.

    Behrendt removes components whose skimage ``filled_area <= 7`` with
    ``label(connectivity=3)`` (26-connectivity in 3D). This uses the plain voxel count,
    which differs only for a component of 7 or fewer voxels that fully encloses a cavity
    (e.g. 7 voxels around one hole: filled area 8, kept there, removed here).

    Args:
        binary: [D, H, W] bool (any ndim works).
        min_size: components with ``size < min_size`` are removed; 0/None disables.
        connectivity: 1 (6-neighbours in 3D), 2 (18) or 3 (26), as in skimage.

    Returns:
        bool array of the same shape.
    """
    binary = np.asarray(binary, dtype=bool)
    if _is_disabled(min_size) or not binary.any():
        return binary.copy()
    structure = ndi.generate_binary_structure(binary.ndim, connectivity)
    labels, _ = ndi.label(binary, structure=structure)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def postprocess_scores(
    score: np.ndarray,
    brain_mask: np.ndarray | None,
    *,
    erode_iterations: int | None = 3,
    median_size: int | None = 5,
) -> np.ndarray:
    """Masks a score volume by the eroded brain mask, then median filters it.

    Args:
        score: [D, H, W] float anomaly score.
        brain_mask: [D, H, W] bool/uint8 brain mask; None skips masking altogether.
        erode_iterations: per-slice erosion steps; 0/None masks with the uneroded mask.
        median_size: 3D median window; 0/None/1 skips the filter.

    Returns:
        [D, H, W] score, same dtype as ``score``.
    """
    score = np.asarray(score)
    if brain_mask is not None:
        mask = erode_brain_mask(brain_mask, erode_iterations)
        if mask.shape != score.shape:
            raise ValueError(f"brain_mask shape {mask.shape} != score shape {score.shape}")
        score = np.where(mask, score, np.zeros((), score.dtype))
    return median_filter_3d(score, median_size)


def binarize(
    score: np.ndarray,
    threshold: float,
    *,
    min_component_size: int | None = 8,
    connectivity: int = 3,
) -> np.ndarray:
    """Thresholds a score volume (``score > threshold``) and drops small components.

    Args:
        score: [D, H, W] float.
        threshold: voxels strictly above it are anomalous.
        min_component_size: see ``remove_small_components``; 0/None disables the filter.
        connectivity: component connectivity (3 = 26-neighbourhood).

    Returns:
        [D, H, W] bool.
    """
    pred = np.asarray(score) > threshold
    return remove_small_components(pred, min_component_size, connectivity)
