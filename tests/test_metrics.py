"""Tests for uadjax.metrics against scikit-learn, SciPy and plain brute force."""

import math

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.spatial.distance import cdist
from sklearn import metrics as skm

from uadjax import metrics


def _random_case(rng, n, *, ties, p_pos=0.3, dtype=np.float32):
    labels = rng.random(n) < p_pos
    if ties:
        scores = rng.integers(0, 6, size=n).astype(dtype) / 5
    else:
        scores = rng.random(n).astype(dtype)
    scores = scores + 0.3 * labels * rng.random(n).astype(dtype)
    return scores.astype(dtype), labels


# ----------------------------------------------------------------------------------------
# Binary overlap metrics.


@pytest.mark.parametrize("seed", range(5))
def test_binary_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    pred = rng.random((4, 5, 6)) < 0.4
    gt = rng.random((4, 5, 6)) < 0.3
    y_true, y_pred = gt.ravel(), pred.ravel()
    assert metrics.dice(pred, gt) == pytest.approx(skm.f1_score(y_true, y_pred), abs=1e-12)
    assert metrics.precision(pred, gt) == pytest.approx(skm.precision_score(y_true, y_pred))
    assert metrics.recall(pred, gt) == pytest.approx(skm.recall_score(y_true, y_pred))
    assert metrics.jaccard(pred, gt) == pytest.approx(skm.jaccard_score(y_true, y_pred))


def test_binary_metrics_edge_cases():
    empty = np.zeros((2, 3, 3), bool)
    full = np.ones((2, 3, 3), bool)
    assert math.isnan(metrics.dice(empty, empty))
    assert math.isnan(metrics.jaccard(empty, empty))
    assert metrics.dice(full, empty) == 0.0
    assert metrics.dice(full, full) == 1.0
    assert math.isnan(metrics.precision(empty, full))
    assert metrics.recall(empty, full) == 0.0
    assert math.isnan(metrics.recall(full, empty))
    with pytest.raises(ValueError):
        metrics.dice(empty, np.zeros((3, 3, 2), bool))


def test_false_positive_volume():
    pred = np.zeros((3, 4, 4), bool)
    pred[0, :2, :2] = True  # 4 voxels
    gt = np.zeros_like(pred)
    gt[0, 0, 0] = True
    spacing = (2.0, 1.0, 1.5)  # 3 mm^3 per voxel
    assert metrics.false_positive_volume_ml(pred, spacing=spacing) == pytest.approx(0.012)
    assert metrics.false_positive_volume_ml(pred, gt, spacing=spacing) == pytest.approx(0.009)


# ----------------------------------------------------------------------------------------
# AP and AUROC.


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_ap_and_auroc_match_sklearn(seed, ties):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 3000))
    scores, labels = _random_case(rng, n, ties=ties, p_pos=rng.uniform(0.01, 0.6))
    labels[0] = True
    labels[1] = False
    ap_ref = skm.average_precision_score(labels, scores)
    auc_ref = skm.roc_auc_score(labels, scores)
    assert metrics.average_precision(scores, labels) == pytest.approx(ap_ref, abs=1e-6)
    assert metrics.roc_auc(scores, labels) == pytest.approx(auc_ref, abs=1e-6)
    ap, auc = metrics.ap_and_auroc(scores.reshape(-1, 1), labels.reshape(-1, 1))
    assert (ap, auc) == pytest.approx((ap_ref, auc_ref), abs=1e-6)


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.uint8])
def test_ap_and_auroc_other_dtypes(dtype):
    rng = np.random.default_rng(7)
    labels = rng.random(500) < 0.2
    scores = (rng.integers(0, 10, size=500) + 3 * labels).astype(dtype)
    assert metrics.average_precision(scores, labels) == pytest.approx(
        skm.average_precision_score(labels, scores), abs=1e-6
    )
    assert metrics.roc_auc(scores, labels) == pytest.approx(
        skm.roc_auc_score(labels, scores), abs=1e-6
    )


def test_ap_and_auroc_edge_cases():
    labels = np.array([0, 1, 0, 1, 1], bool)
    const = np.full(5, 0.5, np.float32)
    assert metrics.average_precision(const, labels) == pytest.approx(
        skm.average_precision_score(labels, const)
    )
    assert metrics.roc_auc(const, labels) == pytest.approx(0.5)
    single = np.array([0, 0, 1, 0], bool)
    scores = np.array([0.1, 0.9, 0.5, 0.2], np.float32)
    assert metrics.average_precision(scores, single) == pytest.approx(
        skm.average_precision_score(single, scores)
    )
    perfect = np.array([0.0, 0.0, 1.0, 0.0], np.float32)
    assert metrics.average_precision(perfect, single) == 1.0
    assert metrics.roc_auc(perfect, single) == 1.0
    assert math.isnan(metrics.average_precision(scores, np.zeros(4, bool)))
    assert math.isnan(metrics.roc_auc(scores, np.zeros(4, bool)))
    assert math.isnan(metrics.roc_auc(scores, np.ones(4, bool)))
    assert metrics.average_precision(scores, np.ones(4, bool)) == 1.0
    with pytest.raises(ValueError):
        metrics.average_precision(np.array([0.1, np.nan], np.float32), np.array([1, 0], bool))
    with pytest.raises(ValueError):
        metrics.roc_auc(scores, single[:3])


