"""NIfTI input/output with validation: every problem becomes a `DataError(path, problem)`.

`open_nifti` checks the file and its header (existence, size, readability, dimensionality,
voxel size, memory needed) before any voxel is read; the loaders then read the voxel data
eagerly (inside a try) so that truncated or corrupt files fail here, with the file named,
rather than later inside preprocessing.

Size: about 510 lines: every check on an input file, so that each problem has one message.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener

from uadjax import atomic
from uadjax.data.schema import DataError

# Default tolerance when comparing the affines of the files of one subject (mm / unitless).
AFFINE_ATOL = 1e-3
# Voxel sizes outside this range (mm) are taken for a broken header, not a scan.
VOXEL_MM_RANGE = (0.01, 20.0)
# Label maps (segmentations, brain masks) hold whole numbers in this range (CONTRACTS.md).
LABEL_RANGE = (0, 255)
GIB = 2.0 ** 30
# Characters a subject id may not hold: it names files (`<id>.npz`, `<id>/...`).
_UNSAFE_ID = re.compile(r"[/\\\x00-\x1f\x7f]")


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


# ----------------------------------------------------------------------------- file checks


def available_memory() -> int | None:
    """Bytes of memory this process may still use (None when unknown).

    `MemAvailable` of /proc/meminfo (else the physical memory), capped by a cgroup v2
    memory limit when the process runs inside one.
    """
    sizes = [_meminfo_available(), _cgroup_available()]
    sizes = [s for s in sizes if s is not None]
    return min(sizes) if sizes else None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_available() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        # memory.current counts the page cache (files read so far), which the kernel
        # reclaims on demand: it is not memory in use.
        for line in Path("/sys/fs/cgroup/memory.stat").read_text().splitlines():
            if line.startswith("file "):
                used -= int(line.split()[1])
                break
        return max(int(limit) - max(used, 0), 0)
    except (OSError, ValueError):
        return None


def check_memory(path, shape, *, copies: int = 1, what: str = "image") -> None:
    """Refuses a volume whose float32 copy would not fit in the memory available.

    Args:
      path: named in the error.
      shape: the volume's shape.
      copies: number of float32 arrays of that shape held at once.
      what: how the message names the volume.

    Raises:
      DataError: with the size needed and the size available.
    """
    need = float(np.prod([int(n) for n in shape], dtype=np.float64)) * 4 * copies
    free = available_memory()
    if free is not None and need > free:
        raise DataError(path, f"{what} of shape {tuple(int(n) for n in shape)} would need "
                              f"{_size(need)} as float32, more than the {_size(free)} of "
                              "memory available")


def _size(num_bytes: float) -> str:
    """'178.8 GiB', '384.6 MiB', '3.9 KiB', '1000 B'."""
    for unit, scale in (("GiB", GIB), ("MiB", 2.0 ** 20), ("KiB", 2.0 ** 10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes:.0f} B"


def check_file(path: Path) -> None:
    """Checks that `path` is a non-empty regular file this process can read.

    Raises:
      DataError: not found, a directory, not a regular file, not readable, or empty.
    """
    try:
        if path.is_dir():
            raise DataError(path, "is a directory, not a NIfTI file")
        if not path.exists():
            raise DataError(path, "file not found")
        if not path.is_file():
            raise DataError(path, "not a regular file")
        with open(path, "rb") as f:
            empty = not f.read(1)
    except PermissionError:
        raise DataError(path, "not readable (permission denied)") from None
    except OSError as err:
        raise DataError(path, f"not readable ({err.strerror or err})") from None
    if empty:
        raise DataError(path, "empty file (0 bytes)")


def check_shape(path, shape) -> tuple:
    """The 3D shape of a header shape (trailing length-1 axes dropped).

    Raises:
      DataError: not 3D (2D, a 4D series of several volumes, 5D+) or a zero-sized axis.
    """
    shape = tuple(int(n) for n in shape)
    full = shape
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 4:
        raise DataError(path, f"expected a 3D volume, got a 4D file with {shape[3]} volumes "
                              f"(shape {full}); uadjax needs one 3D volume per modality")
    if len(shape) != 3:
        raise DataError(path, f"expected a 3D volume, got a {len(full)}D image of shape {full}")
    if min(shape) < 1:
        raise DataError(path, f"zero-sized axis in shape {full}: the image holds no voxel")
    return shape


def _raw_pixdim(path: Path, header) -> np.ndarray | None:
    """pixdim[1:4] as stored (nibabel silently replaces 0 by 1 and negatives by their abs)."""
    if not hasattr(header, "get_sform"):
        return None
    with ImageOpener(str(path)) as f:
        raw = type(header).from_fileobj(f, check=False)
    return np.asarray(raw["pixdim"][1:4], dtype=np.float64)


def check_voxel_size(path: Path, img) -> np.ndarray:
    """The affine of `img` after checking the voxel size it implies.

    Raises:
      DataError: a stored pixdim that is zero, negative or NaN when the affine is derived
        from it, a non-finite or singular affine, or a voxel size outside `VOXEL_MM_RANGE`.
    """
    header = img.header
    if hasattr(header, "get_sform") and int(header["sform_code"]) == 0:
        pixdim = _raw_pixdim(path, header)
        if pixdim is not None and not (np.all(np.isfinite(pixdim)) and np.all(pixdim > 0)):
            raise DataError(path, f"absurd voxel size (pixdim {_mm(pixdim)} mm): voxel sizes "
                                  "must be positive numbers")
    affine = np.asarray(img.affine, dtype=np.float64)
    spacing = np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0))
    if not np.all(np.isfinite(affine)):
        raise DataError(path, f"non-finite affine (voxel size {_mm(spacing)} mm)")
    low, high = VOXEL_MM_RANGE
    if np.any(spacing < low) or np.any(spacing > high):
        raise DataError(path, f"absurd voxel size {_mm(spacing)} mm (expected {low:g} to "
                              f"{high:g} mm per axis)")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6 * float(np.prod(spacing)):
        raise DataError(path, f"singular affine: the voxel axes (voxel size {_mm(spacing)} mm) "
                              "are not independent")
    return affine


def _mm(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in np.asarray(values, dtype=np.float64)) + ")"


def open_nifti(path):
    """Opens a NIfTI file and checks it without reading its voxel data.

    Args:
      path: a `.nii` or `.nii.gz` file.

    Returns:
      (nibabel image, 3D shape, [4, 4] float64 affine).

    Raises:
      DataError: see `check_file`, `check_shape`, `check_voxel_size` and `check_memory`,
        or a file nibabel cannot parse.
    """
    path = Path(path)
    check_file(path)
    try:
        img = nib.load(str(path))
        shape = img.shape
    except Exception as err:  # noqa: BLE001 - nibabel, gzip, zlib, OS errors: same meaning.
        raise DataError(path, f"unreadable or truncated NIfTI file ({type(err).__name__}: "
                              f"{err})") from None
    shape = check_shape(path, shape)
    try:
        affine = check_voxel_size(path, img)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - a header nibabel cannot decode.
        raise DataError(path, f"unreadable NIfTI header ({type(err).__name__}: {err})") from None
    check_memory(path, shape)
    return img, shape, affine


def load_nifti(path, *, dtype=np.float32) -> Volume:
    """Reads a 3D NIfTI volume and checks it.

    Trailing length-1 axes (a 4D volume whose last axis has length 1) are dropped.

    Args:
      path: a `.nii` or `.nii.gz` file.
      dtype: dtype of the returned data.

    Returns:
      The `Volume` with `data [X, Y, Z]`.

    Raises:
      DataError: any problem of `open_nifti`; truncated data; NaN/Inf voxels.
    """
    path = Path(path)
    img, shape, affine = open_nifti(path)
    try:
        data = np.asarray(img.dataobj)
    except Exception as err:  # noqa: BLE001 - nibabel, gzip, zlib, OS errors: same meaning.
        raise DataError(path, f"unreadable or truncated NIfTI file ({type(err).__name__}: "
                              f"{err})") from None
    data = data.reshape(shape).astype(dtype, copy=False)
    check_finite(path, data)
    return Volume(path=path, data=data, affine=affine, header=img.header)


def check_finite(path, data: np.ndarray) -> None:
    """Raises `DataError` naming `path` when a float volume holds NaN or Inf voxels."""
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        raise DataError(path, f"{bad} NaN/Inf voxels")


def check_label_values(path, data: np.ndarray) -> None:
    """Label maps hold whole numbers in `LABEL_RANGE` (>0 = lesion or brain).

    Raises:
      DataError: non-integer values (an interpolated or probability map), negative values
        or values above the range, with examples.
    """
    fractional = np.abs(data - np.round(data)) > 1e-3  # tolerates scl_slope rounding (1/255)
    if np.any(fractional):
        examples = _values(np.unique(data[fractional])[:3])
        raise DataError(path, f"unexpected label values {examples}: label maps hold whole "
                              "numbers (a probability map or linearly interpolated labels?)")
    low, high = LABEL_RANGE
    outside = (data < low) | (data > high)
    if np.any(outside):
        examples = _values(np.unique(data[outside])[:5])
        raise DataError(path, f"unexpected label values {examples}: label maps hold "
                              f"{low}..{high} (0 = background, >0 = inside)")


def _values(values) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in values) + "]"


def load_label(path) -> Volume:
    """Reads a label volume (segmentation or brain mask) as uint8 0/1.

    Args:
      path: a NIfTI file of whole numbers 0..255; voxels > 0 become 1.

    Returns:
      The `Volume` with `data [X, Y, Z] uint8` in {0, 1}.

    Raises:
      DataError: as `load_nifti`, or unexpected label values (`check_label_values`).
    """
    vol = load_nifti(path, dtype=np.float32)
    check_label_values(vol.path, vol.data)
    return Volume(path=vol.path, data=(vol.data > 0).astype(np.uint8), affine=vol.affine,
                  header=vol.header)


def array_volume(name: str, data, affine, *, label: bool = False) -> Volume:
    """An in-memory array as a checked `Volume`, as `load_nifti` (or `load_label`) would
    return a file holding it; `name` stands for the path in error messages.

    Args:
      data: [X, Y, Z] array (trailing length-1 axes are dropped).
      affine: [4, 4] voxel-to-world (mm) matrix, invertible.
      label: a brain mask or segmentation: whole numbers, voxels > 0 become 1.

    Raises:
      DataError: not 3D, NaN/Inf values, a bad affine, or (labels) unexpected values.
    """
    path = Path(name)
    data = np.asarray(data)
    shape = check_shape(path, data.shape)
    data = data.reshape(shape).astype(np.float32, copy=False)
    check_finite(path, data)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(
            np.linalg.det(affine[:3, :3])) < 1e-9:
        raise DataError(path, f"the affine must be an invertible finite 4 x 4 matrix, not "
                              f"{affine.tolist()}")
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    if label:
        check_label_values(path, data)
        data = (data > 0).astype(np.uint8)
    return Volume(path=path, data=data, affine=affine, header=header)


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
    """Reads `<dataset_dir>/manifest.json` and checks its subject ids.

    Raises:
      DataError: the folder or manifest is missing, the manifest is not JSON, lacks a
        `subjects` list or lists none, or a subject id is missing, unsafe as a file name
        (see `check_subject_id`) or listed twice.
    """
    root = Path(dataset_dir)
    path = root / "manifest.json"
    if not root.is_dir():
        raise DataError(root, "dataset folder not found")
    if not path.is_file():
        empty = not any(root.iterdir())
        raise DataError(path, "manifest.json not found" + (
            " (the dataset folder is empty)" if empty else ""))
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(path, f"unreadable manifest ({err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("subjects"), list):
        raise DataError(path, "manifest has no 'subjects' list")
    if not manifest["subjects"]:
        raise DataError(path, "manifest lists no subjects: nothing to prepare")
    seen = {}
    for n, entry in enumerate(manifest["subjects"]):
        sid = entry.get("id") if isinstance(entry, dict) else None
        check_subject_id(path, sid, n)
        key = sid.casefold()
        if key in seen:
            raise DataError(path, f"duplicate subject id {sid!r} (subjects {seen[key]} and "
                                  f"{n}; ids must differ even ignoring case)")
        seen[key] = n
    return manifest


def check_subject_id(path, sid, index: int) -> None:
    """Subject ids name files (`<id>.npz`, `<id>/...`): they must stay inside a folder.

    Raises:
      DataError: naming `path` when the id is missing, not a string, empty, starts with
        '.', or holds a path separator or a control character.
    """
    if not isinstance(sid, str) or not sid.strip():
        raise DataError(path, f"subject {index} has no id (got {sid!r})")
    if sid.startswith(".") or _UNSAFE_ID.search(sid) or sid != sid.strip():
        raise DataError(path, f"unsafe subject id {sid!r}: ids name files, so they may not "
                              "start with '.', hold '/', '\\' or control characters, or "
                              "begin or end with spaces")


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
    if not isinstance(files, dict):
        raise DataError(root / sid, f"subject {sid}: 'files' is not a mapping")
    for key, name in files.items():
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise DataError(root / sid, f"subject {sid}: file of {key!r} is {name!r}, "
                                        "not a path")
    images = {}
    for mod in modalities:
        if not files.get(mod):
            raise DataError(root / sid, f"subject {sid} has no '{mod}' modality")
        path = root / files[mod]
        if not path.exists():
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
