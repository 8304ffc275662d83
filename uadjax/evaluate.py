"""Evaluation: score maps -> post-processing -> thresholds -> metrics -> report.

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
"""

from __future__ import annotations

import csv
import math
import os
import time

import numpy as np

from uadjax import atomic, metrics, parallel, report, runs
from uadjax.data import builder, pipeline, schema
from uadjax.inference import postprocess
from uadjax.inference.scoring import ScoredVolume, make_batch_scorer, score_volumes
from uadjax.methods import get_method


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


def write_subjects_csv(path: str, rows_by_method: dict[str, list[dict]]) -> None:
    fields = ["method", "subject_id", "kind", "threshold_source", "threshold",
              *metrics.VOLUME_METRIC_KEYS]
    with atomic.atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for method, rows in rows_by_method.items():
            for row in rows:
                writer.writerow({"method": method, **row})


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


# ------------------------------------------------------------------------------------------
# The evaluation job.

EVAL_SPLITS = (schema.VAL_LESION, schema.TEST_LESION, schema.VAL_HEALTHY, schema.TEST_HEALTHY)


def score_splits(config, models, score_fn, *, progress: bool = True, splits=EVAL_SPLITS):
    """-> (split -> subject -> ScoredVolume for every prepared evaluation split, volumes
    index, seconds spent compiling the scorer on its first batch)."""

    index = builder.load_volumes_index(config.data.data_dir, config.data)
    num_slices = {e["id"]: e["num_slices"] for e in index["subjects"]}
    mesh = parallel.make_mesh()
    scorer = make_batch_scorer(score_fn, models, config, mesh, seed=config.eval.seed)
    out = {}
    compile_seconds = None
    for split in splits:
        try:
            source = builder.load_split(config.data.data_dir, config.data, split)
        except KeyError:
            continue
        if compile_seconds is None:  # compile on one batch, timed apart from scoring
            start = time.perf_counter()
            first = pipeline.make_eval_batches(source, batch_size=config.eval.batch_size)
            scorer(next(iter(first)), 0)
            compile_seconds = time.perf_counter() - start
        batches = pipeline.make_eval_batches(source, batch_size=config.eval.batch_size)
        out[split] = score_volumes(scorer, batches, num_slices=num_slices, progress=progress,
                                   desc=f"score/{split}")
    return out, index, compile_seconds or 0.0


def baseline_volumes(split_volumes):
    """The intensity-threshold baseline's score volumes from the same inputs."""
    import dataclasses

    return {split: {sid: dataclasses.replace(v, score=np.mean(v.image, axis=-1),
                                             reconstruction=None)
                    for sid, v in vols.items()}
            for split, vols in split_volumes.items()}


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


def run_evaluation(config, workdir: str, *, out_dir: str | None = None,
                   progress: bool = True) -> dict:
    """Scores, thresholds and measures; writes results.json, subjects.csv, report.md.

    Args:
      out_dir: where the outputs go; `<workdir>/eval` by default (another folder lets one
        trained run be evaluated under several test-time settings, e.g. with and without ENS).
    """

    out_dir = out_dir or os.path.join(workdir, "eval")
    method = get_method(config.method)
    models, checkpoint_steps = runs.load_models_and_steps(config, workdir)
    atomic.check_writable(out_dir)  # fail now, not after scoring
    (split_volumes, index, compile_seconds), total_seconds = timed(
        score_splits, config, models, method.score_fn, progress=progress,
        splits=tuple(config.eval.get("splits", EVAL_SPLITS)))
    score_seconds = total_seconds - compile_seconds
    spacing = {}  # volumes are [D, H, W] = canonical (z, x, y)
    for entry in index["subjects"]:
        sx, sy, sz = (float(s) for s in entry["geometry"]["spacing_after"])
        spacing[entry["id"]] = (sz, sx, sy)
    sources = {config.method: split_volumes}
    if config.eval.baseline and config.method != "threshold":
        sources["threshold"] = baseline_volumes(split_volumes)
    all_results, rows, seconds, processed = {}, {}, {}, {}
    for name, vols in sources.items():
        processed[name] = postprocess_splits(vols, config.eval)
        (res, name_rows), seconds[name] = timed(evaluate_scores, vols, config.eval,
                                                spacing=spacing, scores=processed[name])
        all_results[name], rows[name] = res, name_rows
    calibration = calibrate(split_volumes, config.eval, processed[config.method])
    num_slices = sum(v.score.shape[0] for vols in split_volumes.values() for v in vols.values())
    num_volumes = sum(len(vols) for vols in split_volumes.values())
    curves = pr_curves(split_volumes, processed[config.method])
    for kind, curve in curves.items():
        all_results[config.method]["kinds"].setdefault(kind, {})["pr_curve"] = curve
    summary = {
        "method": config.method, "modalities": list(config.data.modalities),
        "checkpoints": checkpoint_steps,
        "reconstruction": reconstruction_summary(split_volumes),
        "spacing_mm": sorted(set(spacing.values())), "results": all_results,
        "calibration": calibration,
        "timing": {"score_seconds": score_seconds, "compile_seconds": compile_seconds,
                   "slices_scored": num_slices,
                   "slices_per_second": num_slices / max(score_seconds, 1e-9),
                   "volumes_scored": num_volumes,
                   # wall time of scoring per volume, data loading included (compilation not)
                   "seconds_per_volume": score_seconds / max(num_volumes, 1),
                   "metric_seconds": seconds},
    }
    with atomic.staged_dir(out_dir) as stage:  # all outputs of this evaluation, or none
        _write_outputs(str(stage), summary, rows, sources, processed, config)
    print(results_table(all_results))
    return summary