# ----------------------------------------------------------------------------------------
# ASSD.


def _brute_force_assd(pred, gt, spacing):
    structure = ndi.generate_binary_structure(3, 1)
    coords = []
    for mask in (pred, gt):
        surface = mask & ~ndi.binary_erosion(mask, structure=structure)
        coords.append(np.argwhere(surface) * np.asarray(spacing))
    distances = cdist(coords[0], coords[1])
    return (distances.min(axis=1).mean() + distances.min(axis=0).mean()) / 2


@pytest.mark.parametrize("seed", range(6))
def test_assd_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = (9, 11, 10)
    pred = ndi.binary_dilation(rng.random(shape) < 0.03, iterations=int(rng.integers(0, 2)))
    gt = np.zeros(shape, bool)
    gt[2:6, 3:9, 1:5] = True  # a box away from the border, so cropping is exercised
    gt &= rng.random(shape) < 0.9
    pred[0, 0, 0] = True  # a voxel on the array corner
    spacing = (2.5, 1.0, 0.7)
    expected = _brute_force_assd(pred, gt, spacing)
    assert metrics.assd(pred, gt, spacing) == pytest.approx(expected, rel=1e-9)
    assert metrics.assd(gt, pred, spacing) == pytest.approx(expected, rel=1e-9)


def test_assd_identical_and_empty():
    mask = np.zeros((5, 6, 7), bool)
    mask[1:4, 2:5, 2:6] = True
    assert metrics.assd(mask, mask) == 0.0
    shifted = np.roll(mask, 1, axis=2)
    assert metrics.assd(mask, shifted, (1.0, 1.0, 3.0)) > 0
    empty = np.zeros_like(mask)
    assert metrics.assd(mask, empty) == math.inf
    assert metrics.assd(empty, mask) == math.inf
    assert math.isnan(metrics.assd(empty, empty))


# ----------------------------------------------------------------------------------------
# Thresholds.


def _reference_find_best_val(x, y, val_range, max_steps, step=0, max_val=0, max_point=0):
    """Zimmerer/Behrendt ``find_best_val`` written plainly (recursive, nan-Dice included)."""
    if step == max_steps:
        return max_val, max_point
    if val_range[0] == val_range[1]:
        val_range = (val_range[0], 1)
    bottom, top = val_range
    center = bottom + (top - bottom) * 0.5
    q_bottom = bottom + (top - bottom) * 0.25
    q_top = bottom + (top - bottom) * 0.75

    def dice(p, g):
        return 2 * np.sum(p & g) / (np.sum(p) + np.sum(g)) if np.sum(p) + np.sum(g) else np.nan

    val_bottom = dice(x > q_bottom, y)
    val_top = dice(x > q_top, y)
    if val_bottom >= val_top:
        if val_bottom >= max_val:
            max_val, max_point = val_bottom, q_bottom
        return _reference_find_best_val(
            x, y, (bottom, center), max_steps, step + 1, max_val, max_point
        )
    if val_top >= max_val:
        max_val, max_point = val_top, q_top
    return _reference_find_best_val(x, y, (center, top), max_steps, step + 1, max_val, max_point)


def test_greedy_threshold_search_hand_computed():
    scores = [np.array([0.0, 0.2, 0.4]), np.array([0.6, 0.8, 1.0])]
    labels = [np.array([False, False, False]), np.array([True, True, True])]
    # Step 1 on [0, 1]: Dice(>0.25) = 6/7 >= Dice(>0.75) = 4/5 -> keep [0, 0.5].
    # Step 2: Dice(>0.125) = 6/8 < Dice(>0.375) = 6/7 -> keep [0.25, 0.5]; later ties win.
    # Step 3: Dice(>0.3125) = 6/7 < Dice(>0.4375) = 1 -> best (0.4375, 1.0).
    assert metrics.greedy_threshold_search(scores, labels, steps=1) == (0.25, pytest.approx(6 / 7))
    assert metrics.greedy_threshold_search(scores, labels, steps=2) == (0.375, pytest.approx(6 / 7))
    assert metrics.greedy_threshold_search(scores, labels, steps=3) == (0.4375, 1.0)


