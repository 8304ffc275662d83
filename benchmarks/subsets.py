"""Subsets of the evaluation splits for diagnostics benchmarks (mmccd_protocol, ldm_checks):
a few subjects per lesion kind, some slices of each, and raw-map accuracy on them."""

from __future__ import annotations

import numpy as np

from uadjax import metrics
from uadjax.data import builder


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def slices_of(config, split: str, per_kind: int, slice_step: int) -> dict:
    """The first `per_kind` subjects of each kind of `split` (in the split's order), every
    `slice_step`-th slice that holds brain: {'image' [N, H, W, M], 'brain_mask', 'seg'
    [N, H, W] bool, 'kind' [N], 'subject_id' [N]}."""
    source = builder.load_split(config.data.data_dir, config.data, split)
    chosen: dict[str, list] = {}
    keep = []
    for i in range(len(source)):
        r = source[i]
        sid, kind = _text(r["subject_id"]), _text(r["kind"])
        subjects = chosen.setdefault(kind, [])
        if sid not in subjects:
            if len(subjects) >= per_kind:
                continue
            subjects.append(sid)
        if int(r["slice_index"]) % slice_step or not np.asarray(r["brain_mask"]).any():
            continue
        keep.append((kind, sid, r))
    return {"image": np.stack([np.asarray(r["image"], np.float32) for _, _, r in keep]),
            "brain_mask": np.stack([np.asarray(r["brain_mask"]) > 0 for _, _, r in keep]),
            "seg": np.stack([np.asarray(r["seg"]) > 0 for _, _, r in keep]),
            "kind": np.array([k for k, _, _ in keep]),
            "subject_id": np.array([s for _, s, _ in keep])}


def pixel_accuracy(maps: np.ndarray, data: dict) -> dict:
    """Per lesion kind: AUPRC and the best pooled Dice (oracle threshold) of raw maps
    [N, H, W] over the brain pixels of `data` (from `slices_of`); NaN for a kind without
    lesion pixels there."""
    out = {}
    for kind in sorted(set(data["kind"].tolist())):
        sel = data["kind"] == kind
        brain = data["brain_mask"][sel]
        scores, labels = maps[sel][brain], data["seg"][sel][brain]
        if not labels.any():  # no lesion pixel in the chosen slices of this kind
            out[kind] = {"auprc": float("nan"), "dice": float("nan")}
            continue
        out[kind] = {"auprc": metrics.average_precision(scores, labels),
                     "dice": float(metrics.best_dice_threshold([scores], [labels]).dice)}
    return out
