"""Geometry for the phantom: smooth random fields, subject deformations, soft shapes.

Smooth fields are low-resolution Gaussian control grids upsampled with separable cubic
B-spline matrices (three small matrix products instead of a 3D spline filter: about ten
times faster than scipy.ndimage.zoom(order=3) for the same smoothness). Every volume is
[D, H, W] on the phantom grid; coordinates are voxel indices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage


def cubic_bspline(u: np.ndarray) -> np.ndarray:
    """Uniform cubic B-spline kernel, support [-2, 2], partition of unity."""
    a = np.abs(u)
    inner = (4.0 - 6.0 * a**2 + 3.0 * a**3) / 6.0
    outer = (2.0 - a) ** 3 / 6.0
    return np.where(a < 1.0, inner, np.where(a < 2.0, outer, 0.0))


def bspline_matrix(n_out: int, n_ctrl: int) -> np.ndarray:
    """[n_out, n_ctrl] float32 weights interpolating `n_ctrl` control points onto `n_out`.

    Control points are spread evenly with one beyond each end of the axis, so the field
    has no boundary artefacts. Needs n_ctrl >= 4.
    """
    if n_ctrl < 4:
        raise ValueError(f"a cubic B-spline axis needs >= 4 control points, got {n_ctrl}")
    spacing = max(n_out - 1, 1) / (n_ctrl - 3)
    positions = (np.arange(n_ctrl) - 1.0) * spacing
    u = (np.arange(n_out)[:, None] - positions[None, :]) / spacing
    return cubic_bspline(u).astype(np.float32)


def upsample_control_grid(control: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Cubic B-spline interpolation of a [c0, c1, c2] control grid onto `shape`.

    Returns:
      [shape[0], shape[1], shape[2]] float32.
    """
    mx, my, mz = (bspline_matrix(n, c) for n, c in zip(shape, control.shape))
    field = np.tensordot(mx, control.astype(np.float32), axes=(1, 0))  # [D, c1, c2]
    field = np.matmul(my, field)  # [H, c1] @ [D, c1, c2] -> [D, H, c2]
    return np.matmul(field, mz.T)  # [D, H, c2] @ [c2, W] -> [D, H, W], contiguous


def smooth_field(
    rng: np.random.Generator, shape: Sequence[int], n_ctrl: Sequence[int]
) -> np.ndarray:
    """Smooth random field with zero mean and unit std over the grid.

    Args:
      rng: generator.
      shape: output shape [D, H, W].
      n_ctrl: control points per axis (>= 4); more points, finer detail.

    Returns:
      [D, H, W] float32.
    """
    field = upsample_control_grid(rng.standard_normal(tuple(n_ctrl)), shape)
    field -= field.mean()
    return field / max(float(field.std()), 1e-6)


def random_rotation(rng: np.random.Generator, max_angle_rad: float) -> np.ndarray:
    """[3, 3] rotation with angles about each axis uniform in [-max, max]."""
    ax, ay, az = rng.uniform(-max_angle_rad, max_angle_rad, size=3)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def deformation_coordinates(
    rng: np.random.Generator,
    shape: Sequence[int],
    n_ctrl: Sequence[int],
    displacement_std_vox: float,
    rotation_deg: float,
    scale_range: float,
    translation_vox: float,
) -> np.ndarray:
    """Sampling coordinates of one subject: small random affine plus smooth displacement.

    Subject voxel x samples the template at c + A (x - c) + t + u(x), with c the grid
    centre, A a rotation times a scaling, t a translation and u a smooth field.

    Args:
      rng: the subject's anatomy generator.
      shape: grid shape [D, H, W].
      n_ctrl: control points per axis of u.
      displacement_std_vox: std of each component of u (voxels).
      rotation_deg: max rotation about each axis.
      scale_range: global scale uniform in 1 +- this, per-axis 1 +- half of it on top.
      translation_vox: max translation per axis.

    Returns:
      [3, D, H, W] float32 template coordinates.
    """
    rotation = random_rotation(rng, np.deg2rad(rotation_deg))
    scales = 1.0 + rng.uniform(-scale_range, scale_range)
    scales = scales + rng.uniform(-scale_range / 2, scale_range / 2, size=3)
    matrix = rotation @ np.diag(scales)
    translation = rng.uniform(-translation_vox, translation_vox, size=3)
    centre = (np.asarray(shape) - 1) / 2.0
    axes = [np.arange(n, dtype=np.float32) - np.float32(c) for n, c in zip(shape, centre)]
    grids = np.meshgrid(*axes, indexing="ij", sparse=True)
    coords = np.empty((3, *shape), dtype=np.float32)
    for i in range(3):
        displacement = smooth_field(rng, shape, n_ctrl) * np.float32(displacement_std_vox)
        affine_part = sum(np.float32(matrix[i, j]) * grids[j] for j in range(3))
        coords[i] = affine_part + np.float32(centre[i] + translation[i]) + displacement
    return coords


def warp(volume: np.ndarray, coords: np.ndarray, cval: float = 0.0) -> np.ndarray:
    """Trilinear resampling of `volume` [D, H, W] at `coords` [3, ...]; outside -> cval."""
    return ndimage.map_coordinates(
        volume, coords, order=1, mode="constant", cval=cval, prefilter=False, output=np.float32
    )


