"""What a trained DISYRE restorer does to the phantom's real lesions, per test label
(issue 22: D3's labels measured on real lesions, and what changes with training budget).

    python -m benchmarks.disyre_lesions --workdir=runs/budget/disyre-cpu_medium/seed0 \
        --workdir=runs/budget/disyre-cpu_long/seed0 [--per_kind 5] [--slice_step 4] [--json F]

On the first `per_kind` lesion-test subjects of each kind (every `slice_step`-th brain slice)
and as many healthy-test subjects, each run's sliding-window score (`disyre.score_fn`, raw
maps) is computed with every single test label t in `--labels` and with the run's own label
set (the ensemble the evaluation uses). Per lesion kind, over the brain pixels of the lesion
slices:
  - pixel AUROC and AUPRC of the score, and the best pooled Dice (oracle threshold);
  - contrast kept: (mean over lesion - mean over the slice's healthy brain) of the
    restoration, relative to the same of the input, over slices with at least 20 lesion
    pixels (1: the lesion passes through unrestored, 0: it is healed to the brain's mean);
  - the score's median over lesion pixels against its 99th percentile over the healthy brain
    pixels of the healthy-test slices (the false-positive floor a threshold must clear).
A falling AUPRC is then either lesions restored less (contrast kept rises, lesion median
falls) or healthy tissue scored higher (the floor rises).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from sklearn.metrics import roc_auc_score

from benchmarks.subsets import pixel_accuracy, slices_of
from uadjax import atomic, runs
from uadjax.data import schema
from uadjax.methods import disyre

_WORKDIRS = flags.DEFINE_multi_string("workdir", [], "Trained DISYRE run folders.")
_PER_KIND = flags.DEFINE_integer("per_kind", 5, "Subjects per lesion kind (and healthy).")
_SLICE_STEP = flags.DEFINE_integer("slice_step", 4, "Every n-th brain slice of a volume.")
_LABELS = flags.DEFINE_list("labels", ["0", "3", "13", "24", "49", "99"],
                            "Single test labels to score with, beside the run's own set.")
_BATCH = flags.DEFINE_integer("batch", 8, "Slices per call.")
_JSON = flags.DEFINE_string("json", "", "Also write the figures to this file.")
MIN_LESION_PIXELS = 20


def score_maps(model, data: dict, config, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(score [N, H, W], restoration [N, H, W, C]) of `data`'s slices with the labels of
    `config.disyre`."""
    run = jax.jit(lambda image, brain: disyre.score_fn(
        {disyre.STAGE: model}, {"image": image, "brain_mask": brain}, None, config))
    scores, recs = [], []
    n = len(data["image"])
    for start in range(0, n, batch):
        image = data["image"][start:start + batch]
        brain = data["brain_mask"][start:start + batch].astype(np.float32)
        pad = batch - len(image)
        image = np.concatenate([image, np.zeros((pad, *image.shape[1:]), np.float32)])
        brain = np.concatenate([brain, np.zeros((pad, *brain.shape[1:]), np.float32)])
        out = run(jnp.asarray(image), jnp.asarray(brain))
        scores.append(np.asarray(out["score"])[:batch - pad])
        recs.append(np.asarray(out["reconstruction"])[:batch - pad])
    return np.concatenate(scores), np.concatenate(recs)


def contrast_kept(image: np.ndarray, restored: np.ndarray, data: dict, sel: np.ndarray):
    """Mean over slices of (lesion - healthy brain) mean of `restored` relative to the same of
    `image` (channel mean), slices of `sel` with at least MIN_LESION_PIXELS lesion pixels."""
    ratios = []
    for i in np.flatnonzero(sel):
        lesion, brain = data["seg"][i], data["brain_mask"][i]
        healthy = brain & ~lesion
        if lesion.sum() < MIN_LESION_PIXELS or not healthy.any():
            continue
        x, r = image[i].mean(-1), restored[i].mean(-1)
        before = x[lesion].mean() - x[healthy].mean()
        if abs(before) < 1e-3:
            continue
        ratios.append((r[lesion].mean() - r[healthy].mean()) / before)
    return float(np.mean(ratios)) if ratios else float("nan")


def lesion_figures(scores, restored, healthy_scores, data, healthy) -> dict:
    """Per lesion kind: auroc, auprc, dice (pixel_accuracy), contrast_kept, lesion_median,
    healthy_p99 (over the healthy-test slices' brain pixels)."""
    floor = float(np.percentile(healthy_scores[healthy["brain_mask"]], 99))
    out = pixel_accuracy(scores, data)
    for kind in out:
        sel = data["kind"] == kind
        brain, seg = data["brain_mask"][sel], data["seg"][sel]
        values, labels = scores[sel][brain], seg[brain]
        out[kind]["auroc"] = (float(roc_auc_score(labels, values)) if labels.any()
                              else float("nan"))
        out[kind]["contrast_kept"] = contrast_kept(data["image"], restored, data, sel)
        lesion = seg & brain
        out[kind]["lesion_median"] = (float(np.median(scores[sel][lesion])) if lesion.any()
                                      else float("nan"))
        out[kind]["healthy_p99"] = floor
    return out


def main(argv):
    del argv
    rows = []
    data = healthy = None
    for workdir in _WORKDIRS.value:
        config = runs.run_config(workdir)
        if data is None:
            data = slices_of(config, schema.TEST_LESION, _PER_KIND.value, _SLICE_STEP.value)
            healthy = slices_of(config, schema.TEST_HEALTHY, _PER_KIND.value, _SLICE_STEP.value)
        models, steps = runs.load_models_and_steps(config, workdir)
        model = models[disyre.STAGE]
        own = tuple(int(t) for t in disyre.test_labels(config.disyre))
        label_sets = [("run's labels " + "/".join(map(str, own)), own)] + [
            (f"t = {t}", (int(t),)) for t in _LABELS.value]
        for name, labels in label_sets:
            config.disyre.test_timesteps = labels
            scores, restored = score_maps(model, data, config, _BATCH.value)
            healthy_scores, _ = score_maps(model, healthy, config, _BATCH.value)
            rows.append({"workdir": workdir, "step": steps[disyre.STAGE]["step"],
                         "labels": name,
                         "kinds": lesion_figures(scores, restored, healthy_scores, data,
                                                 healthy)})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| run | steps | labels | kind | AUROC | AUPRC | Dice | contrast kept "
          "| lesion median | healthy p99 |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for kind, f in r["kinds"].items():
            print(f"| {r['workdir']} | {r['step']} | {r['labels']} | {kind} | "
                  f"{100 * f['auroc']:.1f} | {100 * f['auprc']:.1f} | {100 * f['dice']:.1f} | "
                  f"{f['contrast_kept']:.2f} | {f['lesion_median']:.4f} | "
                  f"{f['healthy_p99']:.4f} |")
    if _JSON.value:
        atomic.write_json(_JSON.value, rows, indent=1)


if __name__ == "__main__":
    app.run(main)
