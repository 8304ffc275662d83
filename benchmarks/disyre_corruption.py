"""DISYRE's synthetic anomalies on real training patches, against the authors' statistics.

    python -m benchmarks.disyre_corruption --config=configs/disyre.py:cpu [--batches 40]

Draws the training corruption (`disyre.corrupt`'s parts) on random patches of the
phantom's training slices, as `loss_fn` does, and prints:
  - foreign patch: share of the pixels under the mask (m > 0.5) taken from the source's
    background, and share of anomalies that are more than half background;
  - mask: area (pixels with m > 0.5) mean and quartiles, fill of the anomaly box, share of
    anomalies at least the median tumour-slice area of the test set, and the anomalous
    share of a patch;
next to the authors' figures measured in issue 22 (their `FPI` crop: 14 % background;
their shape mix: mean area about 151 px at 3 mm, 36 % at least the median tumour-slice
area, about 8 % anomalous pixels per patch; fill of the box of their shipped shapes 24-100 %,
mean 74 %). Needs the shards of the config (any `train` or `run` of it builds them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from uadjax import atomic, jobs
from uadjax.data import builder, schema
from uadjax.methods import disyre

_CONFIG = config_flags.DEFINE_config_file("config", "configs/disyre.py:cpu", "DISYRE config.")
_BATCHES = flags.DEFINE_integer("batches", 40, "Training batches to corrupt.")
_JSON = flags.DEFINE_string("json", "", "Also write the figures to this file.")

AUTHORS = {"background_share": 0.14, "mean_area_px_3mm": 151.0,
           "share_at_least_median_tumour_slice": 0.36, "anomalous_pixel_share": 0.08,
           "box_fill_range": (0.24, 1.0), "box_fill_mean": 0.74}


def corruption_parts(key: jax.Array, x: jax.Array, brain: jax.Array, scfg) -> dict:
    """The mask and foreign patch `corrupt` draws for `key`, with the source's brain mask
    under the same crop: {'m' [B, P, P], 'fp_brain' [B, P, P]}."""
    k_mask, k_fp, _, _, _ = jax.random.split(key, 5)
    m, corners = disyre.soft_anomaly_masks(k_mask, brain, scfg)
    both = jnp.concatenate([x, brain[..., None]], axis=-1)
    fp = disyre.foreign_patches(k_fp, both, brain, corners, int(scfg.anomaly_box))
    return {"m": m, "fp_brain": fp[..., -1]}


def median_tumour_slice_area(config) -> float:
    """Median tumour pixels per test slice that holds tumour (the config's grid)."""
    source = builder.load_split(config.data.data_dir, config.data, schema.TEST_LESION)
    areas = []
    for i in range(len(source)):
        record = source[i]
        if record["kind"] == b"tumour" and record["seg"].any():
            areas.append(int((record["seg"] > 0).sum()))
    return float(np.median(areas))


def statistics(config, batches: int, seed: int = 0) -> dict:
    scfg = config.disyre
    jobs.ensure_shards(config, progress=False)
    train = builder.load_split(config.data.data_dir, config.data, schema.TRAIN)
    rng = np.random.default_rng(seed)
    batch_size = int(config.train.batch_size)
    parts = jax.jit(lambda k, x, b: corruption_parts(k, x, b, scfg))
    crops = jax.jit(lambda k, batch: disyre.random_crops(k, batch, int(scfg.patch_size)))
    areas, background, patch_share = [], [], []
    for step in range(batches):
        records = [train[int(i)] for i in rng.integers(0, len(train), batch_size)]
        batch = {"image": jnp.asarray(np.stack([r["image"] for r in records])),
                 "brain_mask": jnp.asarray(np.stack([r["brain_mask"] for r in records]))}
        k_crop, k_corrupt = jax.random.split(jax.random.key(step))
        x, brain = crops(k_crop, batch)
        out = jax.device_get(parts(k_corrupt, x, brain))
        under = out["m"] > 0.5
        for mask, fp_brain in zip(under, out["fp_brain"]):
            if mask.any():
                areas.append(int(mask.sum()))
                background.append(float(np.mean(fp_brain[mask] == 0)))
        patch_share.extend(under.reshape(under.shape[0], -1).mean(1).tolist())
    areas, background = np.asarray(areas, float), np.asarray(background)
    median_tumour = median_tumour_slice_area(config)
    box = int(scfg.anomaly_box)
    return {
        "config": {"patch_size": int(scfg.patch_size), "anomaly_box": box,
                   "image_size": list(config.data.image_size)},
        "anomalies": int(areas.size),
        "background_share": float(np.sum(background * areas) / np.sum(areas)),
        "share_more_than_half_background": float(np.mean(background > 0.5)),
        "mean_area_px": float(areas.mean()),
        "area_quartiles_px": np.percentile(areas, [25, 50, 75]).tolist(),
        "box_fill_mean": float(np.mean(areas / box**2)),
        "median_tumour_slice_px": median_tumour,
        "share_at_least_median_tumour_slice": float(np.mean(areas >= median_tumour)),
        "anomalous_pixel_share": float(np.mean(patch_share)),
        "authors": AUTHORS,
    }


def main(argv):
    del argv
    stats = statistics(_CONFIG.value, _BATCHES.value)
    a = AUTHORS
    rows = [
        ("foreign-patch pixels from background", f"{stats['background_share']:.1%}",
         f"{a['background_share']:.0%}"),
        ("anomalies more than half background", f"{stats['share_more_than_half_background']:.1%}",
         "-"),
        ("mask area, mean (px)", f"{stats['mean_area_px']:.0f}", f"{a['mean_area_px_3mm']:.0f}"),
        ("mask area, quartiles (px)", " / ".join(f"{v:.0f}" for v in stats["area_quartiles_px"]),
         "-"),
        ("fill of the anomaly box, mean", f"{stats['box_fill_mean']:.2f}",
         "irregular shapes alone: 0.24-1.0, mean 0.74"),
        (f"anomalies >= median tumour slice ({stats['median_tumour_slice_px']:.0f} px)",
         f"{stats['share_at_least_median_tumour_slice']:.1%}",
         f"{a['share_at_least_median_tumour_slice']:.0%}"),
        ("anomalous pixels per patch", f"{stats['anomalous_pixel_share']:.1%}",
         f"{a['anomalous_pixel_share']:.0%}"),
    ]
    print(f"{stats['anomalies']} anomalies, patch {stats['config']['patch_size']} px, "
          f"box {stats['config']['anomaly_box']} px\n")
    print("| statistic | uadjax | authors |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if _JSON.value:
        atomic.write_json(_JSON.value, stats, indent=1)


if __name__ == "__main__":
    app.run(main)
