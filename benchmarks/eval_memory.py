"""Peak host memory of the evaluation protocol against the number of test subjects.

The evaluation streams: each process saves every scored volume to the volume store as soon
as it is scored (`evaluation.score_splits`), and process 0 then runs the protocol reading
one volume at a time (`inference.volume_store.StoredSplit`, `protocol.PooledVoxels`). This
script measures that second half, the one that used to hold every volume at once, on
synthetic score volumes of the CPU phantom's grid (59 x 64 x 64, one channel, image +
score + reconstruction, as a DAE or DDPM stores them), split like the phantom's evaluation
subjects (8 : 12 : 30 : 8 healthy-val : lesion-val : lesion-test : healthy-test, three
lesion kinds). Each count runs in a fresh process; peak RSS is its `ru_maxrss`.

`--in_memory` also measures the former way (every volume loaded into dicts first) for
comparison, up to `--in_memory_max` subjects.

    python benchmarks/eval_memory.py --subjects=58,250,1000 --out=docs/leaderboard/eval_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (59, 64, 64)  # the CPU phantom's evaluation grid [D, H, W] (3 mm)
SPLIT_SHARES = (("val_healthy", 8), ("val_lesion", 12), ("test_lesion", 30),
                ("test_healthy", 8))
KINDS = ("tumour", "stroke", "ms")


def subjects(n: int) -> list[tuple[str, str, str]]:
    """(id, split, kind) of n evaluation subjects in the phantom's proportions."""
    total = sum(k for _, k in SPLIT_SHARES)
    out = []
    for split, share in SPLIT_SHARES:
        count = max(round(n * share / total), 3 if "lesion" in split else 1)
        for i in range(count):
            kind = KINDS[i % 3] if "lesion" in split else "healthy"
            out.append((f"{split}-{i:05d}", split, kind))
    return out


def synthetic_volume(sid: str, kind: str, seed: int):
    """A ScoredVolume with an ellipsoid brain, a lesion blob (lesion kinds) and a noisy score
    that is higher inside the lesion."""
    from uadjax.inference.scoring import ScoredVolume

    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    brain = (z / 0.9) ** 2 + (y / 0.8) ** 2 + (x / 0.7) ** 2 < 1
    seg = np.zeros(SHAPE, bool)
    if kind != "healthy":
        c = rng.uniform(-0.4, 0.4, 3)
        r = {"tumour": 0.25, "stroke": 0.18, "ms": 0.07}[kind]
        seg = ((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < r ** 2) & brain
    image = (rng.random(SHAPE) * brain + 0.8 * seg).astype(np.float32)[..., None]
    score = (rng.gamma(2.0, 0.05, SHAPE) + 0.3 * seg).astype(np.float32) * brain
    return ScoredVolume(subject_id=sid, kind=kind, score=score, image=image, brain_mask=brain,
                        seg=seg, reconstruction=(image * 0.9).astype(np.float32))


def build_store(folder: Path, n: int) -> list[dict]:
    """Writes n synthetic volumes into a volume store under `folder`; returns the index
    entries the protocol reads (id, split, kind, geometry)."""
    from uadjax.inference.volume_store import VolumeStore

    store = VolumeStore(folder, {"benchmark": "eval_memory"})
    store.prepare()
    entries = []
    for i, (sid, split, kind) in enumerate(subjects(n)):
        store.save(split, synthetic_volume(sid, kind, i))
        entries.append({"id": sid, "split": split, "kind": kind, "num_slices": SHAPE[0],
                        "geometry": {"spacing_after": [3.0, 3.0, 3.0]}})
    return entries


def run_protocol(folder: Path, entries: list[dict], in_memory: bool) -> dict:
    """The evaluation's protocol and outputs on the stored volumes (this process)."""
    from configs import dae
    from uadjax import evaluation
    from uadjax.inference.volume_store import VolumeStore

    config = dae.get_config("cpu")
    store = VolumeStore(folder, {"benchmark": "eval_memory"})
    splits = {}
    for split, _ in SPLIT_SHARES:
        kinds = {e["id"]: e["kind"] for e in entries if e["split"] == split}
        lazy = store.split(split, kinds)
        splits[split] = {sid: lazy[sid] for sid in kinds} if in_memory else lazy
    start = time.perf_counter()
    evaluation._evaluate_and_write(
        config, splits, {"subjects": entries},
        {"score_seconds": 0.0, "compile_seconds": 0.0, "slices_scored": 0,
         "volumes_scored": 0, "slices_per_volume": float(SHAPE[0]), "per_process": []},
        {}, str(folder / "eval"), None if in_memory else store.processed_dir)
    return {"seconds": time.perf_counter() - start,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", default="58,250,1000")
    p.add_argument("--in_memory", action="store_true")
    p.add_argument("--in_memory_max", type=int, default=250)
    p.add_argument("--out", default=None)
    p.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)  # folder, entries, mode
    args = p.parse_args()
    if args._child:
        folder, entries_file, mode = args._child
        entries = json.loads(Path(entries_file).read_text())
        print(json.dumps(run_protocol(Path(folder), entries, mode == "in_memory")))
        return

    rows = []
    for n in (int(x) for x in args.subjects.split(",")):
        folder = Path(tempfile.mkdtemp(prefix=f"eval_memory_{n}_"))
        try:
            entries = build_store(folder, n)
            entries_file = folder / "entries.json"
            entries_file.write_text(json.dumps(entries))
            disk_mb = sum(f.stat().st_size for f in folder.rglob("*.npz")) / 2 ** 20
            modes = ["streamed"] + (["in_memory"] if args.in_memory and n <= args.in_memory_max
                                    else [])
            for mode in modes:
                shutil.rmtree(folder / ".scored-volumes" / "processed", ignore_errors=True)
                shutil.rmtree(folder / "eval", ignore_errors=True)
                out = subprocess.run(
                    [sys.executable, __file__, "--_child", str(folder), str(entries_file), mode],
                    cwd=ROOT, check=True, capture_output=True, text=True,
                    env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
                res = json.loads(out.strip().splitlines()[-1])
                row = {"subjects": len(entries), "mode": mode, "store_mb": round(disk_mb),
                       "peak_rss_mb": round(res["peak_rss_mb"]),
                       "protocol_seconds": round(res["seconds"], 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    print("\n| subjects | protocol | volume store (MB) | peak RSS (MB) | seconds |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['subjects']} | {r['mode']} | {r['store_mb']} | {r['peak_rss_mb']} | "
              f"{r['protocol_seconds']} |")
    if args.out:
        from uadjax import atomic

        atomic.write_json(args.out, {"command": "python " + " ".join(
            [os.path.relpath(__file__, ROOT), *sys.argv[1:]]), "grid": list(SHAPE),
            "rows": rows})


if __name__ == "__main__":
    main()
