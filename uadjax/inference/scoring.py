"""Runs a method's score function over every slice of every evaluation volume.

Batches come from the ordered evaluation pipeline (every slice once, padded tail marked by
`valid`), are scored by one jitted, sharded call each, and are reassembled into volumes
[D, H, W] keyed by subject. Evaluation and prediction both use this, so neither knows which
method produced a score map.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import jax
import numpy as np

from uadjax import parallel
from uadjax.progress import progress_bar


@dataclasses.dataclass
class ScoredVolume:
    """One subject's slices, reassembled.

    Attributes:
      score: [D, H, W] float32 raw anomaly score (before post-processing).
      image: [D, H, W, M] float32 the normalised input.
      brain_mask: [D, H, W] bool.
      seg: [D, H, W] bool ground truth (all False for healthy subjects).
      reconstruction: [D, H, W, C] float32 or None.
      kind: 'healthy' or the lesion kind.
    """

    subject_id: str
    kind: str
    score: np.ndarray
    image: np.ndarray
    brain_mask: np.ndarray
    seg: np.ndarray
    reconstruction: np.ndarray | None = None


def make_batch_scorer(score_fn: Callable, models: dict, config, mesh, *, seed: int):
    """-> scorer(host_batch, batch_number) -> dict of host arrays [B, ...].

    The key of batch i is fold_in(key(seed), i), so scores are reproducible.
    """
    if jax.process_count() > 1:
        raise RuntimeError(
            "scoring gathers every row on one host: run evaluate and predict as a single "
            "process (training is the multi-host part)")
    base_key = jax.random.key(seed)

    # The networks are closed over, so their weights are compiled in as constants: fine for
    # the CPU and paper sizes; very large models should pass their state as jit arguments.
    @jax.jit
    def scored(batch, key):
        return score_fn(models, batch, key, config)

    def scorer(host_batch: dict, index: int) -> dict:
        batch = parallel.to_global(host_batch, mesh)
        out = scored(batch, jax.random.fold_in(base_key, index))
        return jax.device_get(out)

    return scorer


def score_volumes(scorer, batches: Iterable[dict], *, num_slices: dict[str, int],
                  keep_reconstruction: bool = True, progress: bool = False,
                  desc: str = "score") -> dict[str, ScoredVolume]:
    """Scores ordered evaluation batches and reassembles whole volumes.

    Args:
      scorer: from `make_batch_scorer`.
      batches: host batches with keys image, brain_mask, seg, subject_id, slice_index, kind,
        valid.
      num_slices: subject id -> number of slices D of its preprocessed volume.
    Returns:
      subject id -> ScoredVolume. Raises if a volume misses a slice or gets one twice.
    """
    parts: dict[str, dict] = {}
    for i, batch in enumerate(progress_bar(batches, disable=not progress, desc=desc, leave=False)):
        out = scorer(batch, i)
        for row in np.flatnonzero(np.asarray(batch["valid"])):
            sid = _text(batch["subject_id"][row])
            entry = parts.setdefault(sid, {"kind": _text(batch["kind"][row]), "slices": {}})
            index = int(batch["slice_index"][row])
            if index in entry["slices"]:
                raise RuntimeError(f"subject {sid}: slice {index} delivered twice")
            rec = out.get("reconstruction")
            entry["slices"][index] = (
                out["score"][row], batch["image"][row], batch["brain_mask"][row],
                batch["seg"][row], None if rec is None or not keep_reconstruction else rec[row])
    volumes = {}
    for sid, entry in parts.items():
        depth = num_slices[sid]
        missing = sorted(set(range(depth)) - set(entry["slices"]))
        if missing:
            raise RuntimeError(f"subject {sid}: slices {missing[:5]} missing from the evaluation "
                               "split")
        rows = [entry["slices"][k] for k in range(depth)]
        recs = [r[4] for r in rows]
        volumes[sid] = ScoredVolume(
            subject_id=sid, kind=entry["kind"],
            score=np.stack([r[0] for r in rows]).astype(np.float32),
            image=np.stack([r[1] for r in rows]).astype(np.float32),
            brain_mask=np.stack([r[2] for r in rows]).astype(bool),
            seg=np.stack([r[3] for r in rows]) > 0,
            reconstruction=None if recs[0] is None else np.stack(recs).astype(np.float32))
    return volumes


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
