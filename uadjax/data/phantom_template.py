"""The vendored ICBM 2009c template that gives the phantom its anatomy.

The assets `assets/icbm152_2009c/icbm152_2009c_{2mm,1mm}_brain.npz` are derived copies of
the 2 mm and 1 mm ICBM 2009c nonlinear asymmetric maps (see the README and LICENSE next to
them), cropped to the brain with a margin and quantised to uint8. `build_template_asset`
rebuilds them from the original NIfTI files; `load_template` reads one and adds maps
derived from it (distance to the brain surface, distance to the lateral ventricles). The
1 mm asset holds the tissue maps and brain mask only (no 1 mm T2 or PD template exists):
its `t1`, `t2`, `pd` are None.

All volumes use voxel axes [X, Y, Z] = [right, anterior, superior] (RAS, 2 mm isotropic),
written below as [D, H, W]; axial slices are [D, H] at a fixed W index.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import numpy as np
from scipy import ndimage

ASSET_DIR = pathlib.Path(__file__).resolve().parent / "assets" / "icbm152_2009c"
ASSET_FILES = {"2mm": ASSET_DIR / "icbm152_2009c_2mm_brain.npz",
               "1mm": ASSET_DIR / "icbm152_2009c_1mm_brain.npz"}
ASSET_FILE = ASSET_FILES["2mm"]

# Maps kept in the asset: tissue probabilities, brain mask, real template intensities.
TISSUE_MAPS = ("gm", "wm", "csf")
INTENSITY_MAPS = ("t1", "t2", "pd")
SOURCE_FILES = {
    "gm": "2mm_tpm_gm.nii.gz",
    "wm": "2mm_tpm_wm.nii.gz",
    "csf": "2mm_tpm_csf.nii.gz",
    "brainmask": "2mm_brainmask.nii.gz",
    "t1": "2mm_T1.nii.gz",
    "t2": "2mm_T2.nii.gz",
    "pd": "2mm_PD.nii.gz",
}


def source_files(resolution: str = "2mm") -> dict[str, str]:
    """The original files of one resolution ('2mm', or '1mm': tissue maps and mask only)."""
    if resolution == "2mm":
        return dict(SOURCE_FILES)
    return {name: fname.replace("2mm", resolution) for name, fname in SOURCE_FILES.items()
            if name not in INTENSITY_MAPS}

# Cropping: brain bounding box plus this margin (voxels), rounded up to a multiple of 8 so
# that axial slices suit U-Nets with three down-sampling levels.
CROP_MARGIN_VOX = 4
CROP_MULTIPLE = 8

# Lateral + third ventricles: the largest component of CSF this deep in the brain.
VENTRICLE_MIN_DEPTH_MM = 20.0
VENTRICLE_MIN_CSF = 0.6


@dataclasses.dataclass(frozen=True)
class Template:
    """Template maps on the phantom grid.

    Attributes:
      gm, wm, csf: [D, H, W] float32 tissue probabilities in [0, 1].
      brainmask: [D, H, W] bool.
      t1, t2, pd: [D, H, W] float32 real template intensities (arbitrary units, full head);
        None for the 1 mm template.
      depth: [D, H, W] float32 distance (voxels) to the outside of the brain mask.
      ventricle_distance: [D, H, W] float32 distance (voxels) to the lateral ventricles,
        0 inside them.
      affine: [4, 4] float64 voxel-to-RAS-mm affine of the grid (2 mm voxels).
    """

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brainmask: np.ndarray
    t1: np.ndarray | None
    t2: np.ndarray | None
    pd: np.ndarray | None
    depth: np.ndarray
    ventricle_distance: np.ndarray
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.gm.shape)

    @property
    def voxel_size_mm(self) -> float:
        return float(np.linalg.norm(self.affine[:3, 0]))


def crop_box(mask: np.ndarray, margin: int, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """Box around the non-zero voxels of `mask`, widened by `margin`, size a multiple.

    Args:
      mask: [D, H, W] bool.
      margin: voxels added on every side.
      multiple: the box size along each axis is rounded up to a multiple of this.

    Returns:
      (start [3] int, size [3] int); `start` may be negative or the box may run past the
      array: the caller pads (the ICBM brain reaches the lowest axial slices).
    """
    idx = np.argwhere(mask)
    low, high = idx.min(axis=0) - margin, idx.max(axis=0) + 1 + margin
    size = -(-(high - low) // multiple) * multiple
    start = low - (size - (high - low)) // 2
    return start.astype(int), size.astype(int)


def crop_with_padding(volume: np.ndarray, start: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Crops [start, start + size) from `volume`, zero-padding where the box leaves it.

    Args:
      volume: [D, H, W].
      start, size: [3] int.

    Returns:
      [size[0], size[1], size[2]] array of the same dtype.
    """
    out = np.zeros(tuple(size), dtype=volume.dtype)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(start + size, volume.shape)
    dst_lo = src_lo - start
    dst_hi = dst_lo + (src_hi - src_lo)
    out[tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi))] = volume[
        tuple(slice(a, b) for a, b in zip(src_lo, src_hi))
    ]
    return out


