"""The evaluation job: score every evaluation split, apply the protocol, write the outputs.

Scoring runs the method's score function over the prepared splits (`score_splits`): with N
processes (jax.distributed) each scores every N-th volume into the evaluation's volume store
(`inference.volume_store`), which also lets a killed evaluation resume. Process 0 runs the
protocol on the score volumes (post-processing, thresholds, metrics: `uadjax.protocol`) and
`run_evaluation` writes results.json, calibration.json, subjects.csv and report.md.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from collections.abc import Mapping

import jax
import numpy as np

from uadjax import atomic, jobs, metrics, parallel, protocol, report, results, runs
from uadjax.data import builder, pipeline, schema
from uadjax.inference.scoring import RecordRange, ScoredVolume, make_batch_scorer, score_volume
from uadjax.inference.volume_store import VolumeStore, identity_of
from uadjax.methods import get_method, threshold
from uadjax.progress import progress_bar


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


def split_subjects(index: dict, splits) -> list[dict]:
    """The volumes-index entries of the prepared evaluation splits, split by split, each in
    its records' order."""
    return [e for split in splits
            for e in sorted((e for e in index["subjects"] if e["split"] == split),
                            key=lambda e: e["offset"])]


def score_splits(config, models, score_fn, store: VolumeStore, *, progress: bool = True,
                 splits=EVAL_SPLITS):
    """Scores this process's share of the evaluation volumes into `store`; process 0 then
    reads every process's volumes back.

    Returns:
      (split -> StoredSplit (subject -> ScoredVolume, loaded on demand) on process 0, None
      on the others; the volumes index; timing of this process: {'compile_seconds',
      'score_seconds', 'volumes_scored', 'slices_scored', 'slices_per_volume'}). Volumes
      already in the store (an interrupted evaluation) are not scored again and not counted;
      'slices_per_volume' is the mean over every evaluation volume, whoever scored it.
    """
    index = builder.load_volumes_index(config.data.data_dir, config.data)
    present = []
    sources = {}
    for split in splits:
        try:
            sources[split] = builder.load_split(config.data.data_dir, config.data, split)
        except KeyError:
            continue
        present.append(split)
    entries = split_subjects(index, present)
    timing = {"compile_seconds": 0.0, "score_seconds": 0.0, "volumes_scored": 0,
              "slices_scored": 0,
              "slices_per_volume": float(np.mean([e["num_slices"] for e in entries]))
              if entries else 0.0}
    with parallel.together("uadjax: evaluation volumes scored"):
        todo = [e for e in parallel.share(entries) if not store.has(e["split"], e["id"])]
        scorer = make_batch_scorer(score_fn, models, config, parallel.local_mesh(),
                                   seed=config.eval.seed)

        def batches(entry):
            return pipeline.make_eval_batches(
                RecordRange(sources[entry["split"]], entry["offset"], entry["num_records"]),
                batch_size=config.eval.batch_size)

        if todo:  # compile on one batch, timed apart from scoring
            start = time.perf_counter()
            scorer(next(iter(batches(todo[0]))), 0, todo[0]["id"])
            timing["compile_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        for entry in progress_bar(todo, disable=not progress, desc="score", leave=False):
            volume = score_volume(scorer, batches(entry), subject_id=entry["id"],
                                  num_slices=entry["num_slices"])
            store.save(entry["split"], volume)
            timing["volumes_scored"] += 1
            timing["slices_scored"] += entry["num_slices"]
        timing["score_seconds"] = time.perf_counter() - start
    # every process's scoring figures, for results.json (a collective: all processes call it)
    timing["per_process"] = [{k: t[k] for k in ("score_seconds", "compile_seconds",
                                                "volumes_scored", "slices_scored")}
                             for t in parallel.gather_json(timing)]
    if jax.process_index() != 0:
        return None, index, timing
    missing = [e for e in entries if not store.has(e["split"], e["id"])]
    if missing:
        store.load(missing[0]["split"], missing[0]["id"])  # raises, naming the file
    volumes = {split: store.split(split, {e["id"]: e["kind"] for e in entries
                                          if e["split"] == split})
               for split in present}
    return volumes, index, timing


class _Mapped(Mapping):
    """subject -> fn(volume) over a mapping of volumes, computed on access (lazy as it is)."""

    def __init__(self, volumes: Mapping[str, ScoredVolume], fn):
        self._volumes, self._fn, self.kinds = volumes, fn, protocol.kinds_of(volumes)

    def __getitem__(self, sid):
        return self._fn(self._volumes[sid])

    def __iter__(self):
        return iter(self._volumes)

    def __len__(self):
        return len(self._volumes)


def _as_baseline(volume: ScoredVolume) -> ScoredVolume:
    return dataclasses.replace(volume, score=threshold.intensity_score(volume.image),
                               reconstruction=None)


def baseline_volumes(split_volumes):
    """The intensity-threshold baseline's score volumes from the same inputs, scored by the
    threshold method's own function (all the inputs' channels), each when it is read."""
    return {split: _Mapped(vols, _as_baseline) for split, vols in split_volumes.items()}


def run_evaluation(config, workdir: str, *, out_dir: str | None = None,
                   progress: bool = True) -> dict:
    """Scores, thresholds and measures; writes results.json, subjects.csv, report.md (process
    0; every process returns the same summary).

    Args:
      out_dir: where the outputs go; `<workdir>/eval` by default (another folder lets one
        trained run be evaluated under several test-time settings, e.g. with and without ENS).
    """

    out_dir = out_dir or os.path.join(workdir, "eval")
    method = get_method(config.method)
    models, checkpoint_steps = runs.load_models_and_steps(config, workdir)
    atomic.check_writable(out_dir)  # fail now, not after scoring
    store = VolumeStore(out_dir, identity_of(config, checkpoint_steps,
                                             data=jobs.data_identity(config)))
    with parallel.together("uadjax: evaluation store ready"):
        if jax.process_index() == 0:
            kept = store.prepare()
            if kept:
                print(f"resuming an interrupted evaluation: {kept} volume(s) already scored")
    split_volumes, index, scoring = score_splits(
        config, models, method.score_fn, store, progress=progress,
        splits=tuple(config.eval.get("splits", EVAL_SPLITS)))
    with parallel.together("uadjax: evaluation written"):
        if split_volumes is not None:  # process 0: the protocol and the outputs
            summary = _evaluate_and_write(config, split_volumes, index, scoring,
                                          checkpoint_steps, out_dir, store.processed_dir)
            store.remove()
    if jax.process_index() != 0:
        with open(os.path.join(out_dir, results.RESULTS_FILE), encoding="utf-8") as fh:
            summary = json.load(fh)
    return summary


def _evaluate_and_write(config, split_volumes, index, scoring, checkpoint_steps,
                        out_dir, processed_dir=None) -> dict:
    """The protocol on every scored volume; writes the outputs; returns the summary.

    `processed_dir`: where post-processed scores are kept while the protocol runs (one
    volume in memory at a time); None keeps them in memory."""
    score_seconds, compile_seconds = scoring["score_seconds"], scoring["compile_seconds"]
    spacing = {}  # volumes are [D, H, W] = canonical (z, x, y)
    for entry in index["subjects"]:
        sx, sy, sz = (float(s) for s in entry["geometry"]["spacing_after"])
        spacing[entry["id"]] = (sz, sx, sy)
    sources = {config.method: split_volumes}
    if config.eval.baseline and config.method != "threshold":
        sources["threshold"] = baseline_volumes(split_volumes)
    all_results, rows, seconds, processed = {}, {}, {}, {}
    for name, vols in sources.items():
        processed[name] = protocol.postprocess_splits(
            vols, config.eval, None if processed_dir is None else os.path.join(processed_dir, name))
        (res, name_rows), seconds[name] = timed(protocol.evaluate_scores, vols, config.eval,
                                                spacing=spacing, scores=processed[name])
        all_results[name], rows[name] = res, name_rows
    calibration = protocol.calibrate(split_volumes, config.eval, processed[config.method])
    num_slices, num_volumes = scoring["slices_scored"], scoring["volumes_scored"]
    curves = protocol.pr_curves(split_volumes, processed[config.method])
    for kind, curve in curves.items():
        all_results[config.method]["kinds"].setdefault(kind, {})["pr_curve"] = curve
    summary = {
        "method": config.method, "modalities": list(config.data.modalities),
        "checkpoints": checkpoint_steps,
        "reconstruction": protocol.reconstruction_summary(split_volumes),
        "spacing_mm": sorted(set(spacing.values())), "results": all_results,
        "calibration": calibration,
        # Timing of process 0's share, scored in this call (a resumed evaluation does not
        # count the volumes scored before it); 'per_process': every process's share.
        "timing": {"score_seconds": score_seconds, "compile_seconds": compile_seconds,
                   "processes": jax.process_count(), "slices_scored": num_slices,
                   "slices_per_second": num_slices / max(score_seconds, 1e-9),
                   "volumes_scored": num_volumes,
                   "slices_per_volume": scoring["slices_per_volume"],
                   "per_process": scoring["per_process"],
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
    """'stage step N' per scoring stage, with the selection rule when it is the best
    validation loss; an unfinished stage or a fallback past unreadable newer steps is
    flagged."""
    parts = []
    for name, info in summary["checkpoints"].items():
        part = f"{name} step {info['step']}"
        finished = info.get("finished_steps", info["trained_steps"])
        if info.get("selection") == "best_val":
            part += (f" (lowest healthy-validation loss, {info['val_loss']:.5g}, of "
                     f"{finished} trained)")
        if finished < info["num_steps"]:
            part += f" (**unfinished**: {finished} of {info['num_steps']} steps)"
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
    kinds = protocol.kinds_of(test)
    arrays = {}
    for kind in sorted(set(kinds.values())):
        ids = [s for s in sorted(kinds) if kinds[s] == kind][:per_kind]
        picks = []  # (id, slice, image, seg, score), one volume read at a time
        for sid in ids:
            volume = test[sid]
            k = report.lesion_slice(volume.seg)
            picks.append((sid, k, volume.image[k, ..., 0], volume.seg[k], processed[sid][k]))
        arrays[f"{kind}/ids"] = np.array([p[0] for p in picks], dtype=str)
        arrays[f"{kind}/slice"] = np.array([p[1] for p in picks], np.int32)
        arrays[f"{kind}/image"] = np.stack([p[2] for p in picks])
        arrays[f"{kind}/seg"] = np.stack([p[3] for p in picks]).astype(np.uint8)
        arrays[f"{kind}/score"] = np.stack([p[4] for p in picks]).astype(np.float32)
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def _figures(out_dir, sources, processed, all_results, config) -> list[str]:
    """Example panels and pooled PR curves per lesion kind; returns report sections."""

    test = sources[config.method].get(schema.TEST_LESION, {})
    kinds = protocol.kinds_of(test)
    sections = []
    for kind in sorted(set(kinds.values())):
        entry = all_results[config.method]["kinds"][kind]
        if "oracle" not in entry:
            continue
        kind_ids = [s for s in sorted(kinds) if kinds[s] == kind]
        threshold = entry["val"]["threshold"] if "val" in entry else entry["oracle"]["threshold"]
        name = f"examples_{kind}.png"
        report.save_examples_figure(
            os.path.join(out_dir, name), [test[s] for s in kind_ids[:config.eval.num_figures]],
            processed[config.method], threshold, title=f"{config.method}: {kind}")
        curves = {
            method_name: protocol.pooled_sample(
                (vols[schema.TEST_LESION][s] for s in kind_ids), processed[method_name])
            for method_name, vols in sources.items()}
        pr_name = f"pr_{kind}.png"
        report.save_pr_figure(os.path.join(out_dir, pr_name), curves,
                              title=f"pooled in-brain PR curve: {kind}")
        sections.append(f"## {kind}\n\n![examples]({name})\n\n![PR curve]({pr_name})")
    return sections
