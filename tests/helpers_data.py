"""Tiny synthetic NIfTI datasets in the CONTRACTS.md folder format, for fast tests.

`write_tiny_dataset(tmp_path)` writes a few small subjects (default 20x24x16 voxels, an
ellipsoid brain with a tissue pattern, spherical lesions for lesion subjects) plus
manifest.json, and returns the dataset folder. Reusable by any test that needs a dataset.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

# (id, split, kind): every split is present, two lesion kinds.
DEFAULT_SUBJECTS = (
    ("sub-0001", "train", "healthy"),
    ("sub-0002", "train", "healthy"),
    ("sub-0003", "train", "tumour"),
    ("sub-0004", "val_healthy", "healthy"),
    ("sub-0005", "val_lesion", "tumour"),
    ("sub-0006", "test_lesion", "ms"),
    ("sub-0007", "test_healthy", "healthy"),
)

# Voxel size 1.5 x 1.5 x 2 mm, axes stored L->R flipped (LAS) to exercise reorientation.
DEFAULT_AFFINE = np.array([[-1.5, 0.0, 0.0, 15.0],
                           [0.0, 1.5, 0.0, -18.0],
                           [0.0, 0.0, 2.0, -16.0],
                           [0.0, 0.0, 0.0, 1.0]])


def make_subject_arrays(shape=(20, 24, 16), *, modalities=("t1", "t2"), lesion=False,
                        seed=0):
    """Synthetic arrays of one subject.

    Args:
      shape: (X, Y, Z) voxels.
      modalities: names; each gets a different contrast.
      lesion: add a spherical lesion (bright in every modality).
      seed: RNG seed.

    Returns:
      (images {modality: [X, Y, Z] float32}, brain [X, Y, Z] uint8, seg [X, Y, Z] uint8).
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radii = np.array([0.8, 0.85, 0.75])[:, None, None, None]
    brain = (np.sum((grid / radii) ** 2, axis=0) <= 1.0)
    seg = np.zeros(shape, bool)
    if lesion:
        centre = rng.uniform(-0.3, 0.3, size=3)[:, None, None, None]
        seg = (np.sum((grid - centre) ** 2, axis=0) <= 0.3 ** 2) & brain
    pattern = np.sin(3 * grid[0]) * np.cos(2 * grid[1]) + grid[2]
    images = {}
    for k, mod in enumerate(modalities):
        base = 100.0 * (k + 1) + 30.0 * pattern * (1 if k % 2 == 0 else -1)
        noise = rng.normal(0.0, 3.0, size=shape)
        img = np.where(brain, base + noise, 0.0)
        img = np.where(seg, img + 80.0, img)
        images[mod] = img.astype(np.float32)
    return images, brain.astype(np.uint8), seg.astype(np.uint8)


def write_tiny_dataset(root, *, subjects=DEFAULT_SUBJECTS, shape=(20, 24, 16),
                       modalities=("t1", "t2"), affine=DEFAULT_AFFINE, with_brainmask=True,
                       seed=0) -> Path:
    """Writes a tiny dataset (NIfTI files + manifest.json) under `root`.

    Args:
      root: destination folder (created).
      subjects: (id, split, kind) triples.
      shape: (X, Y, Z) of every volume.
      modalities: modality names written for every subject.
      affine: [4, 4] affine of every file.
      with_brainmask: also write `<sid>_brainmask.nii.gz` (else rely on non-zero voxels).
      seed: base RNG seed.

    Returns:
      `root` as a Path.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for n, (sid, split, kind) in enumerate(subjects):
        lesion = kind != "healthy"
        images, brain, seg = make_subject_arrays(shape, modalities=modalities, lesion=lesion,
                                                 seed=seed + n)
        folder = root / sid
        folder.mkdir(exist_ok=True)
        files = {}
        for mod, img in images.items():
            files[mod] = f"{sid}/{sid}_{mod}.nii.gz"
            nib.save(nib.Nifti1Image(img, affine), str(root / files[mod]))
        if lesion:
            files["seg"] = f"{sid}/{sid}_seg.nii.gz"
            nib.save(nib.Nifti1Image(seg, affine), str(root / files["seg"]))
        if with_brainmask:
            files["brainmask"] = f"{sid}/{sid}_brainmask.nii.gz"
            nib.save(nib.Nifti1Image(brain, affine), str(root / files["brainmask"]))
        voxel_ml = abs(np.linalg.det(np.asarray(affine)[:3, :3])) / 1000.0
        entries.append({"id": sid, "split": split, "kind": kind,
                        "lesion_volume_ml": float(seg.sum() * voxel_ml), "files": files})
    manifest = {"dataset": "tiny", "version": 1, "seed": seed, "modalities": list(modalities),
                "subjects": entries}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root


def tiny_config(**overrides):
    """A `PreprocessConfig` matching `write_tiny_dataset` (no resampling, 16x20 in-plane)."""
    from uadjax.data.preprocess import PreprocessConfig

    values = {"dataset": "tiny", "modalities": ("t1", "t2"), "image_size": (16, 20),
              "min_brain_fraction": 0.1}
    values.update(overrides)
    return PreprocessConfig(**values)


def prepare_tiny(tmp_dir, **overrides):
    """Writes a tiny dataset under `tmp_dir/dataset` and prepares its shards.

    Args:
      tmp_dir: scratch folder.
      **overrides: `tiny_config` overrides.

    Returns:
      (dataset_dir, data_dir, config, report).
    """
    from uadjax.data import builder

    dataset_dir = write_tiny_dataset(Path(tmp_dir) / "dataset")
    config = tiny_config(**overrides)
    data_dir = Path(tmp_dir) / "data"
    report = builder.prepare_dataset(dataset_dir, data_dir, config, progress=False)
    return dataset_dir, data_dir, config, report