def box_slices(
    centre: Sequence[float], radius: float, shape: Sequence[int]
) -> tuple[tuple[slice, slice, slice], np.ndarray]:
    """Slices of the box of half-size `radius` around `centre`, clipped to the grid.

    Returns:
      (slices, rel) with rel [3, d, h, w] float32: voxel position minus `centre`.
    """
    lo = [max(0, int(np.floor(c - radius))) for c in centre]
    hi = [min(n, int(np.ceil(c + radius)) + 1) for c, n in zip(centre, shape)]
    slices = tuple(slice(a, b) for a, b in zip(lo, hi))
    axes = [np.arange(a, b, dtype=np.float32) - np.float32(c) for a, b, c in zip(lo, hi, centre)]
    rel = np.stack(np.meshgrid(*axes, indexing="ij"))
    return slices, rel


def expand_around(
    maps: Mapping[str, np.ndarray],
    centre: Sequence[float],
    strength: float,
    scale_vox: float,
    cvals: Mapping[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """Pushes tissue away from `centre` (mass effect, or ventricle enlargement).

    Voxel x samples c + (x - c)(1 - strength exp(-|x - c|^2 / scale^2)): the region near
    the centre is magnified by up to 1 / (1 - strength) and the displacement fades out
    within three scales. One-to-one for strength < 1.

    Args:
      maps: {name: [D, H, W] float32}, all on the same grid.
      centre: [3] voxel coordinates.
      strength: in [0, 0.9].
      scale_vox: Gaussian scale of the effect (voxels).
      cvals: value outside the grid per map (default 0).

    Returns:
      New {name: [D, H, W] float32} arrays; unchanged outside the box of radius 3 scales.
    """
    cvals = cvals or {}
    shape = next(iter(maps.values())).shape
    slices, rel = box_slices(centre, 3.0 * scale_vox, shape)
    squeeze = 1.0 - strength * np.exp(-(rel**2).sum(axis=0) / np.float32(scale_vox**2))
    coords = rel * squeeze.astype(np.float32) + np.asarray(centre, np.float32)[:, None, None, None]
    out = {}
    for name, volume in maps.items():
        new = np.array(volume, dtype=np.float32, copy=True)
        new[slices] = warp(volume, coords, cvals.get(name, 0.0))
        out[name] = new
    return out


def push_coordinates(
    coords: np.ndarray, centre: Sequence[float], strength: float, scale_vox: float
) -> np.ndarray:
    """Composes a radial push about `centre` (template space) into sampling coordinates.

    A template point p becomes c + (p - c)(1 - strength exp(-|p - c|^2 / scale^2)), the
    map of `expand_around`, but applied to the coordinates before the one warp instead of
    warping every map again: nearly free. strength > 0 enlarges what lies at `centre`,
    < 0 shrinks it.

    Args:
      coords: [3, D, H, W] float32 template coordinates of each subject voxel.
      centre: [3] template voxel coordinates.
      strength: in (-0.5, 0.9).
      scale_vox: Gaussian scale (voxels).

    Returns:
      [3, D, H, W] float32 new coordinates.
    """
    centre = np.asarray(centre, np.float32)[:, None, None, None]
    rel = coords - centre
    squeeze = 1.0 - np.float32(strength) * np.exp(
        -(rel**2).sum(axis=0) / np.float32(scale_vox**2))
    return (centre + rel * squeeze.astype(np.float32)).astype(np.float32)


def soft_fraction(signed_distance: np.ndarray) -> np.ndarray:
    """Partial-volume fraction of a shape from its signed distance (voxels, < 0 inside).

    A one-voxel linear ramp: 1 deep inside, 0.5 on the surface, 0 outside.
    """
    return np.clip(0.5 - signed_distance, 0.0, 1.0).astype(np.float32)


def ellipsoid_signed_distance(
    rel: np.ndarray, axes: np.ndarray, radii: Sequence[float]
) -> np.ndarray:
    """Signed distance (voxels, along rays from the centre) to an ellipsoid surface.

    Args:
      rel: [3, ...] position minus the centre.
      axes: [3, 3] rows are the unit semi-axis directions.
      radii: [3] semi-axis lengths (voxels).

    Returns:
      [...] float32, negative inside.
    """
    local = np.tensordot(np.asarray(axes, np.float32), rel, axes=(1, 0))
    scaled = local / np.asarray(radii, np.float32).reshape(3, *([1] * (rel.ndim - 1)))
    r_norm = np.sqrt((scaled**2).sum(axis=0))
    dist = np.sqrt((rel**2).sum(axis=0))
    return np.where(r_norm > 1e-6, dist * (1.0 - 1.0 / np.maximum(r_norm, 1e-6)),
                    -float(min(radii))).astype(np.float32)


def orthonormal_basis(direction: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[3, 3] rows: the unit `direction` and two random unit vectors orthogonal to it."""
    first = np.asarray(direction, np.float64)
    first = first / max(np.linalg.norm(first), 1e-9)
    helper = rng.standard_normal(3)
    second = helper - helper.dot(first) * first
    if np.linalg.norm(second) < 1e-6:
        second = np.roll(first, 1)
        second = second - second.dot(first) * first
    second /= np.linalg.norm(second)
    return np.stack([first, second, np.cross(first, second)])


def random_basis(rng: np.random.Generator) -> np.ndarray:
    """[3, 3] random orthonormal rows."""
    return orthonormal_basis(rng.standard_normal(3), rng)