@pytest.mark.parametrize("seed", range(4))
def test_greedy_threshold_search_matches_reference(seed):
    rng = np.random.default_rng(seed)
    scores_list, labels_list = [], []
    for _ in range(3):
        scores, labels = _random_case(rng, 400, ties=bool(seed % 2), p_pos=0.1)
        scores_list.append(np.abs(scores).reshape(4, 10, 10))
        labels_list.append(labels.reshape(4, 10, 10))
    x, y = (
        np.concatenate([s.ravel() for s in scores_list]),
        np.concatenate([lab.ravel() for lab in labels_list]),
    )
    ref_dice, ref_threshold = _reference_find_best_val(x, y, (0, float(x.max())), 10)
    result = metrics.greedy_threshold_search(scores_list, labels_list, steps=10)
    assert result.threshold == pytest.approx(ref_threshold, abs=1e-12)
    assert result.dice == pytest.approx(ref_dice, abs=1e-12)


def test_greedy_threshold_search_zero_scores():
    scores = [np.zeros((2, 3, 3), np.float32)]
    labels = [np.ones((2, 3, 3), bool)]
    ref = _reference_find_best_val(scores[0].ravel(), labels[0].ravel(), (0, 0.0), 10)
    result = metrics.greedy_threshold_search(scores, labels)
    assert (result.dice, result.threshold) == (ref[0], ref[1])


def _pooled_dice(x, y, threshold):
    pred = x > threshold
    return 2 * np.sum(pred & y) / (np.sum(pred) + np.sum(y))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_best_dice_threshold_exact_matches_brute_force(seed, ties):
    rng = np.random.default_rng(seed)
    scores_list, labels_list = [], []
    for n in (150, 90):
        scores, labels = _random_case(rng, n, ties=ties, p_pos=0.2)
        scores_list.append(scores)
        labels_list.append(labels)
    x, y = np.concatenate(scores_list), np.concatenate(labels_list)
    candidates = np.concatenate(([x.min() - 1.0], np.unique(x)))
    brute = max(_pooled_dice(x, y, t) for t in candidates)
    result = metrics.best_dice_threshold(scores_list, labels_list)
    assert result.dice == pytest.approx(brute, abs=1e-12)
    assert _pooled_dice(x, y, result.threshold) == pytest.approx(brute, abs=1e-12)


def test_best_dice_threshold_selects_everything():
    scores = [np.array([0.5, 0.5, 0.7], np.float32)]
    labels = [np.array([True, True, True])]
    result = metrics.best_dice_threshold(scores, labels)
    assert result.dice == 1.0
    assert np.all(scores[0] > result.threshold)
    with pytest.raises(ValueError):
        metrics.best_dice_threshold(scores, [np.zeros(3, bool)])


@pytest.mark.parametrize("seed", range(3))
def test_best_dice_threshold_grid_matches_loop(seed):
    rng = np.random.default_rng(seed)
    x, y = _random_case(rng, 500, ties=bool(seed % 2), p_pos=0.15)
    grid = np.linspace(float(x.min()), float(x.max()), 37)
    dices = [_pooled_dice(x, y, t) for t in grid]
    result = metrics.best_dice_threshold([x[:200], x[200:]], [y[:200], y[200:]], num_thresholds=37)
    assert result.dice == pytest.approx(max(dices), abs=1e-12)
    assert result.threshold == pytest.approx(grid[int(np.argmax(dices))])


@pytest.mark.parametrize("fpr", [0.0, 0.01, 0.05, 0.1, 0.29, 0.5, 1.0])
def test_threshold_at_fpr_fraction(fpr):
    rng = np.random.default_rng(3)
    scores = [rng.random((4, 10, 10)).astype(np.float32) for _ in range(3)]
    masks = [rng.random((4, 10, 10)) < 0.6 for _ in range(3)]
    scores[0][~masks[0]] = 100.0  # out-of-mask voxels must not count
    threshold = metrics.threshold_at_fpr(scores, masks, fpr)
    inside = np.concatenate([s[m] for s, m in zip(scores, masks)])
    assert np.mean(inside > threshold) == pytest.approx(np.floor(fpr * inside.size) / inside.size)


def test_threshold_at_fpr_ties_and_sequence():
    values = np.array([0.0] * 50 + [1.0] * 30 + [2.0] * 20, np.float32)
    rng = np.random.default_rng(0)
    scores = [rng.permutation(values).reshape(1, 10, 10)]
    thresholds = metrics.threshold_at_fpr(scores, None, [0.05, 0.2, 0.25, 0.5, 0.9])
    np.testing.assert_array_equal(thresholds, [2.0, 1.0, 1.0, 0.0, 0.0])
    for fpr, threshold in zip([0.05, 0.2, 0.25, 0.5, 0.9], thresholds):
        assert np.mean(values > threshold) <= fpr
        lower = values[values < threshold]
        if lower.size:  # the next-lower data value would exceed the rate
            assert np.mean(values > lower.max()) > fpr
    with pytest.raises(ValueError):
        metrics.threshold_at_fpr(scores, None, 1.5)


