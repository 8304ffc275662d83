"""Segmentation and detection metrics, threshold selection and aggregation (NumPy/SciPy).

Volumes are ``[D, H, W]`` arrays (``D`` = axial slices); scores are float, masks bool
(any non-zero value counts as True). Every metric is checked against scikit-learn or
SciPy in ``tests/test_metrics.py``.

Conventions (see docs/methods.md, Evaluation protocol and Evaluation conventions):

* Binary metrics (Dice, precision, recall, Jaccard) return ``nan`` when undefined
  (0/0: e.g. Dice with both masks empty, precision with an empty prediction).
  scikit-learn returns 0 there; ``nan`` keeps such volumes out of means, and
  ``summarize`` counts them.
* ``average_precision`` is the step-wise AP of ``sklearn.metrics.average_precision_score``
  (Behrendt's "AUPRC"); ``roc_auc`` equals ``sklearn.metrics.roc_auc_score``. Both handle
  tied scores like scikit-learn, and return ``nan`` when a class is missing (sklearn
  returns 0 for AP without positives and raises for AUROC).
* ``assd`` returns ``inf`` when exactly one mask is empty and ``nan`` when both are.
  ``summarize`` averages finite values only and reports the ``nan`` and ``inf`` counts.
* Thresholds binarise with ``score > threshold`` everywhere (as ``postprocess.binarize``).

Size: about 600 lines, one module for every metric and threshold rule, each tested against
scikit-learn or SciPy in tests/test_metrics.py; the evaluation protocol is `uadjax.protocol`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
from scipy import ndimage as ndi

Spacing = Sequence[float]


class ThresholdResult(NamedTuple):
    """A threshold and the pooled Dice it reaches (``score > threshold`` is anomalous)."""

    threshold: float
    dice: float


# ----------------------------------------------------------------------------------------
# Binary overlap metrics.


def _as_bool(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).astype(bool, copy=False)


def binary_counts(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, int]:
    """Returns (true positives, predicted positives, ground-truth positives)."""
    pred, gt = _as_bool(pred), _as_bool(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {pred.shape} != gt shape {gt.shape}")
    tp = int(np.count_nonzero(pred & gt))
    return tp, int(np.count_nonzero(pred)), int(np.count_nonzero(gt))


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else float("nan")


def _dice_from_counts(tp: int, n_pred: int, n_gt: int) -> float:
    return _ratio(2 * tp, n_pred + n_gt)


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice = 2|A∩B| / (|A| + |B|).

    Args:
        pred: [...] bool prediction.
        gt: [...] bool ground truth, same shape.

    Returns:
        Dice in [0, 1]; ``nan`` when both masks are empty.
    """
    return _dice_from_counts(*binary_counts(pred, gt))


def precision(pred: np.ndarray, gt: np.ndarray) -> float:
    """Precision = |A∩B| / |A|; ``nan`` when the prediction is empty."""
    tp, n_pred, _ = binary_counts(pred, gt)
    return _ratio(tp, n_pred)


def recall(pred: np.ndarray, gt: np.ndarray) -> float:
    """Recall (sensitivity) = |A∩B| / |B|; ``nan`` when the ground truth is empty."""
    tp, _, n_gt = binary_counts(pred, gt)
    return _ratio(tp, n_gt)


def jaccard(pred: np.ndarray, gt: np.ndarray) -> float:
    """Jaccard = |A∩B| / |A∪B|; ``nan`` when both masks are empty."""
    tp, n_pred, n_gt = binary_counts(pred, gt)
    return _ratio(tp, n_pred + n_gt - tp)


def voxel_volume_ml(spacing: Spacing = (1.0, 1.0, 1.0)) -> float:
    """Volume of one voxel in ml from its spacing in mm."""
    return float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0


