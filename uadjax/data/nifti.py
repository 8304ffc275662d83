"""NIfTI input/output with validation: every problem becomes a `DataError(path, problem)`.

The loaders read the voxel data eagerly (inside a try) so that truncated or corrupt files
fail here, with the file named, rather than later inside preprocessing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from uadjax import atomic
from uadjax.data.schema import DataError

# Default tolerance when comparing the affines of the files of one subject (mm / unitless).
AFFINE_ATOL = 1e-3


@dataclass(frozen=True)
class Volume:
    """One 3D NIfTI volume read from disk.

    Attributes:
      path: the file it came from.
      data: [X, Y, Z] array in the file's own voxel order (float32 for images,
        the stored dtype for labels).
      affine: [4, 4] float64 voxel-to-world (mm) matrix.
      header: the nibabel header (for writing maps in the same format).
    """

    path: Path
    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header


def load_nifti(path, *, dtype=np.float32) -> Volume:
    """Reads a 3D NIfTI volume and checks it.

    A 4D volume whose last axis has length 1 is squeezed to 3D.

    Args:
      path: a `.nii` or `.nii.gz` file.
      dtype: dtype of the returned data.

    Returns:
      The `Volume` with `data [X, Y, Z]`.

    Raises:
      DataError: the file is missing, unreadable or truncated, not 3D, or holds NaN/Inf.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as err:  # noqa: BLE001 - nibabel, gzip, zlib, OS errors: same meaning.
        raise DataError(path, f"unreadable or truncated NIfTI file ({type(err).__name__}: {err})")
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(path, f"expected a 3D volume, got shape {tuple(data.shape)}")
    if min(data.shape) < 1:
        raise DataError(path, f"empty volume, shape {tuple(data.shape)}")
    data = data.astype(dtype, copy=False)
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        raise DataError(path, f"{bad} NaN/Inf voxels")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(path, "invalid (singular or non-finite) affine")
    return Volume(path=path, data=data, affine=affine, header=img.header)


def load_label(path) -> Volume:
    """Reads a label volume (segmentation or brain mask) as uint8 0/1.

    Args:
      path: a NIfTI file; voxels > 0 become 1.

    Returns:
      The `Volume` with `data [X, Y, Z] uint8` in {0, 1}.

    Raises:
      DataError: as `load_nifti`.
    """
    vol = load_nifti(path, dtype=np.float32)
    return Volume(path=vol.path, data=(vol.data > 0).astype(np.uint8), affine=vol.affine,
                  header=vol.header)


def check_same_grid(ref: Volume, other: Volume, *, atol: float = AFFINE_ATOL) -> None:
    """Checks that `other` lies on the voxel grid of `ref` (shape and affine).

    Raises:
      DataError: naming `other.path` when the shapes differ or the affines differ by more
        than `atol`.
    """
    if other.data.shape != ref.data.shape:
        raise DataError(other.path, f"shape {other.data.shape} does not match "
                                    f"{ref.path.name} shape {ref.data.shape}")
    if not np.allclose(other.affine, ref.affine, atol=atol, rtol=0.0):
        diff = float(np.max(np.abs(other.affine - ref.affine)))
        raise DataError(other.path, f"affine differs from {ref.path.name} by {diff:.3g} "
                                    f"(tolerance {atol:g})")


def check_brain_mask(mask: Volume) -> None:
    """Raises `DataError` when a brain mask holds no brain voxel."""
    if not np.any(mask.data):
        raise DataError(mask.path, "empty brain mask")


@dataclass(frozen=True)
class SubjectFiles:
    """The files of one subject, as listed in a dataset's manifest.json.

    Attributes:
      subject_id: e.g. 'sub-0001'.
      split: one of `schema.SPLITS`.
      kind: 'healthy' or a lesion kind.
      lesion_volume_ml: from the manifest (0.0 for healthy subjects).
      images: modality -> absolute path, in the requested modality order.
      seg: absolute path of the segmentation, or None (healthy).
      brainmask: absolute path of the brain mask, or None (use non-zero voxels).
    """

    subject_id: str
    split: str
    kind: str
    lesion_volume_ml: float
    images: dict
    seg: Path | None
    brainmask: Path | None


