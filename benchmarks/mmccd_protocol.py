"""MMCCD's test protocol, cost against accuracy (issue 22, M1).

    python -m benchmarks.mmccd_protocol --workdir=runs/budget/mmccd-cpu_long/seed0 \
        [--per_kind 5] [--slice_step 2] [--ddim_steps 2,5,10] [--coverage 1,2,4] [--json F]

On a trained MMCCD run, scores a subset of the lesion-test volumes (the first `per_kind`
subjects of each lesion kind, every `slice_step`-th slice that holds brain) under every
combination of
  - mask coverage c: each pixel in-painted by c bands per direction, both directions
    (band starts on a stride of band_width / c: 2 c bands per pixel in all);
  - DDIM steps S (the authors' strided chain, `mmccd.sample_timesteps`).
One sweep per S runs the finest stride; the coarser coverages are subsets of its masks
(starts on a multiple of their stride), so they cost nothing extra here, and each mask keeps
its own condition-noise key (as any run of it would have one: the subsets differ from a run at
that stride only in which independent keys the masks draw).

Accuracy, per lesion kind, over the brain pixels of the chosen slices (raw maps, before the
evaluation's post-processing): AUPRC and the Dice at the best threshold (oracle, pooled).
Cost: network evaluations per slice (masks x S of f, masks of g) and the seconds per volume
they take, scaled from the measured seconds per network evaluation of the finest sweep.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.subsets import pixel_accuracy, slices_of
from uadjax import runs
from uadjax.data import builder, schema
from uadjax.methods import mmccd

_WORKDIR = flags.DEFINE_string("workdir", None, "Trained MMCCD run folder.", required=True)
_PER_KIND = flags.DEFINE_integer("per_kind", 5, "Lesion-test subjects per kind.")
_SLICE_STEP = flags.DEFINE_integer("slice_step", 2, "Every n-th brain slice of a volume.")
_STEPS = flags.DEFINE_list("ddim_steps", ["2", "5", "10"], "DDIM steps per chain.")
_COVERAGE = flags.DEFINE_list("coverage", ["1", "2", "4"], "Bands per pixel per direction.")
_BATCH = flags.DEFINE_integer("batch", 4, "Slices per sweep call.")
_JSON = flags.DEFINE_string("json", "", "Also write the table to this file.")


def sweep_errors(models, data, config, batch: int):
    """Per-mask error maps of the finest sweep: ([N, R, H, W] m_r (x_hat_r - x)^2 and the
    masks [R, H, W], seconds spent in the sweep after compilation)."""
    f, g = models["forward"], models["backward"]

    @jax.jit
    def run(image, key):
        x, _ = mmccd.split_pair(image, config)
        out, _ = mmccd.mask_sweep(f, g, x, key, config)
        return jnp.moveaxis(out["err"], 0, 1)  # [B, R, H, W]

    n = len(data["image"])
    pad = (-n) % batch
    images = np.concatenate([data["image"], np.zeros((pad, *data["image"].shape[1:]),
                                                     np.float32)])
    jax.block_until_ready(run(jnp.asarray(images[:batch]), jax.random.key(0)))  # compile
    start = time.perf_counter()
    parts = [np.asarray(run(jnp.asarray(images[i:i + batch]), jax.random.key(i)))
             for i in range(0, len(images), batch)]
    seconds = time.perf_counter() - start
    masks = mmccd.band_masks(tuple(config.data.image_size), int(config.mmccd.band_width),
                             int(config.mmccd.test_stride), tuple(config.mmccd.directions))
    return np.concatenate(parts)[:n], masks, seconds * n / len(images)


def main(argv):
    del argv
    config = runs.run_config(_WORKDIR.value)
    c = config.mmccd
    coverages = sorted(int(v) for v in _COVERAGE.value)
    if any(int(c.band_width) % v for v in coverages):
        raise app.UsageError(f"coverages must divide the band width {c.band_width}")
    c.directions = ("horizontal", "vertical")
    c.test_stride = int(c.band_width) // max(coverages)
    models, steps = runs.load_models_and_steps(config, _WORKDIR.value)
    data = slices_of(config, schema.TEST_LESION, _PER_KIND.value, _SLICE_STEP.value)
    index = builder.load_volumes_index(config.data.data_dir, config.data)
    depth = float(np.mean([e["num_slices"] for e in index["subjects"]]))
    print(f"{len(data['image'])} slices of {len(set(data['subject_id']))} subjects "
          f"(kinds {', '.join(sorted(set(data['kind'].tolist())))}); {depth:.0f} slices per "
          "volume; checkpoints "
          f"{ {k: v['step'] for k, v in steps.items()} }")
    rows = []
    for ddim_steps in sorted(int(s) for s in _STEPS.value):
        c.ddim_steps = ddim_steps
        err, masks, seconds = sweep_errors(models, data, config, _BATCH.value)
        fine_evals = masks.shape[0] * (ddim_steps + 1)
        seconds_per_eval = seconds / (len(data["image"]) * fine_evals)
        for coverage in coverages:
            sel = mmccd.band_subset(tuple(config.data.image_size), int(c.test_stride),
                                    int(c.band_width) // coverage, tuple(c.directions))
            maps = err[:, sel].sum(1) / masks[sel].sum(0)
            evals = len(sel) * (ddim_steps + 1)
            rows.append({"coverage": coverage, "masks": len(sel), "ddim_steps": ddim_steps,
                         "evaluations_per_slice": evals,
                         "seconds_per_volume": evals * seconds_per_eval * depth,
                         **pixel_accuracy(maps, data)})
        print(f"S = {ddim_steps}: {seconds:.0f} s for the finest sweep "
              f"({1e3 * seconds_per_eval:.2f} ms per network evaluation)", flush=True)
    kinds = sorted(set(data["kind"].tolist()))
    print("| coverage | masks | DDIM steps | evaluations per slice | s per volume | " +
          " | ".join(f"{k} AUPRC | {k} Dice" for k in kinds) + " |")
    print("|---" * (5 + 2 * len(kinds)) + "|")
    for r in rows:
        print(f"| {r['coverage']} | {r['masks']} | {r['ddim_steps']} | "
              f"{r['evaluations_per_slice']} | {r['seconds_per_volume']:.1f} | " +
              " | ".join(f"{100 * r[k]['auprc']:.1f} | {100 * r[k]['dice']:.1f}"
                         for k in kinds) + " |")
    if _JSON.value:
        with open(_JSON.value, "w", encoding="utf-8") as fh:
            json.dump({"workdir": _WORKDIR.value, "slices": len(data["image"]),
                       "slices_per_volume": depth, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    app.run(main)
