"""Why MMCCD's cyclic residual misses lesions: evaluation-only checks on a trained run
(issue 22).

    python -m benchmarks.mmccd_checks --workdir=runs/budget/mmccd-cpu_long/seed0 \
        [--per_kind 5] [--slice_step 8] [--json F]

On the first `per_kind` lesion-test subjects of each kind (every `slice_step`-th brain slice),
scored with the CPU protocol of `configs/mmccd.py` (one band per pixel per direction, both
directions, its DDIM steps), it separates the cycle x -> y_bar = f(x | masks) ->
x_hat = g(y_bar) into its parts. Per lesion kind, over the brain pixels:
  - pixel AUROC and AUPRC of: the score E = (x_hat - x)^2; f's error against the real target
    (y_bar - y)^2; g's error from the real target (g(y) - x)^2; and the intensity of x and of
    y (the thresholds);
  - contrast kept: (mean over lesion - mean over healthy brain of a slice's image) relative to
    the same of the real image, for y_bar (against y) and for x_hat and g(y) (against x),
    averaged over slices with at least 20 lesion pixels. 1 = the lesion passes through the
    translation unchanged (the residual cannot see it); 0 = the lesion is healed away;
  - whether f in-paints: on healthy brain pixels, the mean |y_bar - y| of the sweep (each
    pixel in-painted inside its bands) beside the same f run without a mask (the condition
    is x everywhere) and beside a constant (each slice's healthy-brain median of y);
  - where E is large on healthy tissue: its 99th percentile over healthy brain pixels beside
    its median over lesion pixels, and the share of the top 1 % of healthy pixels that lie
    within 2 pixels of the brain's edge (against the share of all healthy pixels there).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from benchmarks.subsets import slices_of
from configs import mmccd as mmccd_config
from uadjax import metrics, runs
from uadjax.data import schema
from uadjax.methods import mmccd

_WORKDIR = flags.DEFINE_string("workdir", None, "Trained MMCCD run folder.", required=True)
_PER_KIND = flags.DEFINE_integer("per_kind", 5, "Lesion-test subjects per kind.")
_SLICE_STEP = flags.DEFINE_integer("slice_step", 8, "Every n-th brain slice of a volume.")
_BATCH = flags.DEFINE_integer("batch", 4, "Slices per call.")
_JSON = flags.DEFINE_string("json", "", "Also write the figures to this file.")
MIN_LESION_PIXELS = 20
EDGE_PIXELS = 2


def cycle_parts(models, data: dict, config, batch: int) -> dict:
    """[N, H, W] maps in image units: 'score' E, 'y_bar', 'x_hat', 'g_of_y' = g(y) and
    'y_unmasked' = f's chain conditioned on x without a mask (from the sweep's y_T)."""
    f_and_g = {"forward": models["forward"], "backward": models["backward"]}
    src, tgt = mmccd.modality_indices(config)

    @jax.jit
    def run(image, brain_mask, key):
        out = mmccd.score_fn(f_and_g, {"image": image, "brain_mask": brain_mask}, key, config)
        _, y = mmccd.split_pair(image, config)
        g_of_y = mmccd.from_model(models["backward"](y, None), config)[..., 0]
        x, _ = mmccd.split_pair(image, config)
        y_T = jax.random.normal(jax.random.split(key)[0], x.shape)  # as mask_sweep's
        y_unmasked = mmccd.translate_masked(models["forward"], x, jnp.zeros(x.shape[1:3]),
                                            y_T, key, config)
        rec = out["reconstruction"]
        return {"score": out["score"], "x_hat": rec[..., src], "y_bar": rec[..., tgt],
                "g_of_y": g_of_y, "y_unmasked": mmccd.from_model(y_unmasked, config)[..., 0]}

    n = len(data["image"])
    parts: dict[str, list] = {}
    for i, start in enumerate(range(0, n, batch)):
        image = data["image"][start:start + batch]
        brain = data["brain_mask"][start:start + batch].astype(np.float32)
        pad = batch - len(image)
        image = np.concatenate([image, np.zeros((pad, *image.shape[1:]), np.float32)])
        brain = np.concatenate([brain, np.zeros((pad, *brain.shape[1:]), np.float32)])
        for k, v in run(jnp.asarray(image), jnp.asarray(brain), jax.random.key(i)).items():
            parts.setdefault(k, []).append(np.asarray(v)[:batch - pad])
    return {k: np.concatenate(v) for k, v in parts.items()}


def contrast_kept(estimate: np.ndarray, real: np.ndarray, data: dict, sel: np.ndarray):
    """Mean over slices of (lesion - healthy) contrast of `estimate` / that of `real`."""
    ratios = []
    for i in np.flatnonzero(sel):
        lesion = data["seg"][i] & data["brain_mask"][i]
        healthy = data["brain_mask"][i] & ~data["seg"][i]
        if lesion.sum() < MIN_LESION_PIXELS or not healthy.any():
            continue
        real_c = real[i][lesion].mean() - real[i][healthy].mean()
        if abs(real_c) < 1e-3:
            continue
        ratios.append((estimate[i][lesion].mean() - estimate[i][healthy].mean()) / real_c)
    return float(np.mean(ratios)) if ratios else float("nan"), len(ratios)


def edge_band(brain: np.ndarray) -> np.ndarray:
    """[N, H, W] bool: brain pixels within EDGE_PIXELS of the outside of the brain."""
    inner = np.stack([ndimage.binary_erosion(b, iterations=EDGE_PIXELS) for b in brain])
    return brain & ~inner


def main(argv):
    del argv
    config = runs.run_config(_WORKDIR.value)
    protocol = mmccd_config.get_config("cpu").mmccd  # the CPU protocol of today's config
    for key in ("directions", "test_stride", "ddim_steps", "band_width", "cond_noise"):
        config.mmccd[key] = protocol[key]
    models, steps = runs.load_models_and_steps(config, _WORKDIR.value)
    data = slices_of(config, schema.TEST_LESION, _PER_KIND.value, _SLICE_STEP.value)
    print(f"{len(data['image'])} slices of {len(set(data['subject_id']))} subjects; "
          f"checkpoints { {k: v['step'] for k, v in steps.items()} }; protocol "
          f"{tuple(config.mmccd.directions)} stride {config.mmccd.test_stride} "
          f"S = {config.mmccd.ddim_steps}", flush=True)
    maps = cycle_parts(models, data, config, _BATCH.value)
    src, tgt = mmccd.modality_indices(config)
    x, y = data["image"][..., src], data["image"][..., tgt]
    candidates = {"E = (x_hat - x)^2 (the score)": maps["score"],
                  "f error (y_bar - y)^2": np.square(maps["y_bar"] - y),
                  "g error (g(y) - x)^2": np.square(maps["g_of_y"] - x),
                  "intensity of x (source)": x, "intensity of y (target)": y}
    edges = edge_band(data["brain_mask"])
    healthy_all = data["brain_mask"] & ~data["seg"]
    median = np.array([np.median(y[i][healthy_all[i]]) if healthy_all[i].any() else 0.0
                       for i in range(len(y))])[:, None, None]
    inpainting = {"mean |y_bar - y|, in-painted (the sweep)":
                  float(np.abs(maps["y_bar"] - y)[healthy_all].mean()),
                  "mean |y_unmasked - y|, f without a mask": float(
                      np.abs(maps["y_unmasked"] - y)[healthy_all].mean()),
                  "mean |median - y|, a constant per slice": float(
                      np.abs(median - y)[healthy_all].mean())}
    print("f on healthy brain pixels:")
    for k, v in inpainting.items():
        print(f"  {k}: {v:.3f}")
    out = {"workdir": _WORKDIR.value, "slices": len(x), "steps": steps,
           "f_on_healthy_pixels": inpainting, "kinds": {}}
    for kind in sorted(set(data["kind"].tolist())):
        sel = data["kind"] == kind
        brain, seg = data["brain_mask"][sel], data["seg"][sel]
        labels = seg[brain]
        row = {"lesion_pixels": int(labels.sum()), "maps": {}}
        for name, m in candidates.items():
            scores = m[sel][brain]
            row["maps"][name] = {"auroc": float(roc_auc_score(labels, scores)),
                                 "auprc": metrics.average_precision(scores, labels)}
        for name, (est, real) in {"y_bar vs y": (maps["y_bar"], y),
                                  "x_hat vs x": (maps["x_hat"], x),
                                  "g(y) vs x": (maps["g_of_y"], x)}.items():
            ratio, used = contrast_kept(est, real, data, sel)
            row[f"contrast kept, {name}"] = ratio
            row["contrast_slices"] = used
        score = maps["score"][sel]
        healthy = brain & ~seg
        top = score[healthy] >= np.quantile(score[healthy], 0.99)
        row["E healthy p99"] = float(np.quantile(score[healthy], 0.99))
        row["E lesion median"] = float(np.median(score[brain & seg]))
        row["top 1 % healthy at the brain edge"] = float(edges[sel][healthy][top].mean())
        row["all healthy at the brain edge"] = float(edges[sel][healthy].mean())
        out["kinds"][kind] = row
        print(f"\n{kind} ({row['lesion_pixels']} lesion pixels)")
        for name, v in row["maps"].items():
            print(f"  {name:34s} AUROC {100 * v['auroc']:5.1f}  AUPRC {100 * v['auprc']:5.1f}")
        for k, v in row.items():
            if k not in ("maps", "lesion_pixels"):
                print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")
    if _JSON.value:
        with open(_JSON.value, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    app.run(main)