def _write_outputs(out_dir, summary, rows, sources, processed, config) -> None:
    """results.json, calibration.json, subjects.csv, report.md and its figures."""

    all_results, calibration, timing = summary["results"], summary["calibration"], summary["timing"]
    num_slices, score_seconds = timing["slices_scored"], timing["score_seconds"]
    compile_seconds = timing["compile_seconds"]
    atomic.write_json(os.path.join(out_dir, "results.json"), summary)
    save_examples(os.path.join(out_dir, EXAMPLES_FILE), sources[config.method],
                  processed[config.method], config.eval.num_figures)
    atomic.write_json(os.path.join(out_dir, "calibration.json"), calibration)
    write_subjects_csv(os.path.join(out_dir, "subjects.csv"), rows)
    table = results_table(all_results)
    sections = _figures(out_dir, sources, processed, all_results, config)
    report.write_report(
        os.path.join(out_dir, "report.md"),
        title=f"uadjax evaluation: {config.method} on {'/'.join(config.data.modalities)}",
        table=table + "\n\nDice with the threshold selected on the lesion-validation volumes "
        "of each kind (greedy search, Behrendt), per-volume mean ± std; AUPRC = average "
        "precision per volume (all voxels); oracle = best pooled-Dice threshold on the test "
        "set itself (not a fair score, shown for comparison with papers that report it); "
        "healthy FP = false-positive volume on healthy test subjects at the validation "
        f"threshold. Scoring: {num_slices} slices in {score_seconds:.1f} s (plus "
        f"{compile_seconds:.1f} s compiling). Checkpoints: {_checkpoint_line(summary)}",
        sections=sections)


def _checkpoint_line(summary) -> str:
    """'stage step N' per scoring stage; a fallback past unreadable newer steps is flagged."""
    parts = []
    for name, info in summary["checkpoints"].items():
        part = f"{name} step {info['step']}"
        if info["trained_steps"] < info["num_steps"]:
            part += f" (**unfinished**: {info['trained_steps']} of {info['num_steps']} steps)"
        if info["fell_back"]:
            part += (f" (**not the latest**: step {info['latest_step']} could not be read, "
                     "see the warning in the log)")
        parts.append(part)
    return (", ".join(parts) if parts else "none (no trained stages)") + "."


EXAMPLES_FILE = "examples.npz"


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
    from sklearn.metrics import precision_recall_curve


    test = split_volumes.get(schema.TEST_LESION, {})
    out = {}
    for kind in sorted({v.kind for v in test.values()}):
        scores, labels = report.pooled_sample([v for v in test.values() if v.kind == kind],
                                              processed)
        if not labels.any():
            continue
        precision, recall, _ = precision_recall_curve(labels, scores)
        keep = np.unique(np.linspace(0, len(recall) - 1, points).astype(int))
        out[kind] = {"precision": np.round(precision[keep], 5).tolist(),
                     "recall": np.round(recall[keep], 5).tolist()}
    return out


def save_examples(path: str, split_volumes, processed: dict, per_kind: int) -> None:
    """The slice with the largest lesion of the first `per_kind` test subjects (sorted ids)
    of each lesion kind: image (channel 0), ground truth and post-processed score, as
    `examples.npz` (plain arrays, no pickle), so a benchmark can show the same subjects
    across methods."""

    test = split_volumes.get(schema.TEST_LESION, {})
    arrays = {}
    for kind in sorted({v.kind for v in test.values()}):
        ids = [s for s in sorted(test) if test[s].kind == kind][:per_kind]
        picks = [(s, report.lesion_slice(test[s].seg)) for s in ids]
        arrays[f"{kind}/ids"] = np.array([s for s, _ in picks], dtype=str)
        arrays[f"{kind}/slice"] = np.array([k for _, k in picks], np.int32)
        arrays[f"{kind}/image"] = np.stack([test[s].image[k, ..., 0] for s, k in picks])
        arrays[f"{kind}/seg"] = np.stack([test[s].seg[k] for s, k in picks]).astype(np.uint8)
        arrays[f"{kind}/score"] = np.stack([processed[s][k] for s, k in picks]).astype(np.float32)
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def _figures(out_dir, sources, processed, all_results, config) -> list[str]:
    """Example panels and pooled PR curves per lesion kind; returns report sections."""

    test = sources[config.method].get(schema.TEST_LESION, {})
    sections = []
    for kind in sorted({v.kind for v in test.values()}):
        entry = all_results[config.method]["kinds"][kind]
        if "oracle" not in entry:
            continue
        kind_ids = [s for s in sorted(test) if test[s].kind == kind]
        threshold = entry["val"]["threshold"] if "val" in entry else entry["oracle"]["threshold"]
        name = f"examples_{kind}.png"
        report.save_examples_figure(
            os.path.join(out_dir, name), [test[s] for s in kind_ids[:config.eval.num_figures]],
            processed[config.method], threshold, title=f"{config.method}: {kind}")
        curves = {
            method_name: report.pooled_sample(
                [vols[schema.TEST_LESION][s] for s in kind_ids], processed[method_name])
            for method_name, vols in sources.items()}
        pr_name = f"pr_{kind}.png"
        report.save_pr_figure(os.path.join(out_dir, pr_name), curves,
                              title=f"pooled in-brain PR curve: {kind}")
        sections.append(f"## {kind}\n\n![examples]({name})\n\n![PR curve]({pr_name})")
    return sections
