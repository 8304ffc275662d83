"""The evaluation protocol on score volumes, NumPy only: post-processing, thresholds, metrics.

Method-agnostic: it sees reassembled score volumes [D, H, W] (`ScoredVolume`), never a network.
The protocol follows Behrendt et al. (docs/methods.md, Evaluation protocol), with the
literature's alternatives reported beside it and labelled:
  - post-processing: eroded brain mask, 3D median filter; connected-component filter on the
    binary map (each switchable in `config.eval`);
  - threshold 'val': greedy search on the lesion validation volumes of the same lesion kind
    (the fair protocol, the default everywhere);
  - threshold 'oracle': the best pooled-Dice threshold on the test volumes themselves;
  - thresholds 'fpr@r': label-free, at false-positive rate r on healthy validation volumes,
    over their eroded brain (`eval.fpr_voxels = 'brain'`) or, as Behrendt's
    `utils_eval.py::_test_end` computes (and only logs) them, over every voxel of the
    volume, background included ('all');
  - per-volume metrics (mean and std over volumes), pooled metrics over all voxels, and the
    false-positive volume on healthy test subjects.
The job that scores the splits and writes the outputs is `uadjax.evaluation`.

Memory stays bounded for any test-set size: volumes are visited one at a time (the splits
may be lazy mappings that load each volume from disk, `inference.volume_store.StoredSplit`),
and the statistics pooled over voxels (thresholds, pooled AUPRC/AUROC) come from
`PooledVoxels`: every voxel while a pool holds at most `eval.max_pooled_voxels`, a seeded
uniform sample of that size beyond (exactly the same results below the cap).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
from sklearn.metrics import precision_recall_curve

from uadjax import atomic, metrics
from uadjax.data import schema
from uadjax.inference import postprocess
from uadjax.inference.scoring import ScoredVolume

FPR_VOXELS = ("brain", "all")  # where the label-free fpr@r thresholds count false positives
DEFAULT_MAX_POOLED_VOXELS = 1 << 24  # 16.8 M voxels: 84 MB per pool of float32 score + label


class PooledVoxels:
    """Voxels pooled over volumes, in bounded memory.

    `add` takes equally long 1-D arrays (e.g. scores and labels of one volume's voxels).
    While the pool holds at most `cap` voxels it keeps all of them, in order (then every
    statistic on it is exact); past the cap it halves itself (each kept voxel stays with
    probability 1/2, seeded), and keeps later voxels at the same rate, so that it is always a
    uniform sample of rate `rate` = 2^-k of everything added, at most `cap` long.
    """

    def __init__(self, cap: int, seed: int = 0):
        self.cap, self.rate, self.size, self._chunks = int(cap), 1.0, 0, []
        self._rng = np.random.default_rng(seed)

    def add(self, *arrays: np.ndarray) -> None:
        arrays = tuple(np.ravel(a) for a in arrays)
        if self.rate < 1.0:
            keep = self._rng.random(arrays[0].size) < self.rate
            arrays = tuple(a[keep] for a in arrays)
        self._chunks.append(arrays)
        self.size += arrays[0].size
        while self.size > self.cap:
            self.rate /= 2
            halved = []
            for chunk in self._chunks:
                keep = self._rng.random(chunk[0].size) < 0.5
                halved.append(tuple(a[keep] for a in chunk))
            self._chunks = halved
            self.size = sum(c[0].size for c in halved)

    def arrays(self) -> tuple[np.ndarray, ...]:
        """The pooled arrays, concatenated (empty arrays if nothing was added)."""
        if not self._chunks:
            return (np.zeros(0, np.float32), np.zeros(0, bool))
        return tuple(np.concatenate(parts) for parts in zip(*self._chunks, strict=True))


def _max_pooled(ecfg) -> int:
    return int(ecfg.get("max_pooled_voxels", DEFAULT_MAX_POOLED_VOXELS))


def kinds_of(volumes: Mapping[str, ScoredVolume]) -> dict[str, str]:
    """subject -> lesion kind, without loading lazy volumes (they carry `kinds`)."""
    kinds = getattr(volumes, "kinds", None)
    return dict(kinds) if kinds is not None else {s: v.kind for s, v in volumes.items()}


def postprocess_volume(volume: ScoredVolume, ecfg) -> np.ndarray:
    """The post-processed score [D, H, W] (eroded brain mask, median filter)."""
    return postprocess.postprocess_scores(
        volume.score, volume.brain_mask, erode_iterations=ecfg.erode_iterations,
        median_size=ecfg.median_size)


def postprocess_volumes(volumes: dict[str, ScoredVolume], ecfg) -> dict[str, np.ndarray]:
    """subject -> post-processed score [D, H, W] (eroded brain mask, median filter)."""
    return {sid: postprocess_volume(v, ecfg) for sid, v in volumes.items()}


class ProcessedScores(Mapping):
    """subject -> post-processed score [D, H, W], computed once per volume on first use and
    kept on disk (`<folder>/<subject>.npy`), so that memory does not grow with the splits."""

    def __init__(self, split_volumes, ecfg, folder: str | Path):
        self._split_of = {sid: split for split, vols in split_volumes.items() for sid in vols}
        self._splits, self._ecfg, self._folder = split_volumes, ecfg, Path(folder)

    def __getitem__(self, sid: str) -> np.ndarray:
        path = self._folder / f"{sid}.npy"
        if path.is_file():
            return np.load(path, allow_pickle=False)
        score = postprocess_volume(self._splits[self._split_of[sid]][sid], self._ecfg)
        with atomic.atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, score)
        return score

    def __iter__(self) -> Iterator[str]:
        return iter(self._split_of)

    def __len__(self) -> int:
        return len(self._split_of)


def _spacing_of(spacing, sid):
    """`spacing` is one (D, H, W) voxel size in mm, or a mapping subject -> voxel size."""
    return spacing[sid] if isinstance(spacing, dict) else spacing


def postprocess_splits(split_volumes: dict[str, dict[str, ScoredVolume]], ecfg,
                       cache_dir: str | Path | None = None) -> Mapping[str, np.ndarray]:
    """subject -> post-processed score [D, H, W], over every split: a dict, or with
    `cache_dir` a `ProcessedScores` mapping that computes each on first use (bounded memory)."""
    if cache_dir is not None:
        return ProcessedScores(split_volumes, ecfg, cache_dir)
    scores = {}
    for vols in split_volumes.values():
        scores.update(postprocess_volumes(vols, ecfg))
    return scores


def evaluate_scores(split_volumes: dict[str, Mapping[str, ScoredVolume]], ecfg, *,
                    spacing, scores: Mapping | None = None) -> tuple[dict, list[dict]]:
    """Thresholds and metrics for one method's score volumes, one volume at a time.

    Args:
      split_volumes: split name -> subject -> ScoredVolume (raw scores); dicts, or lazy
        mappings with a `kinds` attribute (subject -> kind).
      ecfg: `config.eval`.
      spacing: voxel size in mm of the evaluation grid (D, H, W order), or a mapping
        subject -> voxel size when volumes keep their native spacing.
      scores: post-processed scores (`postprocess_splits`), computed here if None.
    Returns:
      (results dict, per-subject rows for the CSV).
    """
    scores = postprocess_splits(split_volumes, ecfg) if scores is None else scores
    cap = _max_pooled(ecfg)
    val = split_volumes.get(schema.VAL_LESION, {})
    test = split_volumes.get(schema.TEST_LESION, {})
    val_healthy = split_volumes.get(schema.VAL_HEALTHY, {})
    test_healthy = split_volumes.get(schema.TEST_HEALTHY, {})

    fpr_thresholds = {}
    fpr_voxels = ecfg.get("fpr_voxels", "brain")
    if fpr_voxels not in FPR_VOXELS:
        raise ValueError(f"eval.fpr_voxels must be one of {FPR_VOXELS}, got {fpr_voxels!r}")
    if val_healthy:
        pool = PooledVoxels(cap, seed=1)
        for sid in val_healthy:
            if fpr_voxels == "all":
                pool.add(scores[sid].ravel())
                continue
            eroded = postprocess.erode_brain_mask(val_healthy[sid].brain_mask,
                                                  ecfg.erode_iterations)
            pool.add(scores[sid][eroded])
        values = metrics.threshold_at_fpr([pool.arrays()[0]], None, list(ecfg.fprs))
        fpr_thresholds = {f"fpr@{r:g}": float(t) for r, t in zip(ecfg.fprs, np.atleast_1d(values))}

    results: dict = {"kinds": {}, "fpr_thresholds": fpr_thresholds}
    rows: list[dict] = []
    val_kinds, test_kinds = kinds_of(val), kinds_of(test)
    for kind in sorted(set(test_kinds.values())):
        val_ids = sorted(s for s, k in val_kinds.items() if k == kind)
        test_ids = sorted(s for s, k in test_kinds.items() if k == kind)
        entry: dict = {"num_test": len(test_ids), "num_val": len(val_ids)}
        thresholds = {}
        if val_ids:
            found = metrics.greedy_threshold_search(
                *_all_voxels(val, val_ids, scores, cap), steps=ecfg.threshold_steps)
            thresholds["val"] = found.threshold
            entry["val_dice_at_selection"] = found.dice
        test_scores, test_labels = _all_voxels(test, test_ids, scores, cap)
        if not test_labels[0].any():
            entry["warning"] = "no lesion voxel inside the evaluation grid of any test volume"
            results["kinds"][kind] = entry
            continue
        oracle = metrics.best_dice_threshold(test_scores, test_labels)
        thresholds["oracle"] = oracle.threshold
        thresholds.update(fpr_thresholds)
        pooled_ap, pooled_auroc = metrics.ap_and_auroc(test_scores[0], test_labels[0])
        del test_scores, test_labels
        per_volume, pooled = _threshold_metrics(test_ids, test, scores, thresholds, ecfg,
                                                spacing)
        for source, threshold in thresholds.items():
            entry[source] = {
                "threshold": float(threshold),
                "per_volume": metrics.summarize(per_volume[source]),
                "pooled": {**pooled[source], "ap": pooled_ap, "auroc": pooled_auroc},
            }
            rows.extend({"threshold_source": source, "threshold": float(threshold), **r}
                        for r in per_volume[source])
            if test_healthy and source == "val":
                entry["healthy_fp_volume_ml"] = _healthy_fp(
                    test_healthy, scores, threshold, ecfg, spacing)
        results["kinds"][kind] = entry
    return results, rows


def _all_voxels(volumes, sids, scores, cap) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """([scores], [labels]) of every voxel of the volumes `sids`, pooled (`PooledVoxels`)."""
    pool = PooledVoxels(cap, seed=2)
    for sid in sids:
        pool.add(scores[sid], volumes[sid].seg)
    pooled_scores, labels = pool.arrays()
    return [pooled_scores], [labels.astype(bool)]


def _threshold_metrics(sids, volumes, scores, thresholds: dict, ecfg, spacing):
    """Per-volume metric rows and pooled binary counts at each threshold, one volume at a
    time: ({source: [row per volume]}, {source: pooled dice/precision/recall/jaccard})."""
    rows = {source: [] for source in thresholds}
    counts = {source: np.zeros(3, np.int64) for source in thresholds}  # tp, n_pred, n_gt
    for sid in sids:
        volume, score = volumes[sid], scores[sid]
        for source, threshold in thresholds.items():
            pred = postprocess.binarize(score, threshold,
                                        min_component_size=ecfg.min_component_size)
            row = metrics.volume_metrics(score, pred, volume.seg,
                                         spacing=_spacing_of(spacing, sid))
            rows[source].append({"subject_id": sid, "kind": volume.kind, **row})
            counts[source] += metrics.binary_counts(pred, volume.seg)
    pooled = {source: metrics.metrics_from_counts(*c) for source, c in counts.items()}
    return rows, pooled


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


def calibrate(split_volumes, ecfg, scores: Mapping) -> dict:
    """The threshold for prediction: greedy search on all lesion-validation volumes pooled
    (`scores`: post-processed, as from `postprocess_splits`)."""
    val = split_volumes.get(schema.VAL_LESION, {})
    out: dict = {"postprocess": {"erode_iterations": ecfg.erode_iterations,
                                 "median_size": ecfg.median_size,
                                 "min_component_size": ecfg.min_component_size}}
    if val:
        found = metrics.greedy_threshold_search(
            *_all_voxels(val, sorted(val), scores, _max_pooled(ecfg)),
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
    the first C when it has C < M channels. One volume at a time.
    """
    def l1_and_quality(vol):
        channels = vol.reconstruction.shape[-1]
        return metrics.reconstruction_quality(vol.image[..., :channels], vol.reconstruction,
                                              vol.brain_mask)

    def in_brain_l1(vol):
        channels = vol.reconstruction.shape[-1]
        diff = np.abs(vol.image[..., :channels] - vol.reconstruction)[vol.brain_mask]
        return float(diff.mean()) if diff.size else 0.0

    healthy = split_volumes.get(schema.TEST_HEALTHY, {})
    per_volume = [l1_and_quality(v) for v in _volumes(healthy, sorted(healthy))
                  if v.reconstruction is not None]
    if not per_volume:
        return None
    out = {"healthy": {k: {"mean": float(np.mean([q[k] for q in per_volume])),
                           "std": float(np.std([q[k] for q in per_volume])),
                           "n": len(per_volume)} for k in ("ssim", "psnr", "l1")},
           "l1_ratio": {}}
    healthy_l1 = out["healthy"]["l1"]["mean"]
    lesion = split_volumes.get(schema.TEST_LESION, {})
    kinds = kinds_of(lesion)
    for kind in sorted(set(kinds.values())):
        l1s = [in_brain_l1(v) for v in _volumes(lesion, sorted(s for s in kinds
                                                                if kinds[s] == kind))
               if v.reconstruction is not None]
        if l1s:
            out["l1_ratio"][kind] = float(np.mean(l1s) / healthy_l1) if healthy_l1 > 0 \
                else math.nan
    return out


def _volumes(volumes: Mapping[str, ScoredVolume], sids: Iterable[str]) -> Iterator[ScoredVolume]:
    """The volumes `sids`, one at a time (a lazy mapping loads each on demand)."""
    return (volumes[sid] for sid in sids)


def pr_curves(split_volumes, processed: Mapping, *, points: int = 200) -> dict:
    """kind -> {'precision': [...], 'recall': [...]}: the pooled in-brain PR curve of the
    test lesion volumes (post-processed scores, voxels subsampled as in the report's
    figure), reduced to about `points` points for results.json."""
    test = split_volumes.get(schema.TEST_LESION, {})
    kinds = kinds_of(test)
    out = {}
    for kind in sorted(set(kinds.values())):
        scores, labels = pooled_sample(
            _volumes(test, sorted(s for s in kinds if kinds[s] == kind)), processed)
        if not labels.any():
            continue
        precision, recall, _ = precision_recall_curve(labels, scores)
        keep = np.unique(np.linspace(0, len(recall) - 1, points).astype(int))
        out[kind] = {"precision": np.round(precision[keep], 5).tolist(),
                     "recall": np.round(recall[keep], 5).tolist()}
    return out


def pooled_sample(volumes: Iterable[ScoredVolume], scores: Mapping[str, np.ndarray], *,
                  max_voxels: int = 400_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pooled in-brain (score, label) pairs, a uniform sample of at most `max_voxels`
    (`PooledVoxels`), one volume at a time."""
    pool = PooledVoxels(max_voxels, seed)
    for v in volumes:
        pool.add(scores[v.subject_id][v.brain_mask], v.seg[v.brain_mask])
    s, y = pool.arrays()
    return s, y.astype(bool)