def false_positive_volume_ml(
    pred: np.ndarray, gt: np.ndarray | None = None, *, spacing: Spacing = (1.0, 1.0, 1.0)
) -> float:
    """Volume of predicted voxels outside the ground truth, in ml.

    For healthy subjects (``gt`` None or empty) this is the whole predicted volume.

    Args:
        pred: [D, H, W] bool prediction.
        gt: [D, H, W] bool ground truth or None.
        spacing: voxel size in mm along (D, H, W).

    Returns:
        False-positive volume in ml.
    """
    pred = _as_bool(pred)
    n_fp = np.count_nonzero(pred if gt is None else pred & ~_as_bool(gt))
    return n_fp * voxel_volume_ml(spacing)


# ----------------------------------------------------------------------------------------
# Ranking metrics (AP, AUROC) with scikit-learn's tie handling, by sorting.


def _flat_scores_labels(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.ravel(np.asarray(scores))
    labels = np.ravel(_as_bool(labels))
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    if scores.dtype.kind not in "fiub":
        raise TypeError(f"scores must be numeric, got {scores.dtype}")
    return scores, labels


def _clf_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True/false positive counts of ``score >= t`` for every distinct score ``t``.

    Same points as ``sklearn.metrics._ranking._binary_clf_curve`` but with ``np.sort``
    (much faster than a stable argsort) and ``searchsorted`` for the positives.

    Args:
        scores: [N] numeric.
        labels: [N] bool.

    Returns:
        (tps, fps): [M] int64 each, ordered by decreasing threshold.
    """
    s = np.sort(scores)
    if s.dtype.kind == "f" and s.size and np.isnan(s[-1]):  # NaNs sort last.
        raise ValueError("scores contain NaN")
    pos = np.sort(scores[labels])
    starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
    values = s[starts]
    count_ge = s.size - starts
    tps = pos.size - np.searchsorted(pos, values, side="left")
    fps = count_ge - tps
    return tps[::-1].astype(np.int64), fps[::-1].astype(np.int64)


def _ap_from_curve(tps: np.ndarray, fps: np.ndarray) -> float:
    n_pos = tps[-1] if tps.size else 0
    if n_pos == 0:
        return float("nan")
    precisions = tps / (tps + fps)
    recall_steps = np.diff(tps, prepend=0) / n_pos
    return float(np.sum(recall_steps * precisions))


def _auroc_from_curve(tps: np.ndarray, fps: np.ndarray) -> float:
    n_pos = tps[-1] if tps.size else 0
    n_neg = fps[-1] if fps.size else 0
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    tps_f = np.concatenate(([0.0], tps.astype(np.float64)))
    fps_f = np.concatenate(([0.0], fps.astype(np.float64)))
    area = np.sum(np.diff(fps_f) * (tps_f[1:] + tps_f[:-1])) / 2.0
    return float(area / (float(n_pos) * float(n_neg)))


def ap_and_auroc(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Average precision and ROC AUC from one sort (see the two functions below)."""
    tps, fps = _clf_curve(*_flat_scores_labels(scores, labels))
    return _ap_from_curve(tps, fps), _auroc_from_curve(tps, fps)


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Step-wise average precision, = ``sklearn.metrics.average_precision_score``.

    AP = sum_k (R_k - R_{k-1}) P_k over decreasing distinct thresholds (ties grouped).

    Args:
        scores: [...] float anomaly scores (flattened).
        labels: [...] bool, same number of elements.

    Returns:
        AP in [0, 1]; ``nan`` without positive labels.
    """
    tps, fps = _clf_curve(*_flat_scores_labels(scores, labels))
    return _ap_from_curve(tps, fps)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve, = ``sklearn.metrics.roc_auc_score`` (ties count 1/2).

    Args:
        scores: [...] float anomaly scores (flattened).
        labels: [...] bool, same number of elements.

    Returns:
        AUROC in [0, 1]; ``nan`` when only one class is present.
    """
    tps, fps = _clf_curve(*_flat_scores_labels(scores, labels))
    return _auroc_from_curve(tps, fps)


# ----------------------------------------------------------------------------------------
# Surface distance.


def _crop_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Bounding box of a non-empty mask, grown by ``margin`` and clipped to the array."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(np.any(mask, axis=other))
        box.append(slice(max(idx[0] - margin, 0), min(idx[-1] + margin + 1, mask.shape[axis])))
    return tuple(box)


def _surface(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """Mask voxels removed by one erosion (voxels on the array border count as surface)."""
    return mask & ~ndi.binary_erosion(mask, structure=structure)


def surface_distances(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Spacing = (1.0, 1.0, 1.0),
    *,
    connectivity: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Distances from each surface voxel of one mask to the nearest surface voxel of the other.

    Surfaces are ``mask ^ binary_erosion(mask, connectivity)`` as in medpy. Work is done on
    the bounding box of ``pred | gt`` (plus one voxel), which gives the same result.

    Args:
        pred: [D, H, W] bool, non-empty.
        gt: [D, H, W] bool, non-empty.
        spacing: voxel size along each axis (distances are in these units).
        connectivity: erosion structure connectivity used to find surfaces.

    Returns:
        (pred_to_gt [Np] float64, gt_to_pred [Ng] float64).
    """
    pred, gt = _as_bool(pred), _as_bool(gt)
    if not pred.any() or not gt.any():
        raise ValueError("surface_distances needs two non-empty masks")
    box = _crop_box(pred | gt, margin=1)
    pred, gt = pred[box], gt[box]
    structure = ndi.generate_binary_structure(pred.ndim, connectivity)
    pred_surface, gt_surface = _surface(pred, structure), _surface(gt, structure)
    sampling = np.asarray(spacing, dtype=np.float64)
    to_gt = ndi.distance_transform_edt(~gt_surface, sampling=sampling)
    to_pred = ndi.distance_transform_edt(~pred_surface, sampling=sampling)
    return to_gt[pred_surface], to_pred[gt_surface]


def assd(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Spacing = (1.0, 1.0, 1.0),
    *,
    connectivity: int = 1,
) -> float:
    """Average symmetric surface distance, medpy-style.

    ASSD = (mean(d(pred surface -> gt surface)) + mean(d(gt surface -> pred surface))) / 2.

    Args:
        pred: [D, H, W] bool.
        gt: [D, H, W] bool.
        spacing: voxel size (e.g. mm) along (D, H, W).
        connectivity: erosion connectivity for the surfaces (medpy default 1).

    Returns:
        ASSD in spacing units; ``inf`` if exactly one mask is empty, ``nan`` if both are.
    """
    pred, gt = _as_bool(pred), _as_bool(gt)
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred and not has_gt:
        return float("nan")
    if not has_pred or not has_gt:
        return float("inf")
    to_gt, to_pred = surface_distances(pred, gt, spacing, connectivity=connectivity)
    return float((to_gt.mean() + to_pred.mean()) / 2.0)


# ----------------------------------------------------------------------------------------
# Thresholds.


def _pooled_dice_at(
    scores_list: Sequence[np.ndarray], labels_list: Sequence[np.ndarray], threshold: float
) -> float:
    tp = n_pred = n_gt = 0
    for scores, labels in zip(scores_list, labels_list, strict=True):
        counts = binary_counts(np.asarray(scores) > threshold, labels)
        tp, n_pred, n_gt = tp + counts[0], n_pred + counts[1], n_gt + counts[2]
    return _dice_from_counts(tp, n_pred, n_gt)


def greedy_threshold_search(
    scores_list: Sequence[np.ndarray], labels_list: Sequence[np.ndarray], steps: int = 10
) -> ThresholdResult:
    """Zimmerer/Behrendt recursive threshold search on the pooled voxels (``find_best_val``).

    Starts from [0, max score] (or [0, 1] if the max is 0). Each step evaluates the pooled
    Dice at the 1/4 and 3/4 points of the interval and keeps the lower half if
    Dice(1/4) >= Dice(3/4), else the upper half. The result is the best point seen
    (later points win ties). Non-negative scores are assumed.

    Args:
        scores_list: volumes of scores, e.g. [D, H, W] float each.
        labels_list: matching bool ground-truth volumes.
        steps: number of halvings (Behrendt: 10).

    Returns:
        ThresholdResult(threshold, dice); (0.0, 0.0) if no step finds a Dice above 0.
    """
    lo, hi = 0.0, max(float(np.max(s)) for s in scores_list)
    best_dice, best_threshold = 0.0, 0.0
    for _ in range(steps):
        if lo == hi:
            hi = 1.0
        width = hi - lo
        q_low, center, q_high = lo + 0.25 * width, lo + 0.5 * width, lo + 0.75 * width
        dice_low = _pooled_dice_at(scores_list, labels_list, q_low)
        dice_high = _pooled_dice_at(scores_list, labels_list, q_high)
        # Comparisons written as in the reference so that NaN Dice behaves the same.
        if dice_low >= dice_high:
            if dice_low >= best_dice:
                best_dice, best_threshold = dice_low, q_low
            hi = center
        else:
            if dice_high >= best_dice:
                best_dice, best_threshold = dice_high, q_high
            lo = center
    return ThresholdResult(float(best_threshold), float(best_dice))


def _just_below(value: np.generic) -> float:
    """The largest number below ``value`` in its own dtype (a threshold selecting it).

    Thresholds are returned as Python floats, which NumPy compares in the array's precision
    (``float32_array > python_float``), so "just below" must be taken in that precision.
    """
    if np.asarray(value).dtype.kind == "f":
        return float(np.nextafter(value, np.asarray(-np.inf, dtype=np.asarray(value).dtype)))
    return float(value) - 1.0


def _pool(arrays: Iterable[np.ndarray], masks: Iterable[np.ndarray] | None = None) -> np.ndarray:
    if masks is None:
        return np.concatenate([np.ravel(np.asarray(a)) for a in arrays])
    return np.concatenate([np.asarray(a)[_as_bool(m)] for a, m in zip(arrays, masks, strict=True)])


def best_dice_threshold(
    scores_list: Sequence[np.ndarray],
    labels_list: Sequence[np.ndarray],
    num_thresholds: int | None = None,
) -> ThresholdResult:
    """Threshold that maximises the pooled Dice of ``score > threshold`` (an oracle on its data).

    Sort-based, O(N log N) for N pooled voxels, no loop over thresholds.

    Args:
        scores_list: volumes of scores (any shapes), numeric.
        labels_list: matching bool ground-truth volumes; must hold at least one positive.
        num_thresholds: None for the exact optimum over all distinct score values; an int
            for a grid ``linspace(min, max, num_thresholds)`` of candidate thresholds.

    Returns:
        ThresholdResult(threshold, dice). Exact mode: ``threshold`` is the largest score
        value left out (the next-lower distinct value, or just below the minimum when
        everything is selected), so ``score > threshold`` reproduces the optimum exactly.
        Ties go to the lowest threshold.
    """
    scores, labels = _flat_scores_labels(_pool(scores_list), _pool(labels_list))
    s = np.sort(scores)
    pos = np.sort(scores[labels])
    n_pos = pos.size
    if n_pos == 0:
        raise ValueError("best_dice_threshold needs at least one positive voxel")
    if num_thresholds is None:
        starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
        values = s[starts]
        n_pred = s.size - starts
        tp = n_pos - np.searchsorted(pos, values, side="left")
        dices = 2.0 * tp / (n_pred + n_pos)
        k = int(np.argmax(dices))
        threshold = values[k - 1] if k > 0 else _just_below(values[0])
        return ThresholdResult(float(threshold), float(dices[k]))
    thresholds = np.linspace(float(s[0]), float(s[-1]), int(num_thresholds))
    if s.dtype.kind == "f":  # compare in the scores' precision, as ``score > float`` does
        thresholds = thresholds.astype(s.dtype)
    n_pred = s.size - np.searchsorted(s, thresholds, side="right")
    tp = n_pos - np.searchsorted(pos, thresholds, side="right")
    dices = 2.0 * tp / (n_pred + n_pos)
    k = int(np.argmax(dices))
    return ThresholdResult(float(thresholds[k]), float(dices[k]))


def threshold_at_fpr(
    healthy_scores_list: Sequence[np.ndarray],
    masks_list: Sequence[np.ndarray] | None,
    fpr: float | Sequence[float],
) -> float | np.ndarray:
    """Label-free threshold: the fraction of healthy in-mask scores above it is ``fpr``.

    Returns the smallest pooled score value ``t`` with ``mean(scores > t) <= fpr``; with
    no ties exactly ``floor(fpr * N)`` of the N voxels lie above it (``fpr = 1`` gives a
    value just below the minimum). This is a "higher"-type quantile, never interpolated.

    Args:
        healthy_scores_list: score volumes of healthy subjects.
        masks_list: matching brain masks (voxels counted), or None for all voxels.
        fpr: target false-positive rate(s) in [0, 1].

    Returns:
        A float threshold, or a [len(fpr)] float64 array for a sequence of rates.
    """
    values = _pool(healthy_scores_list, masks_list)
    n = values.size
    if n == 0:
        raise ValueError("threshold_at_fpr got no voxels")
    rates = np.atleast_1d(np.asarray(fpr, dtype=np.float64))
    if np.any((rates < 0) | (rates > 1)):
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    n_above = np.floor(rates * n + 1e-6).astype(np.int64)
    everything = n_above >= n
    kth = np.clip(n - n_above - 1, 0, n - 1)
    part = np.partition(values, np.unique(kth))
    out = part[kth].astype(np.float64)
    if np.any(everything):
        out[everything] = _just_below(part[0] if kth.min() == 0 else values.min())
    return float(out[0]) if np.ndim(fpr) == 0 else out


# ----------------------------------------------------------------------------------------
# Aggregation.

VOLUME_METRIC_KEYS = (
    "dice",
    "precision",
    "recall",
    "jaccard",
    "ap",
    "auroc",
    "assd",
    "fp_volume_ml",
    "pred_volume_ml",
    "gt_volume_ml",
)


def volume_metrics(
    score: np.ndarray | None,
    pred: np.ndarray,
    gt: np.ndarray,
    *,
    spacing: Spacing = (1.0, 1.0, 1.0),
) -> dict[str, float]:
    """All per-volume metrics.

    AP and AUROC use every voxel of the volume (background included, as Behrendt).

    Args:
        score: [D, H, W] float continuous map (post-processed), or None (AP/AUROC = nan).
        pred: [D, H, W] bool binarised map.
        gt: [D, H, W] bool ground truth (all False for healthy subjects).
        spacing: voxel size in mm along (D, H, W), for ASSD and volumes.

    Returns:
        dict with the keys of ``VOLUME_METRIC_KEYS``: dice, precision, recall, jaccard,
        ap, auroc (nan if single-class), assd (mm; inf/nan if one/both empty),
        fp_volume_ml, pred_volume_ml, gt_volume_ml.
    """
    pred, gt = _as_bool(pred), _as_bool(gt)
    tp, n_pred, n_gt = binary_counts(pred, gt)
    if score is None:
        ap, auroc = float("nan"), float("nan")
    else:
        if np.shape(score) != gt.shape:
            raise ValueError(f"score shape {np.shape(score)} != gt shape {gt.shape}")
        ap, auroc = ap_and_auroc(score, gt)
    voxel_ml = voxel_volume_ml(spacing)
    return {
        "dice": _dice_from_counts(tp, n_pred, n_gt),
        "precision": _ratio(tp, n_pred),
        "recall": _ratio(tp, n_gt),
        "jaccard": _ratio(tp, n_pred + n_gt - tp),
        "ap": ap,
        "auroc": auroc,
        "assd": assd(pred, gt, spacing),
        "fp_volume_ml": (n_pred - tp) * voxel_ml,
        "pred_volume_ml": n_pred * voxel_ml,
        "gt_volume_ml": n_gt * voxel_ml,
    }


def summarize(results: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Mean and std (ddof=0) of each numeric metric over volumes, finite values only.

    Non-numeric entries (e.g. a ``subject_id`` string) are skipped; a key missing from a
    dict counts as ``nan``.

    Args:
        results: per-volume dicts, e.g. from ``volume_metrics``.

    Returns:
        ``{metric: {"mean", "std", "n", "n_nan", "n_inf"}}`` where ``n`` is the number of
        finite values averaged (mean/std are nan when n == 0).
    """
    keys: dict[str, None] = {}
    for row in results:
        for key, value in row.items():
            if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
                keys[key] = None
    summary = {}
    for key in keys:
        values = np.array([float(row.get(key, np.nan)) for row in results], dtype=np.float64)
        finite = values[np.isfinite(values)]
        summary[key] = {
            "mean": float(finite.mean()) if finite.size else float("nan"),
            "std": float(finite.std()) if finite.size else float("nan"),
            "n": int(finite.size),
            "n_nan": int(np.count_nonzero(np.isnan(values))),
            "n_inf": int(np.count_nonzero(np.isinf(values))),
        }
    return summary


def metrics_from_counts(tp: int, n_pred: int, n_gt: int) -> dict[str, float]:
    """dice, precision, recall, jaccard from pooled voxel counts (nan where undefined)."""
    return {"dice": _dice_from_counts(tp, n_pred, n_gt), "precision": _ratio(tp, n_pred),
            "recall": _ratio(tp, n_gt), "jaccard": _ratio(tp, n_pred + n_gt - tp)}


def pooled_metrics(
    scores_list: Sequence[np.ndarray] | None,
    preds_list: Sequence[np.ndarray] | None,
    gts_list: Sequence[np.ndarray],
) -> dict[str, float]:
    """Metrics over all voxels of all volumes pooled together.

    Args:
        scores_list: continuous score volumes, or None (ap/auroc = nan).
        preds_list: binarised volumes, or None (dice/precision/recall/jaccard = nan).
        gts_list: bool ground-truth volumes.

    Returns:
        dict with keys dice, precision, recall, jaccard, ap, auroc.
    """
    out = dict.fromkeys(("dice", "precision", "recall", "jaccard", "ap", "auroc"), float("nan"))
    if preds_list is not None:
        tp = n_pred = n_gt = 0
        for pred, gt in zip(preds_list, gts_list, strict=True):
            counts = binary_counts(pred, gt)
            tp, n_pred, n_gt = tp + counts[0], n_pred + counts[1], n_gt + counts[2]
        out.update(metrics_from_counts(tp, n_pred, n_gt))
    if scores_list is not None:
        if len(scores_list) != len(gts_list):
            raise ValueError(f"{len(scores_list)} score volumes but {len(gts_list)} gts")
        out["ap"], out["auroc"] = ap_and_auroc(_pool(scores_list), _pool(gts_list))
    return out


def reconstruction_quality(image: np.ndarray, reconstruction: np.ndarray,
                           brain_mask: np.ndarray) -> dict[str, float]:
    """SSIM, PSNR (dB) and mean L1 of a reconstruction inside the brain (cDDPM's Table 2).

    Args:
      image: [D, H, W, C] the input (the channels the reconstruction reproduces).
      reconstruction: [D, H, W, C].
      brain_mask: [D, H, W] bool; both volumes are zeroed outside it.
    Returns:
      {'ssim', 'psnr', 'l1'}: scikit-image's 3D SSIM (7-voxel windows, channels averaged)
      and PSNR with the input's in-brain intensity range as data range; L1 over brain voxels.
    """
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    mask = np.asarray(brain_mask, bool)[..., None]
    x = np.where(mask, image, 0.0).astype(np.float64)
    r = np.where(mask, reconstruction, 0.0).astype(np.float64)
    inside = x[np.broadcast_to(mask, x.shape)]
    data_range = float(inside.max() - min(inside.min(), 0.0)) if inside.size else 1.0
    data_range = data_range or 1.0
    win = min(7, *(s if s % 2 else s - 1 for s in x.shape[:3]))
    ssim = structural_similarity(x, r, data_range=data_range, channel_axis=-1, win_size=win)
    identical = np.array_equal(x, r)  # PSNR is infinite; skimage would warn and divide by 0
    psnr = np.inf if identical else peak_signal_noise_ratio(x, r, data_range=data_range)
    l1 = float(np.abs(x - r)[np.broadcast_to(mask, x.shape)].mean()) if inside.size else 0.0
    return {"ssim": float(ssim), "psnr": float(psnr), "l1": l1}