def shifted_affine(affine: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Affine of a crop whose voxel (0, 0, 0) is voxel `start` of the original grid."""
    shift = np.eye(4)
    shift[:3, 3] = start
    return affine @ shift


def build_template_asset(source_dir: str | pathlib.Path, out_file: str | pathlib.Path,
                         resolution: str = "2mm") -> dict:
    """Builds a vendored asset from the original ICBM 2009c NIfTI files of `resolution`.

    Tissue maps are stored as round(255 p), the brain mask as 0/1 and the template
    intensities as round(255 x / max) with the scale kept, all uint8, cropped to the brain
    (mask or any tissue probability > 0.05) with `CROP_MARGIN_VOX` and zero padding.

    Args:
      source_dir: folder holding the files of `source_files(resolution)`.
      out_file: the .npz to write.
      resolution: '2mm' (tissue maps, mask, T1/T2/PD) or '1mm' (tissue maps and mask).

    Returns:
      Summary dict: shape, crop start, affine.
    """
    import nibabel as nib  # Only needed to rebuild the asset.

    source_dir = pathlib.Path(source_dir)
    files = source_files(resolution)
    images = {name: nib.load(source_dir / fname) for name, fname in files.items()}
    affine = images["brainmask"].affine
    for name, image in images.items():
        if not np.allclose(image.affine, affine):
            raise ValueError(f"{source_dir / files[name]}: affine differs from brainmask")
    volumes = {name: np.asarray(image.dataobj, dtype=np.float32) for name, image in images.items()}
    tissue_sum = volumes["gm"] + volumes["wm"] + volumes["csf"]
    start, size = crop_box(
        (volumes["brainmask"] > 0) | (tissue_sum > 0.05), CROP_MARGIN_VOX, CROP_MULTIPLE
    )
    arrays = {}
    for name in TISSUE_MAPS:
        arrays[name] = np.round(255.0 * np.clip(volumes[name], 0.0, 1.0)).astype(np.uint8)
    arrays["brainmask"] = (volumes["brainmask"] > 0).astype(np.uint8)
    intensity_maps = [name for name in INTENSITY_MAPS if name in volumes]
    for name in intensity_maps:
        scale = float(volumes[name].max()) / 255.0
        arrays[name] = np.round(volumes[name] / scale).astype(np.uint8)
        arrays[f"{name}_scale"] = np.float64(scale)
    for name in (*TISSUE_MAPS, "brainmask", *intensity_maps):
        arrays[name] = crop_with_padding(arrays[name], start, size)
    arrays["affine"] = shifted_affine(affine, start)
    arrays["crop_start"] = start
    arrays["source_shape"] = np.asarray(volumes["brainmask"].shape)
    np.savez_compressed(out_file, **arrays)
    return {"shape": tuple(int(s) for s in size), "crop_start": start.tolist(),
            "affine": arrays["affine"].tolist()}


def ventricle_mask(csf: np.ndarray, depth: np.ndarray, voxel_mm: float = 2.0) -> np.ndarray:
    """Lateral and third ventricles: the largest connected component of deep CSF.

    (Shallower deep CSF would add the Sylvian and interhemispheric fissures; the next
    components are the posterior cisterns and the top of the interhemispheric fissure.)

    Args:
      csf: [D, H, W] float32 CSF probability.
      depth: [D, H, W] float32 distance (voxels) to the outside of the brain.
      voxel_mm: the grid's voxel size.

    Returns:
      [D, H, W] bool.
    """
    deep_csf = (csf >= VENTRICLE_MIN_CSF) & (depth * voxel_mm >= VENTRICLE_MIN_DEPTH_MM)
    labels, count = ndimage.label(deep_csf)
    sizes = ndimage.sum_labels(deep_csf, labels, index=np.arange(1, count + 1))
    return labels == 1 + int(np.argmax(sizes))


@functools.lru_cache(maxsize=3)
def load_template(path: str | None = None) -> Template:
    """Loads a vendored template (cached) and derives depth and ventricle distance.

    Args:
      path: the asset .npz, or a key of `ASSET_FILES` ('2mm', '1mm'); defaults to the
        2 mm copy shipped in the package.

    Returns:
      A `Template` on the phantom grid ([88, 104, 88] for the 2 mm asset).
    """
    path = ASSET_FILES.get(path, path) if path else ASSET_FILE
    with np.load(path, allow_pickle=False) as data:
        maps = {name: data[name].astype(np.float32) / 255.0 for name in TISSUE_MAPS}
        brainmask = data["brainmask"] > 0
        intensities = {
            name: (data[name].astype(np.float32) * np.float32(data[f"{name}_scale"])
                   if name in data.files else None)
            for name in INTENSITY_MAPS
        }
        affine = data["affine"].astype(np.float64)
    voxel_mm = float(np.linalg.norm(affine[:3, 0]))
    depth = ndimage.distance_transform_edt(brainmask).astype(np.float32)
    ventricles = ventricle_mask(maps["csf"], depth, voxel_mm)
    ventricle_distance = ndimage.distance_transform_edt(~ventricles).astype(np.float32)
    for array in (*maps.values(), brainmask, *intensities.values(), depth, ventricle_distance):
        if array is not None:
            array.setflags(write=False)
    return Template(**maps, brainmask=brainmask, **intensities, depth=depth,
                    ventricle_distance=ventricle_distance, affine=affine)
