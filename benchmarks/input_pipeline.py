"""Throughput of the training input pipeline (with augmentation) at 96x96.

    python -m benchmarks.input_pipeline [--dataset_dir DIR] [--batch_size 32] [--seconds 10]

Without --dataset_dir it writes its own synthetic dataset (48 ellipsoid brains, 2 mm voxels,
about 2,000 training slices: grain's index shuffle is much slower per element on tiny
datasets, so a realistic size matters) to a temporary folder; with it (e.g. a phantom folder) it prepares that dataset. Both use
`configs/data.py:paper` (96x96 at 2 mm). Prints slices/s after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from configs import data as data_config
from uadjax.data import builder, pipeline


def write_synthetic_dataset(root: Path, *, num_subjects: int = 48, shape=(96, 104, 60),
                            seed: int = 0) -> Path:
    """Writes `num_subjects` healthy training subjects (T2, 2 mm) + manifest.json."""
    rng = np.random.default_rng(seed)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    entries = []
    for n in range(num_subjects):
        sid = f"sub-{n:04d}"
        radii = rng.uniform(0.75, 0.9, size=3)[:, None, None, None]
        brain = np.sum((grid / radii) ** 2, axis=0) <= 1.0
        img = 300 + 80 * np.sin(5 * grid[0]) * np.cos(4 * grid[1]) + rng.normal(0, 10, shape)
        img = np.where(brain, img, 0).astype(np.float32)
        (root / sid).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(img, affine), str(root / sid / f"{sid}_t2.nii.gz"))
        entries.append({"id": sid, "split": "train", "kind": "healthy",
                        "lesion_volume_ml": 0.0, "files": {"t2": f"{sid}/{sid}_t2.nii.gz"}})
    manifest = {"dataset": "bench", "version": 1, "seed": seed, "modalities": ["t2"],
                "subjects": entries}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def measure(source, *, batch_size: int, seconds: float, num_threads: int, augment) -> float:
    """Slices/s of `make_train_iterator` over `source` after a 3-batch warm-up."""
    it = pipeline.make_train_iterator(source, batch_size=batch_size, seed=0,
                                      augment_config=augment, num_threads=num_threads)
    for _ in range(3):
        next(it)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = next(it)
        n += batch["image"].shape[0]
    return n / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", default=None, help="dataset folder (else synthetic)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--num_threads", type=int, default=4)
    args = parser.parse_args(argv)

    config = data_config.get_config("paper")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.dataset_dir is None:
            dataset_dir = write_synthetic_dataset(tmp / "dataset")
            config.dataset = "bench"
        else:
            dataset_dir = Path(args.dataset_dir)
            config.dataset = json.loads((dataset_dir / "manifest.json").read_text())["dataset"]
        t0 = time.perf_counter()
        report = builder.prepare_dataset(dataset_dir, tmp / "data", config, progress=False)
        print(report.summary())
        print(f"prepared in {time.perf_counter() - t0:.1f} s")
        source = builder.load_split(tmp / "data", config, "train")
        h, w, m = source[0]["image"].shape
        for label, augment in (("no augmentation", None), ("augmentation", config.augment)):
            rate = measure(source, batch_size=args.batch_size, seconds=args.seconds,
                           num_threads=args.num_threads, augment=augment)
            print(f"train pipeline {h}x{w}x{m}, batch {args.batch_size}, {label}: "
                  f"{rate:,.0f} slices/s")


if __name__ == "__main__":
    main()
