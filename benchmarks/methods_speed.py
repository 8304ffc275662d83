"""Training and inference speed, FLOPs and peak memory of every method, one table.

    python -m benchmarks.methods_speed [--size cpu] [--steps 5] [--configs ddpm,pddpm:ens]

Runs `benchmarks.train_and_score` for each method config in its own process (so each peak
RSS is that config's own) and prints a Markdown table: training slices/s per stage, scoring
slices/s and volumes/s (a volume = `--slices_per_volume` axial slices: 59 for the CPU phantom
at 3 mm, 50 for Behrendt's 96x96x50), XLA's GFLOP per scored slice and its ratio to one
forward pass of the DDPM UNet of the same size (network-evaluation equivalents), and the
peak host memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_CONFIGS = ("ddpm", "ddpm:ens", "ddpm:anoddpm", "pddpm", "pddpm:ens", "cddpm", "disyre",
                   "disyre:multistep", "mmccd", "mmccd:cyclic", "maediff", "maediff:grid",
                   "ldm", "ae", "vae", "dae")


def run_one(spec: str, size: str, steps: int, out: Path) -> dict:
    name, _, modifiers = spec.partition(":")
    arg = ",".join(p for p in (size, modifiers) if p)
    cmd = [sys.executable, "-m", "benchmarks.train_and_score", f"--config=configs/{name}.py:{arg}",
           f"--steps={steps}", f"--json={out}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec}: {proc.stderr[-2000:]}")
    figures = json.loads(out.read_text())
    figures["wall_s"] = time.perf_counter() - start
    return figures


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="cpu")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--slices_per_volume", type=int, default=59)
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        reference = run_one("ddpm", args.size, args.steps, Path(tmp) / "ref.json")
        unet_gflop = reference["score"]["gflop_per_slice"]  # one UNet pass per slice
        for spec in args.configs.split(","):
            figures = reference if spec == "ddpm" else run_one(
                spec, args.size, args.steps, Path(tmp) / "fig.json")
            rows.append((spec, figures))
            print(f"{spec}: done in {figures['wall_s']:.0f} s", file=sys.stderr)
    first = rows[0][1]
    print(f"\n{first['devices']} x {first['device_kind']}, configs ':{args.size}', "
          f"{args.slices_per_volume} slices per volume\n")
    print("| config | train slices/s (per stage) | score slices/s | volumes/s | s/volume | "
          "GFLOP/slice | UNet-pass equivalents | peak RSS MiB |\n|---|---|---|---|---|---|---|---|")
    for spec, f in rows:
        train = ", ".join(f"{k} {v['slices_per_s']:.0f}" for k, v in f["train"].items())
        score = f["score"]["slices_per_s"]
        vps = score / args.slices_per_volume
        gflop = f["score"]["gflop_per_slice"]
        print(f"| {spec} | {train} | {score:.0f} | {vps:.2f} | {1 / vps:.2f} | {gflop:.2f} | "
              f"{gflop / unet_gflop:.1f} | {f['memory']['host_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