def read_manifest(dataset_dir) -> dict:
    """Reads `<dataset_dir>/manifest.json`.

    Raises:
      DataError: the manifest is missing, not JSON, or lacks `subjects`.
    """
    path = Path(dataset_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(path, "manifest.json not found")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(path, f"unreadable manifest ({err})")
    if not isinstance(manifest.get("subjects"), list):
        raise DataError(path, "manifest has no 'subjects' list")
    return manifest


def subject_files(dataset_dir, entry: dict, modalities) -> SubjectFiles:
    """Resolves one manifest entry into absolute paths.

    Args:
      dataset_dir: the dataset root (paths in the manifest are relative to it).
      entry: one item of `manifest['subjects']`.
      modalities: the modalities wanted, in channel order.

    Raises:
      DataError: naming the subject folder when a modality is not listed, or the file
        when it is listed but absent.
    """
    root = Path(dataset_dir)
    sid = str(entry.get("id", "?"))
    files = entry.get("files", {}) or {}
    images = {}
    for mod in modalities:
        if mod not in files:
            raise DataError(root / sid, f"subject {sid} has no '{mod}' modality")
        path = root / files[mod]
        if not path.is_file():
            raise DataError(path, f"file not found (modality '{mod}' of subject {sid})")
        images[mod] = path
    seg = root / files["seg"] if files.get("seg") else None
    mask = root / files["brainmask"] if files.get("brainmask") else None
    return SubjectFiles(subject_id=sid, split=str(entry.get("split", "")),
                        kind=str(entry.get("kind", "healthy")),
                        lesion_volume_ml=float(entry.get("lesion_volume_ml", 0.0)),
                        images=images, seg=seg, brainmask=mask)


@dataclass(frozen=True)
class SubjectVolumes:
    """The checked volumes of one subject, all on the grid of the first modality.

    Attributes:
      images: modality -> `Volume` (float32), in channel order.
      seg: `Volume` (uint8 0/1) or None.
      brainmask: `Volume` (uint8 0/1) or None.
    """

    images: dict
    seg: Volume | None
    brainmask: Volume | None

    @property
    def reference(self) -> Volume:
        """The first modality: its grid and affine define the subject's native space."""
        return next(iter(self.images.values()))


def load_subject(files: SubjectFiles, *, atol: float = AFFINE_ATOL) -> SubjectVolumes:
    """Loads and cross-checks all files of one subject.

    Raises:
      DataError: any file-level problem (see `load_nifti`), a modality, segmentation or mask
        whose shape or affine does not match the first modality, or an empty brain mask.
    """
    images = {mod: load_nifti(path) for mod, path in files.images.items()}
    ref = next(iter(images.values()))
    for vol in list(images.values())[1:]:
        check_same_grid(ref, vol, atol=atol)
    seg = load_label(files.seg) if files.seg is not None else None
    if seg is not None:
        check_same_grid(ref, seg, atol=atol)
    mask = load_label(files.brainmask) if files.brainmask is not None else None
    if mask is not None:
        check_same_grid(ref, mask, atol=atol)
        check_brain_mask(mask)
    return SubjectVolumes(images=images, seg=seg, brainmask=mask)


def save_nifti_atomic(path, array, affine, header=None) -> Path:
    """Writes a NIfTI file atomically (temporary name in the same folder, then os.replace).

    Args:
      path: destination `.nii` or `.nii.gz`.
      array: [X, Y, Z] (or any N-D) array.
      affine: [4, 4] voxel-to-world matrix.
      header: optional header to copy (its data type is updated to the array's).

    Returns:
      The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    img = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64),
                          header=header.copy() if header is not None else None)
    img.set_data_dtype(array.dtype)
    with atomic.atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path
