"""The evaluation protocol on score volumes, NumPy only: post-processing, thresholds, metrics.

Method-agnostic: it sees reassembled score volumes [D, H, W] (`ScoredVolume`), never a network.
The protocol follows Behrendt et al. (docs/methods.md, Evaluation protocol), with the
literature's alternatives reported beside it and labelled:
  - post-processing: eroded brain mask, 3D median filter; connected-component filter on the
    binary map (each switchable in `config.eval`);
  - threshold 'val': greedy search on the lesion validation volumes of the same lesion kind
    (the fair protocol, the default everywhere);
  - threshold 'oracle': the best pooled-Dice threshold on the test volumes themselves;
  - thresholds 'fpr@r': label-free, at false-positive rate r on healthy validation volumes;
  - per-volume metrics (mean and std over volumes), pooled metrics over all voxels, and the
    false-positive volume on healthy test subjects.
The job that scores the splits and writes the outputs is `uadjax.evaluation`.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import precision_recall_curve

from uadjax import metrics
from uadjax.data import schema
from uadjax.inference import postprocess
from uadjax.inference.scoring import ScoredVolume


def postprocess_volumes(volumes: dict[str, ScoredVolume], ecfg) -> dict[str, np.ndarray]:
    """subject -> post-processed score [D, H, W] (eroded brain mask, median filter)."""
    return {
        sid: postprocess.postprocess_scores(
            v.score, v.brain_mask, erode_iterations=ecfg.erode_iterations,
            median_size=ecfg.median_size)
        for sid, v in volumes.items()
    }


def _spacing_of(spacing, sid):
    """`spacing` is one (D, H, W) voxel size in mm, or a mapping subject -> voxel size."""
    return spacing[sid] if isinstance(spacing, dict) else spacing


def _per_volume(sids, scores, volumes, threshold, ecfg, spacing):
    rows = []
    for sid in sids:
        pred = postprocess.binarize(scores[sid], threshold,
                                    min_component_size=ecfg.min_component_size)
        row = metrics.volume_metrics(scores[sid], pred, volumes[sid].seg,
                                     spacing=_spacing_of(spacing, sid))
        rows.append({"subject_id": sid, "kind": volumes[sid].kind, **row})
    return rows


def _pooled(sids, scores, volumes, threshold, ecfg):
    preds = [postprocess.binarize(scores[s], threshold, min_component_size=ecfg.min_component_size)
             for s in sids]
    return metrics.pooled_metrics([scores[s] for s in sids], preds,
                                  [volumes[s].seg for s in sids])


def postprocess_splits(split_volumes: dict[str, dict[str, ScoredVolume]], ecfg):
    """subject -> post-processed score [D, H, W], over every split."""
    scores = {}
    for vols in split_volumes.values():
        scores.update(postprocess_volumes(vols, ecfg))
    return scores


def evaluate_scores(split_volumes: dict[str, dict[str, ScoredVolume]], ecfg, *,
                    spacing, scores: dict | None = None) -> tuple[dict, list[dict]]:
    """Thresholds and metrics for one method's score volumes.

    Args:
      split_volumes: split name -> subject -> ScoredVolume (raw scores).
      ecfg: `config.eval`.
      spacing: voxel size in mm of the evaluation grid (D, H, W order), or a mapping
        subject -> voxel size when volumes keep their native spacing.
      scores: post-processed scores (`postprocess_splits`), computed here if None.
    Returns:
      (results dict, per-subject rows for the CSV).
    """
    scores = postprocess_splits(split_volumes, ecfg) if scores is None else scores
    volumes = {sid: v for vols in split_volumes.values() for sid, v in vols.items()}
    val = split_volumes.get(schema.VAL_LESION, {})
    test = split_volumes.get(schema.TEST_LESION, {})
    val_healthy = split_volumes.get(schema.VAL_HEALTHY, {})
    test_healthy = split_volumes.get(schema.TEST_HEALTHY, {})

    fpr_thresholds = {}
    if val_healthy:
        values = metrics.threshold_at_fpr(
            [scores[s] for s in val_healthy],
            [postprocess.erode_brain_mask(volumes[s].brain_mask, ecfg.erode_iterations)
             for s in val_healthy], list(ecfg.fprs))
        fpr_thresholds = {f"fpr@{r:g}": float(t) for r, t in zip(ecfg.fprs, np.atleast_1d(values))}

    results: dict = {"kinds": {}, "fpr_thresholds": fpr_thresholds}
    rows: list[dict] = []
    kinds = sorted({v.kind for v in test.values()})
    for kind in kinds:
        val_ids = sorted(s for s, v in val.items() if v.kind == kind)
        test_ids = sorted(s for s, v in test.items() if v.kind == kind)
        entry: dict = {"num_test": len(test_ids), "num_val": len(val_ids)}
        thresholds = {}
        if val_ids:
            found = metrics.greedy_threshold_search(
                [scores[s] for s in val_ids], [volumes[s].seg for s in val_ids],
                steps=ecfg.threshold_steps)
            thresholds["val"] = found.threshold
            entry["val_dice_at_selection"] = found.dice
        if not any(volumes[s].seg.any() for s in test_ids):
            entry["warning"] = "no lesion voxel inside the evaluation grid of any test volume"
            results["kinds"][kind] = entry
            continue
        oracle = metrics.best_dice_threshold([scores[s] for s in test_ids],
                                             [volumes[s].seg for s in test_ids])
        thresholds["oracle"] = oracle.threshold
        thresholds.update(fpr_thresholds)
        for source, threshold in thresholds.items():
            per_volume = _per_volume(test_ids, scores, volumes, threshold, ecfg, spacing)
            entry[source] = {
                "threshold": float(threshold),
                "per_volume": metrics.summarize(per_volume),
                "pooled": _pooled(test_ids, scores, volumes, threshold, ecfg),
            }
            rows.extend({"threshold_source": source, "threshold": float(threshold), **r}
                        for r in per_volume)
            if test_healthy and source == "val":
                entry["healthy_fp_volume_ml"] = _healthy_fp(
                    test_healthy, scores, threshold, ecfg, spacing)
        results["kinds"][kind] = entry
    return results, rows


def _healthy_fp(test_healthy, scores, threshold, ecfg, spacing) -> dict:
    volumes_ml = [
        metrics.false_positive_volume_ml(
            postprocess.binarize(scores[s], threshold, min_component_size=ecfg.min_component_size),
            None, spacing=_spacing_of(spacing, s))
        for s in sorted(test_healthy)]
    return {"mean": float(np.mean(volumes_ml)), "std": float(np.std(volumes_ml)),
            "n": len(volumes_ml)}


# ------------------------------------------------------------------------------------------
# Output files.

def results_table(all_results: dict[str, dict]) -> str:
    """Markdown table: one row per (method, lesion kind), val-selected threshold + oracle."""
    lines = [
        ("| method | lesion | n | Dice (val thr) | AUPRC | AUROC | precision | recall | "
         "ASSD (mm) | Dice (oracle thr) | healthy FP (ml) |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, res in all_results.items():
        for kind, entry in res["kinds"].items():
            if "oracle" not in entry:
                lines.append(f"| {method} | {kind} | {entry['num_test']} | "
                             f"{entry.get('warning', 'n/a')} |||||||")
                continue
            if "val" not in entry:
                lines.append(f"| {method} | {kind} | {entry['num_test']} | "
                             "n/a (no lesion-validation subject of this kind) |||||||")
                continue
            pv = entry["val"]["per_volume"]

            def cell(name, scale=100.0, pv=pv):
                m = pv.get(name, {})
                mean, std = m.get("mean", float("nan")), m.get("std", float("nan"))
                return f"{scale * mean:.1f} ± {scale * std:.1f}" if math.isfinite(mean) else "n/a"

            fp = entry.get("healthy_fp_volume_ml", {}).get("mean", float("nan"))
            lines.append(
                f"| {method} | {kind} | {entry['num_test']} | {cell('dice')} | {cell('ap')} | "
                f"{cell('auroc')} | {cell('precision')} | {cell('recall')} | "
                f"{cell('assd', 1.0)} | "
                f"{100 * entry['oracle']['per_volume']['dice']['mean']:.1f} | {fp:.1f} |")
    return "\n".join(lines)


def calibrate(split_volumes, ecfg, scores: dict) -> dict:
    """The threshold for prediction: greedy search on all lesion-validation volumes pooled
    (`scores`: post-processed, as from `postprocess_splits`)."""
    val = split_volumes.get(schema.VAL_LESION, {})
    out: dict = {"postprocess": {"erode_iterations": ecfg.erode_iterations,
                                 "median_size": ecfg.median_size,
                                 "min_component_size": ecfg.min_component_size}}
    if val:
        found = metrics.greedy_threshold_search([scores[s] for s in sorted(val)],
                                                [val[s].seg for s in sorted(val)],
                                                steps=ecfg.threshold_steps)
        out["threshold"] = float(found.threshold)
        out["threshold_source"] = "greedy search on all lesion-validation volumes"
        out["val_dice"] = float(found.dice)
    return out


def reconstruction_summary(split_volumes) -> dict | None:
    """Reconstruction quality on the healthy test volumes (per-volume SSIM, PSNR, L1: mean,
    std) and, per lesion kind, the L1 ratio = mean L1 on that kind's test volumes / mean L1
    on the healthy ones (cDDPM's Table 2). None when the method reconstructs nothing.

    The reconstruction is compared with the input channels it reproduces: all of them, or
    the first C when it has C < M channels.
    """
    def l1_and_quality(vol):
        channels = vol.reconstruction.shape[-1]
        return metrics.reconstruction_quality(vol.image[..., :channels], vol.reconstruction,
                                              vol.brain_mask)

    def in_brain_l1(vol):
        channels = vol.reconstruction.shape[-1]
        diff = np.abs(vol.image[..., :channels] - vol.reconstruction)[vol.brain_mask]
        return float(diff.mean()) if diff.size else 0.0

    healthy = [v for v in split_volumes.get(schema.TEST_HEALTHY, {}).values()
               if v.reconstruction is not None]
    if not healthy:
        return None
    per_volume = [l1_and_quality(v) for v in healthy]
    out = {"healthy": {k: {"mean": float(np.mean([q[k] for q in per_volume])),
                           "std": float(np.std([q[k] for q in per_volume])),
                           "n": len(per_volume)} for k in ("ssim", "psnr", "l1")},
           "l1_ratio": {}}
    healthy_l1 = out["healthy"]["l1"]["mean"]
    lesion = [v for v in split_volumes.get(schema.TEST_LESION, {}).values()
              if v.reconstruction is not None]
    for kind in sorted({v.kind for v in lesion}):
        l1 = np.mean([in_brain_l1(v) for v in lesion if v.kind == kind])
        out["l1_ratio"][kind] = float(l1 / healthy_l1) if healthy_l1 > 0 else math.nan
    return out


def pr_curves(split_volumes, processed: dict, *, points: int = 200) -> dict:
    """kind -> {'precision': [...], 'recall': [...]}: the pooled in-brain PR curve of the
    test lesion volumes (post-processed scores, voxels subsampled as in the report's
    figure), reduced to about `points` points for results.json."""
    test = split_volumes.get(schema.TEST_LESION, {})
    out = {}
    for kind in sorted({v.kind for v in test.values()}):
        scores, labels = pooled_sample([v for v in test.values() if v.kind == kind],
                                              processed)
        if not labels.any():
            continue
        precision, recall, _ = precision_recall_curve(labels, scores)
        keep = np.unique(np.linspace(0, len(recall) - 1, points).astype(int))
        out[kind] = {"precision": np.round(precision[keep], 5).tolist(),
                     "recall": np.round(recall[keep], 5).tolist()}
    return out


def pooled_sample(volumes: list[ScoredVolume], scores: dict[str, np.ndarray], *,
                  max_voxels: int = 400_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pooled in-brain (score, label) pairs, uniformly subsampled to `max_voxels`."""
    s = np.concatenate([scores[v.subject_id][v.brain_mask] for v in volumes])
    y = np.concatenate([v.seg[v.brain_mask] for v in volumes])
    if s.size > max_voxels:
        keep = np.random.default_rng(seed).choice(s.size, max_voxels, replace=False)
        s, y = s[keep], y[keep]
    return s, y
