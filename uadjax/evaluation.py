"""The evaluation job: score every evaluation split, apply the protocol, write the outputs.

Scoring runs the method's score function over the prepared splits (`score_splits`); the
protocol on the score volumes (post-processing, thresholds, metrics) is `uadjax.protocol`;
`run_evaluation` writes results.json, calibration.json, subjects.csv and report.md.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import time

import numpy as np

from uadjax import atomic, metrics, parallel, protocol, report, results, runs
from uadjax.data import builder, pipeline, schema
from uadjax.inference.scoring import make_batch_scorer, score_volumes
from uadjax.methods import get_method, threshold


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
    """The intensity-threshold baseline's score volumes from the same inputs, scored by the
    threshold method's own function (all the inputs' channels)."""
    return {split: {sid: dataclasses.replace(v, score=threshold.intensity_score(v.image),
                                             reconstruction=None)
                    for sid, v in vols.items()}
            for split, vols in split_volumes.items()}


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
        processed[name] = protocol.postprocess_splits(vols, config.eval)
        (res, name_rows), seconds[name] = timed(protocol.evaluate_scores, vols, config.eval,
                                                spacing=spacing, scores=processed[name])
        all_results[name], rows[name] = res, name_rows
    calibration = protocol.calibrate(split_volumes, config.eval, processed[config.method])
    num_slices = sum(v.score.shape[0] for vols in split_volumes.values() for v in vols.values())
    num_volumes = sum(len(vols) for vols in split_volumes.values())
    curves = protocol.pr_curves(split_volumes, processed[config.method])
    for kind, curve in curves.items():
        all_results[config.method]["kinds"].setdefault(kind, {})["pr_curve"] = curve
    summary = {
        "method": config.method, "modalities": list(config.data.modalities),
        "checkpoints": checkpoint_steps,
        "reconstruction": protocol.reconstruction_summary(split_volumes),
        "spacing_mm": sorted(set(spacing.values())), "results": all_results,
        "calibration": calibration,
        "timing": {"score_seconds": score_seconds, "compile_seconds": compile_seconds,
                   "slices_scored": num_slices,
                   "slices_per_second": num_slices / max(score_seconds, 1e-9),
                   "volumes_scored": num_volumes,
                   # wall time of scoring per volume, data loading included (compilation not)
                   "seconds_per_volume": score_seconds / max(num_volumes, 1),
                   "metric_seconds": seconds},
        "schema_version": results.SCHEMA_VERSION,
    }
    with atomic.staged_dir(out_dir) as stage:  # all outputs of this evaluation, or none
        _write_outputs(str(stage), summary, rows, sources, processed, config)
    print(protocol.results_table(all_results))
    return summary


def _write_outputs(out_dir, summary, rows, sources, processed, config) -> None:
    """results.json, calibration.json, subjects.csv, report.md and its figures."""

    all_results, calibration, timing = summary["results"], summary["calibration"], summary["timing"]
    num_slices, score_seconds = timing["slices_scored"], timing["score_seconds"]
    compile_seconds = timing["compile_seconds"]
    # through the typed schema: what is written is what every reader checks on loading
    results.EvaluationResults.from_json(summary).save(
        os.path.join(out_dir, results.RESULTS_FILE))
    save_examples(os.path.join(out_dir, EXAMPLES_FILE), sources[config.method],
                  processed[config.method], config.eval.num_figures)
    atomic.write_json(os.path.join(out_dir, "calibration.json"), calibration)
    write_subjects_csv(os.path.join(out_dir, "subjects.csv"), rows)
    table = protocol.results_table(all_results)
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
            method_name: protocol.pooled_sample(
                [vols[schema.TEST_LESION][s] for s in kind_ids], processed[method_name])
            for method_name, vols in sources.items()}
        pr_name = f"pr_{kind}.png"
        report.save_pr_figure(os.path.join(out_dir, pr_name), curves,
                              title=f"pooled in-brain PR curve: {kind}")
        sections.append(f"## {kind}\n\n![examples]({name})\n\n![PR curve]({pr_name})")
    return sections
