"""One preprocessing path from NIfTI volumes to normalised axial-slice stacks, and back.

Steps (every dataset, phantom or real, goes through the same functions):

1. reorient to canonical RAS (`nibabel.orientations`; the transform is kept for the inverse);
2. optionally resample to `target_spacing` (`scipy.ndimage.affine_transform`, cubic spline
   for images clipped to the input range, nearest neighbour for masks and segmentations);
3. brain mask from the mask file, or from the voxels that are non-zero in any modality;
4. crop or pad (zeros) to `image_size` in-plane and, when set, `num_slices` axially, centred
   on the brain bounding box;
5. per-modality intensity normalisation (`percentile`, `quantile`, `mmccd` or `none`) on the
   cropped volume;
6. axial slice range, then the layout `[D, H, W]` with D = S (axial), H = R, W = A.

`VolumeGeometry` records everything needed by `to_native` to put a preprocessed-grid map
back onto the original NIfTI grid and affine.

Size: about 630 lines, kept in one module on purpose: the forward path and its inverse
(`to_native`) share `VolumeGeometry`, and one file keeps them from drifting apart.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)
from scipy import ndimage

from uadjax.data import nifti
from uadjax.data.schema import HEALTHY, DataError

NORMALISATIONS = ("percentile", "quantile", "mmccd", "none")
# Keys of a data config that are not preprocessing settings (configs/common.py, data.py).
NOT_PREPROCESSING = frozenset({"augment", "dataset_dir", "data_dir", "phantom_dir",
                               "phantom_variant", "phantom_seed"})


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing settings (built from `configs/data.py` with `from_config`).

    Attributes:
      dataset: dataset name, part of the shard name (e.g. 'phantom').
      modalities: channel order, e.g. ('t2',) or ('t1', 't2', 'flair').
      image_size: (H, W) in-plane size after crop/pad.
      num_slices: axial size after crop/pad, or None to keep every slice.
      target_spacing: (x, y, z) mm after resampling, or None for no resampling.
      slice_range: (start, stop) axial slices kept after crop/pad, or None for all.
      min_brain_fraction: a training slice needs at least this fraction of brain pixels.
      train_lesion_free_only: training slices of lesion subjects must hold no lesion (MMCCD).
      normalisation: one of NORMALISATIONS.
      percentiles: (low, high) brain percentiles of `percentile` normalisation.
      quantile_upper: upper quantile of `quantile` normalisation (DISYRE: 0.98).
      mmccd_percentiles: (low, high) brain percentiles of `mmccd` normalisation.
      mmccd_range: output values of those percentiles (MMCCD: (-3, 3)).
      mmccd_lower_over: 'brain' (README semantics) or 'volume' (the code: whole volume, so
        the low percentile is the zero background).
      brain_mask: 'file' (mask file when listed, else non-zero voxels) or 'nonzero'.
      affine_atol: tolerance when comparing the affines of one subject's files.
      name: shard name override; '' derives it (see `builder_config_name`).
    """

    dataset: str = "phantom"
    modalities: tuple = ("t2",)
    image_size: tuple = (64, 64)
    num_slices: int | None = None
    target_spacing: tuple | None = None
    slice_range: tuple | None = None
    min_brain_fraction: float = 0.05
    train_lesion_free_only: bool = True
    normalisation: str = "percentile"
    percentiles: tuple = (1.0, 99.0)
    quantile_upper: float = 0.98
    mmccd_percentiles: tuple = (2.0, 90.0)
    mmccd_range: tuple = (-3.0, 3.0)
    mmccd_lower_over: str = "brain"
    brain_mask: str = "file"
    affine_atol: float = nifti.AFFINE_ATOL
    name: str = ""

    def __post_init__(self):
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, "
                             f"got {self.normalisation!r}")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"image_size must be (H, W), got {self.image_size}")
        if not self.modalities:
            raise ValueError("at least one modality is needed")

    @classmethod
    def from_config(cls, config) -> PreprocessConfig:
        """Builds the config from a data ConfigDict/dict.

        Its keys are this class's fields and `NOT_PREPROCESSING` (where the data comes from,
        augmentation); any other key is a ValueError, so a misspelt field is not ignored.
        """
        if isinstance(config, cls):
            return config
        values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names - NOT_PREPROCESSING)
        if unknown:
            raise ValueError(f"unknown data config keys {unknown}; preprocessing fields are "
                             f"{sorted(names)}, the others {sorted(NOT_PREPROCESSING)}")
        kwargs = {}
        for field in dataclasses.fields(cls):
            if field.name not in values:
                continue
            value = values[field.name]
            if isinstance(value, list):
                value = tuple(value)
            if field.name == "modalities":  # 't2,flair' or ('t2,flair',) from a flag
                items = value.split(",") if isinstance(value, str) else value
                value = tuple(m.strip() for item in items for m in str(item).split(",")
                              if m.strip())
            kwargs[field.name] = value
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @property
    def builder_config_name(self) -> str:
        """Shard name, e.g. 'phantom_t2_64' ('_96x80' if not square, '_quantile' if not the
        default percentile normalisation)."""
        if self.name:
            return self.name
        h, w = self.image_size
        size = f"{h}" if h == w else f"{h}x{w}"
        parts = [self.dataset, *self.modalities, size]
        if self.normalisation != "percentile":
            parts.append(self.normalisation)
        return re.sub(r"[^a-z0-9_]", "_", "_".join(parts).lower())


