"""Network evaluations per volume at each method's paper protocol, and ESTIMATED hours to
score BraTS21 with them on one accelerator and on 8 (a v5e-16 slice, 8 GPUs).

For each method's paper config (`configs/<method>.py:paper`):
  - network evaluations per slice: the method's own count (`Method.network_evaluations`:
    masks x DDIM steps, windows x labels, t values x patches, ...), times the slices per
    volume of its data protocol;
  - FLOPs per network evaluation: XLA's cost analysis of the stage's jitted train step at
    paper size, per slice, divided by 3 (forward + backward ~ 3 forward passes); for the
    stage that holds the scoring network (cDDPM's diffusion stage counts its encoder in
    every pass, LDM's diffusion stage its frozen VQ-VAE encoder: both slight overestimates);
  - hours = evaluations x FLOPs x volumes / (peak x utilisation), at the stated bf16 dense
    peaks (H100/H200 SXM 989 TFLOP/s, TPU v5e 197 TFLOP/s per chip) and at 100 % and 30 %
    of peak (100 % is a hard lower bound; diffusion UNets at batch 32-128 typically reach
    30-50 %). Scoring is embarrassingly parallel over volumes, so 8 chips divide the time
    by 8 (the volume store adds no communication).
These are ESTIMATES from FLOP counts, not measurements.

    python benchmarks/pod_estimates.py --out=docs/leaderboard/pod_estimates.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import jax
import numpy as np

# BraTS21's 1,251 subjects, the full test set of 1,151 used by the issue (and its 139-subject
# MMCCD protocol, 20 slices: configs/data.py:mmccd_brats).
BRATS21_VOLUMES = 1151
PEAKS = {"H100/H200 (989 TFLOP/s bf16)": 989e12, "TPU v5e (197 TFLOP/s bf16)": 197e12}
CHIPS = {"H100/H200 (989 TFLOP/s bf16)": (1, 8), "TPU v5e (197 TFLOP/s bf16)": (1, 16)}
UTILISATIONS = (1.0, 0.3)


def estimated_hours(gflop_per_slice: float, slices_per_volume: int, volumes: int) -> dict:
    """Hours to score `volumes` volumes on 1 and 8 GPUs, 1 and 16 v5e chips (a v5e-16
    slice), at 100 % and 30 % of the bf16 peak."""
    total = gflop_per_slice * 1e9 * slices_per_volume * volumes
    return {f"{chips} x {name} at {int(u * 100)} %": total / (peak * u * chips) / 3600
            for name, peak in PEAKS.items() for chips in CHIPS[name] for u in UTILISATIONS}

# method -> {stage: evaluations per slice, from the method's own count}
def _evaluations_by_stage(method: str, counts: dict) -> dict:
    if method == "cddpm":
        return {"diffusion": counts["unet"]}
    if method == "ldm":
        return {"vqvae": 1, "diffusion": counts["latent unet"]}
    if method == "mmccd":
        return {"forward": counts["f"], "backward": counts["g"]}
    (stage_count,) = counts.values()
    return {None: stage_count}


METHODS = (("ddpm", ""), ("ddpm", "anoddpm"), ("pddpm", ""), ("cddpm", ""), ("dae", ""),
           ("disyre", ""), ("mmccd", ""), ("maediff", ""), ("ldm", ""), ("ae", ""),
           ("vae", ""))


def forward_gflop(config, stage) -> float:
    """XLA GFLOP of one forward pass of the stage's network per slice (train step / 3)."""
    from uadjax import train_state, trainer

    cfg = trainer.stage_config(config, stage.name)
    tx = train_state.make_optimizer(cfg.train)
    graphdef, state = trainer.init_state(stage, cfg, tx, seed=0)
    step = jax.jit(trainer.make_train_step(stage, graphdef, tx, cfg, base_key=jax.random.key(0)))
    b = 2
    h, w = cfg.data.image_size
    m = len(cfg.data.modalities)
    batch = {"image": np.zeros((b, h, w, m), np.float32),
             "brain_mask": np.ones((b, h, w), np.uint8), "seg": np.zeros((b, h, w), np.uint8),
             "slice_index": np.arange(b, dtype=np.int32)}
    cost = step.lower(state, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", 0.0)) / 1e9 / b / 3


def slices_per_volume(config) -> int:
    """Axial slices scored per BraTS volume: the protocol's slice range or count, else every
    slice of BraTS's 155 mm at the config's axial spacing."""
    data = config.data
    if data.get("slice_range"):
        lo, hi = data.slice_range
        return int(hi - lo)
    if data.get("num_slices"):
        return int(data.num_slices)
    return int(round(155 / float(data.target_spacing[2])))


def _print_table(rows) -> None:
    keys = [k for k in rows[0]["estimated_hours"] if k.endswith("30 %")]
    print("\n| method | evaluations / slice | slices / volume | evaluations / volume | "
          "GFLOP / slice | volumes | " + " | ".join(f"hours, {k}" for k in keys) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(keys))
    for r in rows:
        per_slice = ", ".join(f"{k} {v:,}" for k, v in r["evaluations_per_slice"].items())
        print(f"| {r['method']} | {per_slice} | {r['slices_per_volume']} | "
              f"{r['evaluations_per_volume']:,.0f} | {r['gflop_per_slice']:,.0f} | "
              f"{r['volumes']} | " + " | ".join(f"{r['estimated_hours'][k]:.2g}" for k in keys)
              + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--methods", default="", help="comma-separated subset (name or name:mod)")
    p.add_argument("--recompute", default="", help="a JSON this script wrote: recompute its "
                   "hours from its GFLOP figures (no compiling)")
    args = p.parse_args()
    if args.recompute:
        data = json.loads(Path(args.recompute).read_text())
        for r in data["rows"]:
            r["estimated_hours"] = estimated_hours(r["gflop_per_slice"], r["slices_per_volume"],
                                                   r["volumes"])
        data["peaks_flops"] = PEAKS
        Path(args.recompute).write_text(json.dumps(data, indent=1))
        _print_table(data["rows"])
        return
    wanted = set(filter(None, args.methods.split(",")))
    import importlib

    from uadjax.methods import get_method

    rows = []
    for name, modifier in METHODS:
        if wanted and (name + (f":{modifier}" if modifier else "")) not in wanted:
            continue
        config = importlib.import_module(f"configs.{name}").get_config(
            ",".join(x for x in ("paper", modifier) if x))
        method = get_method(config.method)
        counts = method.network_evaluations(config)
        by_stage = _evaluations_by_stage(config.method, counts)
        stages = {s.name: s for s in method.active_stages(config) if s.loss_fn is not None}
        gflop_slice = 0.0
        for stage_name, n in by_stage.items():
            stage = stages[stage_name] if stage_name else next(iter(stages.values()))
            gflop_slice += n * forward_gflop(config, stage)
        spv = slices_per_volume(config)
        volumes = 139 if name == "mmccd" else BRATS21_VOLUMES
        row = {"method": name + (f":{modifier}" if modifier else ""),
               "evaluations_per_slice": counts, "slices_per_volume": spv,
               "evaluations_per_volume": float(sum(counts.values())) * spv,
               "gflop_per_slice": round(gflop_slice, 2), "volumes": volumes,
               "estimated_hours": estimated_hours(gflop_slice, spv, volumes)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    _print_table(rows)
    if args.out:
        from uadjax import atomic

        atomic.write_json(args.out, {
            "command": "python benchmarks/pod_estimates.py --out=" + os.path.relpath(args.out),
            "note": "ESTIMATES from XLA FLOP counts and stated bf16 dense peaks, not "
                    "measurements", "peaks_flops": PEAKS, "rows": rows})


if __name__ == "__main__":
    main()