# ----------------------------------------------------------------------------------------
# Aggregation.


def _volume_case(rng, shape=(6, 12, 12), lesion=True):
    gt = np.zeros(shape, bool)
    if lesion:
        gt[2:5, 3:8, 4:9] = True
    score = rng.random(shape).astype(np.float32) * 0.6 + 0.5 * gt
    return score, score > 0.7, gt


def test_volume_metrics_keys_and_values():
    rng = np.random.default_rng(0)
    score, pred, gt = _volume_case(rng)
    spacing = (2.0, 1.0, 1.0)
    out = metrics.volume_metrics(score, pred, gt, spacing=spacing)
    assert tuple(out) == metrics.VOLUME_METRIC_KEYS
    assert out["dice"] == pytest.approx(skm.f1_score(gt.ravel(), pred.ravel()))
    assert out["precision"] == pytest.approx(skm.precision_score(gt.ravel(), pred.ravel()))
    assert out["recall"] == pytest.approx(skm.recall_score(gt.ravel(), pred.ravel()))
    assert out["jaccard"] == pytest.approx(skm.jaccard_score(gt.ravel(), pred.ravel()))
    assert out["ap"] == pytest.approx(skm.average_precision_score(gt.ravel(), score.ravel()))
    assert out["auroc"] == pytest.approx(skm.roc_auc_score(gt.ravel(), score.ravel()))
    assert out["assd"] == pytest.approx(_brute_force_assd(pred, gt, spacing))
    assert out["gt_volume_ml"] == pytest.approx(gt.sum() * 0.002)
    assert out["pred_volume_ml"] == pytest.approx(pred.sum() * 0.002)
    assert out["fp_volume_ml"] == pytest.approx((pred & ~gt).sum() * 0.002)


def test_volume_metrics_healthy_and_no_score():
    rng = np.random.default_rng(1)
    score, _, gt = _volume_case(rng, lesion=False)
    pred = score > 0.5
    out = metrics.volume_metrics(score, pred, gt)
    assert pred.any() and out["dice"] == 0.0 and out["precision"] == 0.0
    assert math.isnan(out["recall"]) and math.isnan(out["ap"]) and math.isnan(out["auroc"])
    assert out["assd"] == math.inf
    assert out["fp_volume_ml"] == pytest.approx(pred.sum() / 1000)
    out = metrics.volume_metrics(None, np.zeros_like(gt), gt)
    assert math.isnan(out["dice"]) and math.isnan(out["assd"]) and math.isnan(out["ap"])


def test_summarize_ignores_non_finite():
    rows = [
        {"subject_id": "a", "dice": 0.5, "assd": 2.0},
        {"subject_id": "b", "dice": float("nan"), "assd": float("inf")},
        {"subject_id": "c", "dice": 0.7, "assd": 4.0},
        {"subject_id": "d", "assd": np.float32(3.0)},
    ]
    summary = metrics.summarize(rows)
    assert set(summary) == {"dice", "assd"}
    assert summary["dice"] == {
        "mean": pytest.approx(0.6),
        "std": pytest.approx(0.1),
        "n": 2,
        "n_nan": 2,
        "n_inf": 0,
    }
    assert summary["assd"]["mean"] == pytest.approx(3.0)
    assert summary["assd"]["std"] == pytest.approx(np.std([2.0, 4.0, 3.0]))
    assert (summary["assd"]["n"], summary["assd"]["n_nan"], summary["assd"]["n_inf"]) == (3, 0, 1)
    empty = metrics.summarize([{"x": float("nan")}])
    assert math.isnan(empty["x"]["mean"]) and empty["x"]["n"] == 0


def test_pooled_metrics_match_sklearn():
    rng = np.random.default_rng(2)
    cases = [_volume_case(rng, lesion=i != 1) for i in range(3)]
    scores, preds, gts = (list(c) for c in zip(*cases))
    out = metrics.pooled_metrics(scores, preds, gts)
    y, p, s = (np.concatenate([a.ravel() for a in arrays]) for arrays in (gts, preds, scores))
    assert out["dice"] == pytest.approx(skm.f1_score(y, p))
    assert out["precision"] == pytest.approx(skm.precision_score(y, p))
    assert out["recall"] == pytest.approx(skm.recall_score(y, p))
    assert out["jaccard"] == pytest.approx(skm.jaccard_score(y, p))
    assert out["ap"] == pytest.approx(skm.average_precision_score(y, s), abs=1e-6)
    assert out["auroc"] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-6)
    only_scores = metrics.pooled_metrics(scores, None, gts)
    assert math.isnan(only_scores["dice"]) and only_scores["ap"] == pytest.approx(out["ap"])