@dataclass
class VolumeGeometry:
    """How the preprocessed grid relates to the original NIfTI grid (JSON-serialisable).

    Attributes:
      original_shape: (X, Y, Z) of the input file.
      original_affine: [4, 4] input voxel-to-world matrix (nested lists).
      orientation: nibabel `ornt` [[axis, flip], ...] taking input axes to RAS.
      canonical_shape: shape after reorientation.
      canonical_affine: [4, 4] affine after reorientation.
      spacing_before: voxel size (mm) of the canonical grid.
      spacing_after: voxel size (mm) after resampling (== before when not resampled).
      resampled_shape: shape after resampling.
      crop_start: start of the crop/pad box in the resampled grid (negative = padding).
      crop_shape: shape of the crop/pad box (X=H, Y=W, Z).
      slice_range: (start, stop) of the kept axial slices inside the box.
    """

    original_shape: tuple
    original_affine: list
    orientation: list
    canonical_shape: tuple
    canonical_affine: list
    spacing_before: tuple
    spacing_after: tuple
    resampled_shape: tuple
    crop_start: tuple
    crop_shape: tuple
    slice_range: tuple

    def to_dict(self) -> dict:
        """Plain JSON types (lists, ints, floats)."""
        return {k: _to_json(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> VolumeGeometry:
        """Inverse of `to_dict`."""
        tuples = ("original_shape", "canonical_shape", "spacing_before", "spacing_after",
                  "resampled_shape", "crop_start", "crop_shape", "slice_range")
        return cls(**{k: tuple(v) if k in tuples else v for k, v in values.items()})

    @property
    def resampled_affine(self) -> np.ndarray:
        """[4, 4] voxel-to-world matrix of the resampled canonical grid."""
        scale = np.asarray(self.spacing_after) / np.asarray(self.spacing_before)
        return np.asarray(self.canonical_affine) @ np.diag([*scale, 1.0])

    @property
    def preprocessed_affine(self) -> np.ndarray:
        """[4, 4] matrix taking a preprocessed index (d, h, w, 1) to world (mm)."""
        start = np.asarray(self.crop_start, dtype=np.float64)
        start[2] += self.slice_range[0]
        # (d, h, w) -> (x, y, z) = (h, w, d) + start.
        perm = np.zeros((4, 4))
        perm[0, 1] = perm[1, 2] = perm[2, 0] = perm[3, 3] = 1.0
        perm[:3, 3] = start
        return self.resampled_affine @ perm


@dataclass
class PreprocessedVolume:
    """A preprocessed subject.

    Attributes:
      images: [D, H, W, M] float32, D axial, M modalities in config order.
      brain_mask: [D, H, W] bool.
      seg: [D, H, W] uint8 in {0, 1}.
      geometry: the map back to the input grid.
      subject_id: subject identifier.
      kind: 'healthy' or a lesion kind.
    """

    images: np.ndarray
    brain_mask: np.ndarray
    seg: np.ndarray
    geometry: VolumeGeometry
    subject_id: str = ""
    kind: str = HEALTHY

    @property
    def num_slices(self) -> int:
        return int(self.images.shape[0])


def _to_json(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


# ---------------------------------------------------------------------------- geometry steps


def reorient_to_canonical(data: np.ndarray, affine: np.ndarray):
    """Reorients a volume to the closest canonical (RAS) voxel order.

    Args:
      data: [X, Y, Z] array.
      affine: [4, 4] voxel-to-world matrix.

    Returns:
      (data_ras [X', Y', Z'], affine_ras [4, 4], ornt [3, 2]) where `ornt` is nibabel's
      orientation transform from the input axes to RAS.
    """
    ornt = io_orientation(affine)
    out = apply_orientation(data, ornt)
    return out, affine @ inv_ornt_aff(ornt, data.shape), ornt


def undo_canonical(data: np.ndarray, ornt) -> np.ndarray:
    """Inverse of `reorient_to_canonical` on the data: RAS voxel order -> input order."""
    return apply_orientation(data, ornt_transform(axcodes2ornt("RAS"), np.asarray(ornt)))


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """[3] voxel size (mm): the column norms of the affine's linear part."""
    return np.sqrt(np.sum(np.asarray(affine)[:3, :3] ** 2, axis=0))


def resampled_shape(shape, spacing_before, spacing_after) -> tuple:
    """Number of output voxels whose centres fall inside the input's first..last centres."""
    extent = (np.asarray(shape) - 1) * np.asarray(spacing_before) / np.asarray(spacing_after)
    return tuple(int(n) for n in np.floor(extent + 1e-6).astype(int) + 1)


def resample(data: np.ndarray, spacing_before, spacing_after, *, order: int,
             output_shape=None) -> np.ndarray:
    """Resamples a volume to a new voxel size (first voxel centres aligned).

    Output index o samples input index o * spacing_after / spacing_before.

    Args:
      data: [X, Y, Z] array.
      spacing_before: [3] input spacing (mm).
      spacing_after: [3] output spacing (mm).
      order: spline order (3 for images, 0 for labels, 1 for maps).
      output_shape: defaults to `resampled_shape(...)`.

    Returns:
      [X', Y', Z'] array (float32, or the input dtype for order 0).
    """
    if output_shape is None:
        output_shape = resampled_shape(data.shape, spacing_before, spacing_after)
    scale = np.asarray(spacing_after, dtype=np.float64) / np.asarray(spacing_before)
    if order == 0:
        src = data.astype(np.uint8) if data.dtype == bool else data
    else:
        src = data.astype(np.float32, copy=False)
    out = ndimage.affine_transform(src, scale, output_shape=tuple(output_shape), order=order,
                                   mode="nearest", prefilter=order > 1)
    return out.astype(data.dtype if order == 0 else np.float32, copy=False)


def centred_box(mask: np.ndarray, size) -> tuple:
    """Start of a box of `size` centred on the bounding box of `mask`.

    Args:
      mask: [X, Y, Z] bool, not empty.
      size: [3] box size; None on an axis keeps that axis whole (start 0).

    Returns:
      (start [3] ints, possibly negative or past the end, shape [3] ints).
    """
    starts, shape = [], []
    for axis, want in enumerate(size):
        n = mask.shape[axis]
        if want is None:
            starts.append(0)
            shape.append(n)
            continue
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(np.any(mask, axis=other))
        centre = (idx[0] + idx[-1] + 1) / 2.0
        starts.append(int(np.floor(centre - want / 2.0 + 0.5)))
        shape.append(int(want))
    return tuple(starts), tuple(shape)


def _overlap(start, shape, full_shape):
    """Slices of the overlap between box [start, start+shape) and [0, full_shape)."""
    src, dst = [], []
    for s, n, full in zip(start, shape, full_shape):
        lo, hi = max(s, 0), min(s + n, full)
        hi = max(hi, lo)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    return tuple(src), tuple(dst)


def crop_or_pad(data: np.ndarray, start, shape, *, fill=0) -> np.ndarray:
    """Cuts box [start, start + shape) out of `data` ([X, Y, Z, ...]); outside is `fill`."""
    out = np.full(tuple(shape) + data.shape[3:], fill, dtype=data.dtype)
    src, dst = _overlap(start, shape, data.shape[:3])
    out[dst] = data[src]
    return out


def uncrop(data: np.ndarray, start, full_shape) -> np.ndarray:
    """Inverse of `crop_or_pad`: puts the box back into zeros of `full_shape`."""
    out = np.zeros(tuple(full_shape) + data.shape[3:], dtype=data.dtype)
    src, dst = _overlap(start, data.shape[:3], full_shape)
    out[src] = data[dst]
    return out


# ------------------------------------------------------------------------------ intensities


def percentile_normalise(x: np.ndarray, mask: np.ndarray, percentiles=(1.0, 99.0)):
    """Behrendt / torchio `RescaleIntensity((0, 1), percentiles, masking_method=mask)`.

    p_lo, p_hi are computed over brain voxels; the whole volume is clipped to [p_lo, p_hi]
    and then min-max rescaled to [0, 1] (background below p_lo becomes 0).

    Args:
      x: [...] float32 intensities.
      mask: [...] bool brain mask (not empty).
      percentiles: (low, high) in percent.

    Returns:
      [...] float32 in [0, 1].
    """
    lo, hi = np.percentile(x[mask], percentiles)
    clipped = np.clip(x, lo, hi)
    cmin, cmax = clipped.min(), clipped.max()
    if cmax <= cmin:
        return np.zeros_like(x, dtype=np.float32)
    return ((clipped - cmin) / (cmax - cmin)).astype(np.float32)


def quantile_normalise(x: np.ndarray, upper: float = 0.98):
    """DISYRE `ScaleIntensityQuantile(0, upper)`: negatives -> 0, then (v - q0)/(q_upper - q0)
    with quantiles over all voxels (background included), clipped to [0, 1].

    Args:
      x: [...] float32.
      upper: upper quantile in [0, 1].

    Returns:
      [...] float32 in [0, 1].
    """
    v = np.maximum(x, 0.0)
    q0, q1 = np.quantile(v, [0.0, upper])
    if q1 <= q0:
        return np.zeros_like(x, dtype=np.float32)
    return np.clip((v - q0) / (q1 - q0), 0.0, 1.0).astype(np.float32)


def mmccd_normalise(x: np.ndarray, mask: np.ndarray, percentiles=(2.0, 90.0),
                    out_range=(-3.0, 3.0), lower_over: str = "brain"):
    """MMCCD: (x - l)/(u - l) mapped linearly so that l -> out_range[0], u -> out_range[1].

    u is the `percentiles[1]` percentile of brain voxels; l the `percentiles[0]` percentile of
    brain voxels (`lower_over='brain'`, the README) or of the whole volume ('volume', what the
    code computes: with a zero background l = 0 and x -> 6 x / u - 3). No clipping.

    Args:
      x: [...] float32.
      mask: [...] bool brain mask (not empty).

    Returns:
      [...] float32.
    """
    lo_src = x[mask] if lower_over == "brain" else x
    lo = np.percentile(lo_src, percentiles[0])
    hi = np.percentile(x[mask], percentiles[1])
    a, b = out_range
    if hi <= lo:
        return np.full_like(x, a, dtype=np.float32)
    return ((x - lo) / (hi - lo) * (b - a) + a).astype(np.float32)


def normalise(x: np.ndarray, mask: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Applies the normalisation named by `config.normalisation` to one modality."""
    if config.normalisation == "percentile":
        return percentile_normalise(x, mask, config.percentiles)
    if config.normalisation == "quantile":
        return quantile_normalise(x, config.quantile_upper)
    if config.normalisation == "mmccd":
        return mmccd_normalise(x, mask, config.mmccd_percentiles, config.mmccd_range,
                               config.mmccd_lower_over)
    return x.astype(np.float32, copy=False)


# ---------------------------------------------------------------------------- whole subject


def check_contrast(subject: nifti.SubjectVolumes, mask: np.ndarray) -> None:
    """Refuses a modality with nothing to normalise (normalisation would divide by zero).

    Args:
      subject: the loaded volumes.
      mask: [X, Y, Z] bool brain mask on their grid (not empty).

    Raises:
      DataError: naming the modality's file when every voxel holds the same value, or
        every brain voxel does.
    """
    for vol in subject.images.values():
        lo, hi = float(vol.data.min()), float(vol.data.max())
        if hi <= lo:
            raise DataError(vol.path, f"constant image (every voxel is {lo:g}): no contrast "
                                      "to normalise")
        brain = vol.data[mask]
        lo, hi = float(brain.min()), float(brain.max())
        if hi <= lo:
            raise DataError(vol.path, f"no contrast inside the brain mask (every brain voxel "
                                      f"is {lo:g}): nothing to normalise")


def preprocess_subject(subject: nifti.SubjectVolumes, config, *, subject_id: str = "",
                       kind: str = HEALTHY) -> PreprocessedVolume:
    """Runs the whole preprocessing path on one loaded subject.

    Args:
      subject: checked volumes (`nifti.load_subject`).
      config: `PreprocessConfig` or a ConfigDict with its fields.
      subject_id: stored in the result.
      kind: stored in the result.

    Returns:
      The `PreprocessedVolume` (images [D, H, W, M], brain_mask [D, H, W], seg [D, H, W]).

    Raises:
      DataError: empty brain (mask file or non-zero voxels), a modality without contrast
        (`check_contrast`), a resampled volume too large for memory, or an empty slice range.
    """
    config = PreprocessConfig.from_config(config)
    ref = subject.reference
    use_file = config.brain_mask == "file" and subject.brainmask is not None
    if use_file:
        mask = subject.brainmask.data > 0
    else:
        mask = np.any(np.stack([v.data != 0 for v in subject.images.values()]), axis=0)
    if not np.any(mask):
        raise DataError(subject.brainmask.path if use_file else ref.path, "empty brain mask")
    check_contrast(subject, mask)

    ornt = io_orientation(ref.affine)
    can_affine = ref.affine @ inv_ornt_aff(ornt, ref.data.shape)
    images = [apply_orientation(v.data, ornt) for v in subject.images.values()]
    mask = apply_orientation(mask, ornt)
    seg = (subject.seg.data > 0) if subject.seg is not None else np.zeros(ref.data.shape, bool)
    seg = apply_orientation(seg, ornt)
    can_shape = images[0].shape

    before = voxel_spacing(can_affine)
    after = before if config.target_spacing is None else np.asarray(config.target_spacing, float)
    if np.allclose(before, after, atol=1e-4):
        after = before
    else:
        nifti.check_memory(ref.path, resampled_shape(can_shape, before, after),
                           copies=len(images) + 2, what="resampled image")
        images = [np.clip(resample(im, before, after, order=3), im.min(), im.max())
                  for im in images]
        mask = resample(mask, before, after, order=0)
        seg = resample(seg, before, after, order=0)
        if not np.any(mask):
            raise DataError(ref.path, "empty brain mask after resampling")
    res_shape = images[0].shape

    start, box = centred_box(mask, (*config.image_size, config.num_slices))
    mask = crop_or_pad(mask, start, box)
    seg = crop_or_pad(seg, start, box)
    if not np.any(mask):
        raise DataError(ref.path, "no brain voxel inside the crop box")
    images = [normalise(crop_or_pad(im, start, box), mask, config) for im in images]

    depth = box[2]
    s0, s1 = (0, depth) if config.slice_range is None else config.slice_range
    s0, s1 = max(int(s0), 0), min(int(s1), depth)
    if s1 <= s0:
        raise DataError(ref.path, f"slice range {config.slice_range} is empty for a volume "
                                  f"of {depth} axial slices")

    def to_dhw(a):
        return np.moveaxis(a[:, :, s0:s1], 2, 0)

    geometry = VolumeGeometry(
        original_shape=tuple(ref.data.shape), original_affine=_to_json(ref.affine),
        orientation=_to_json(ornt), canonical_shape=tuple(can_shape),
        canonical_affine=_to_json(can_affine), spacing_before=tuple(map(float, before)),
        spacing_after=tuple(map(float, after)), resampled_shape=tuple(res_shape),
        crop_start=tuple(start), crop_shape=tuple(box), slice_range=(s0, s1))
    return PreprocessedVolume(
        images=np.ascontiguousarray(np.stack([to_dhw(im) for im in images], axis=-1),
                                    dtype=np.float32),
        brain_mask=np.ascontiguousarray(to_dhw(mask).astype(bool)),
        seg=np.ascontiguousarray(to_dhw(seg).astype(np.uint8)),
        geometry=geometry, subject_id=subject_id, kind=kind)


def preprocess_files(files: nifti.SubjectFiles, config) -> PreprocessedVolume:
    """Loads (with validation) and preprocesses one subject listed in a manifest.

    Raises:
      DataError: any input problem, naming the file.
    """
    config = PreprocessConfig.from_config(config)
    subject = nifti.load_subject(files, atol=config.affine_atol)
    return preprocess_subject(subject, config, subject_id=files.subject_id, kind=files.kind)


def training_slice_indices(volume: PreprocessedVolume, *, min_brain_fraction: float,
                           lesion_free_only: bool) -> np.ndarray:
    """Axial indices of the slices used for training.

    Args:
      volume: a preprocessed subject.
      min_brain_fraction: minimum fraction of brain pixels in a slice.
      lesion_free_only: drop slices with any lesion pixel.

    Returns:
      [K] int array of slice indices, increasing.
    """
    d = volume.num_slices
    fraction = volume.brain_mask.reshape(d, -1).mean(axis=1)
    keep = fraction >= min_brain_fraction
    keep &= fraction > 0
    if lesion_free_only:
        keep &= ~np.any(volume.seg.reshape(d, -1) > 0, axis=1)
    return np.flatnonzero(keep)


# ---------------------------------------------------------------------------------- inverse


def to_native(volume_map: np.ndarray, geometry: VolumeGeometry, order: int = 1) -> np.ndarray:
    """Puts a map on the preprocessed grid back onto the input's original grid.

    Slices outside the slice range and voxels outside the crop box become 0; resampling is
    undone with a spline of `order` (1 for scores, 0 for labels), reorientation is undone
    exactly. The result pairs with `geometry.original_affine`.

    Args:
      volume_map: [D, H, W] map (D = the volume's number of preprocessed slices).
      geometry: the volume's `VolumeGeometry` (or its dict form).
      order: interpolation order for undoing the resampling.

    Returns:
      [X, Y, Z] array with `geometry.original_shape` (float32, or the input dtype if
      order == 0).
    """
    if isinstance(geometry, dict):
        geometry = VolumeGeometry.from_dict(geometry)
    volume_map = np.asarray(volume_map)
    s0, s1 = geometry.slice_range
    if volume_map.shape != (s1 - s0, *geometry.crop_shape[:2]):
        raise ValueError(f"map shape {volume_map.shape} does not match the preprocessed grid "
                         f"{(s1 - s0, *geometry.crop_shape[:2])}")
    box = np.zeros(tuple(geometry.crop_shape), dtype=volume_map.dtype)
    box[:, :, s0:s1] = np.moveaxis(volume_map, 0, 2)
    resampled = uncrop(box, geometry.crop_start, geometry.resampled_shape)
    if tuple(geometry.resampled_shape) != tuple(geometry.canonical_shape) or not np.allclose(
            geometry.spacing_before, geometry.spacing_after):
        resampled = resample(resampled, geometry.spacing_after, geometry.spacing_before,
                             order=order, output_shape=geometry.canonical_shape)
    native = undo_canonical(resampled, geometry.orientation)
    if native.shape != tuple(geometry.original_shape):
        raise ValueError(f"internal error: native shape {native.shape} != "
                         f"{tuple(geometry.original_shape)}")
    return np.ascontiguousarray(native)
