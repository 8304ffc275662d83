"""Time dataset preparation on full-size stand-ins written under BraTS and IXI names.

    python -m benchmarks.prepare_datasets [--subjects 4] [--jobs 2] [--out /tmp/bench_prep]

The stand-ins are the vendored ICBM 2009c template resampled to 1 mm (BraTS: brain-only
T1/T1ce/T2/FLAIR 240x240x155 with a spherical 'tumour' labelled 1/2/4; IXI: whole-head
T2 and PD at 0.94x0.94x1.2 mm and T1 on another grid, each moved by a random affine), so
registration, N4 and shard building see realistic sizes. Prints seconds per subject for:
the BraTS folder without spatial steps plus Behrendt shards, and IXI with the 'behrendt'
preset's registration, atlas mask, skull strip and N4.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from data_prep import datasets as cli
from uadjax.data.phantom_template import load_template


def _random_affine(rng, spacing, shape):
    """A voxel->RAS affine: spacing, a few degrees of rotation, centred field of view."""
    rotation = Rotation.from_euler("xyz", rng.uniform(-6, 6, 3), degrees=True).as_matrix()
    linear = rotation @ np.diag(spacing)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ (np.asarray(shape) / 2.0) + rng.uniform(-5, 5, 3)
    return affine


def _sample(volume, template_affine, affine, shape, order=1):
    """Template values at the voxel centres of a grid (shape, affine)."""
    to_template = np.linalg.inv(template_affine) @ affine
    return ndimage.affine_transform(volume, to_template[:3, :3], to_template[:3, 3],
                                    output_shape=shape, order=order, mode="constant")


def write_brats(root: Path, n: int, rng) -> None:
    t = load_template()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[:3, 3] = [120.0, 120.0, -77.0]  # SRI24-like 240x240x155, LPS storage
    shape = (240, 240, 155)
    brain = _sample(t.brainmask.astype(np.float32), t.affine, affine, shape) > 0.5
    images = {"t1": t.t1, "t1ce": t.t1, "t2": t.t2, "flair": t.pd}
    grid = np.indices(shape, sparse=True)
    for i in range(n):
        sid = f"BraTS2021_{i:05d}"
        folder = root / "BraTS2021_Training_Data" / sid
        folder.mkdir(parents=True, exist_ok=True)
        centre = np.argwhere(brain)[rng.integers(brain.sum())]
        dist = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
        seg = np.where(dist < 12 ** 2, 2, 0) + np.where(dist < 6 ** 2, 2, 0)  # 2 edema, 4 core
        seg = np.where(dist < 3 ** 2, 1, seg).astype(np.uint8) * brain
        for mod, vol in images.items():
            img = _sample(vol, t.affine, affine, shape) * brain
            img = np.where(seg > 0, img * 1.5, img).astype(np.float32)
            nib.save(nib.Nifti1Image(img, affine), str(folder / f"{sid}_{mod}.nii.gz"))
        nib.save(nib.Nifti1Image(seg, affine), str(folder / f"{sid}_seg.nii.gz"))


def write_ixi(root: Path, n: int, rng) -> None:
    t = load_template()
    for i in range(n):
        sid = f"IXI{i + 2:03d}-Guys-{828 + i:04d}"
        shape2 = (256, 256, 130)
        a2 = _random_affine(rng, (0.94, 0.94, 1.2), shape2)
        for mod, vol in (("T2", t.t2), ("PD", t.pd)):
            img = _sample(vol, t.affine, a2, shape2).astype(np.float32)
            path = root / f"IXI-{mod}" / f"{sid}-{mod}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(img, a2), str(path))
        shape1 = (256, 256, 150)
        a1 = _random_affine(rng, (0.94, 0.94, 1.2), shape1)
        img = _sample(t.t1, t.affine, a1, shape1).astype(np.float32)
        (root / "IXI-T1").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(img, a1), str(root / "IXI-T1" / f"{sid}-T1.nii.gz"))


def _timed(argv) -> float:
    start = time.perf_counter()
    status = cli.main(argv)
    if status != 0:
        raise SystemExit(f"data_prep.datasets failed ({status}): {argv}")
    return time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--subjects", type=int, default=4)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default="/tmp/uadjax_bench_prepare")
    args = p.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    write_brats(out / "raw_brats", args.subjects, rng)
    write_ixi(out / "raw_ixi", args.subjects, rng)
    print(f"stand-ins written: {time.perf_counter() - start:.1f} s")
    n, jobs = args.subjects, ["--jobs", str(args.jobs), "--quiet"]
    rows = []
    seconds = _timed(["--out", str(out / "brats"), "--source", f"brats2021={out / 'raw_brats'}",
                      "--modalities", "t2", *jobs])
    rows.append(("BraTS 2021, T2, no spatial steps (check headers, labels)", seconds))
    seconds = _timed(["--out", str(out / "brats_shards"), "--source",
                      f"brats2021={out / 'raw_brats'}", "--modalities", "t2",
                      "--shards", str(out / "shards"), "--data_config", "configs/data.py:paper",
                      *jobs])
    rows.append(("BraTS 2021, T2, folder + Behrendt shards (96x96x50, 2 mm)", seconds))
    seconds = _timed(["--out", str(out / "ixi"), "--preset", "behrendt",
                      "--source", f"ixi={out / 'raw_ixi'}", "--modalities", "t2", *jobs])
    rows.append(("IXI, T2, behrendt preset: register + atlas mask + skull strip + N4 (1 mm)",
                 seconds))
    seconds = _timed(["--out", str(out / "ixi_t1t2"), "--preset", "behrendt",
                      "--source", f"ixi={out / 'raw_ixi'}", "--modalities", "t1,t2", *jobs])
    rows.append(("IXI, T1 + T2 (two registrations), behrendt preset", seconds))
    print(f"\n{n} subjects per row, {args.jobs} worker processes\n")
    print("| step | s total | s per subject |\n|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} | {seconds / n:.1f} |")


if __name__ == "__main__":
    main()
