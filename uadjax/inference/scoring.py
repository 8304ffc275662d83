"""Runs a method's score function over every slice of every evaluation volume.

Each volume is scored on its own: its slices come from the ordered evaluation pipeline
(every slice once, padded tail marked by `valid`), each batch is one jitted call sharded over
this process's devices with a key of the volume's own, and the slices are reassembled into
[D, H, W]. Evaluation and prediction both use this, so neither knows which method produced a
score map, and a volume's scores are the same whichever host scores it, next to whichever
other volumes.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Iterable

import jax
import numpy as np

from uadjax import parallel


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


def volume_key(base_key, subject_id: str):
    """The key of one volume: fold_in(base_key, CRC-32 of its id). A volume's noise depends
    on nothing but the seed and its id: not on the other volumes of the split, the batch
    it would share with them, or which host scores it."""
    return jax.random.fold_in(base_key, zlib.crc32(subject_id.encode()) & 0x7FFFFFFF)


def make_batch_scorer(score_fn: Callable, models: dict, config, mesh, *, seed: int):
    """-> scorer(host_batch, batch_number, subject_id=None) -> dict of host arrays [B, ...].

    `mesh` holds this process's devices (`parallel.local_mesh()`): with several processes
    each one scores its own volumes. The key of batch i is fold_in(key(seed), i), or
    fold_in(volume_key(key(seed), subject_id), i) for the i-th batch of a volume, so
    scores are reproducible.
    """
    base_key = jax.random.key(seed)

    # The networks are closed over, so their weights are compiled in as constants: fine for
    # the CPU and paper sizes; very large models should pass their state as jit arguments.
    @jax.jit
    def scored(batch, key):
        return score_fn(models, batch, key, config)

    def scorer(host_batch: dict, index: int, subject_id: str | None = None) -> dict:
        batch = parallel.to_global(host_batch, mesh)
        key = base_key if subject_id is None else volume_key(base_key, subject_id)
        out = scored(batch, jax.random.fold_in(key, index))
        return jax.device_get(out)

    return scorer


class RecordRange:
    """Records start .. start + length - 1 of a random-access source (one volume's slices
    of an evaluation split, from the volumes index's `offset` and `num_records`)."""

    def __init__(self, source, start: int, length: int):
        if start < 0 or start + length > len(source):
            raise IndexError(f"records {start}..{start + length - 1} outside a split of "
                             f"{len(source)}")
        self.source, self.start, self.length = source, start, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        if not 0 <= i < self.length:
            raise IndexError(i)
        return self.source[self.start + i]


def score_volume(scorer, batches: Iterable[dict], *, subject_id: str, num_slices: int,
                 keep_reconstruction: bool = True) -> ScoredVolume:
    """Scores the ordered batches of one volume (batch i gets the volume's i-th key) and
    reassembles it.

    Args:
      scorer: from `make_batch_scorer`.
      batches: host batches of this volume's slices only, with keys image, brain_mask, seg,
        subject_id, slice_index, kind, valid (`pipeline.make_eval_batches`).
      num_slices: its number of slices D.
    Returns:
      The ScoredVolume. Raises if a slice is missing, delivered twice, or belongs to
      another subject.
    """
    slices: dict[int, tuple] = {}
    kind = None
    for i, batch in enumerate(batches):
        out = scorer(batch, i, subject_id)
        rec = out.get("reconstruction") if keep_reconstruction else None
        for row in np.flatnonzero(np.asarray(batch["valid"])):
            sid = _text(batch["subject_id"][row])
            if sid != subject_id:
                raise RuntimeError(f"subject {subject_id}: its records hold a slice of {sid}")
            kind = _text(batch["kind"][row])
            index = int(batch["slice_index"][row])
            if index in slices:
                raise RuntimeError(f"subject {sid}: slice {index} delivered twice")
            slices[index] = (out["score"][row], batch["image"][row], batch["brain_mask"][row],
                             batch["seg"][row], None if rec is None else rec[row])
    missing = sorted(set(range(num_slices)) - set(slices))
    if missing:
        raise RuntimeError(f"subject {subject_id}: slices {missing[:5]} missing from the "
                           "evaluation split")
    rows = [slices[k] for k in range(num_slices)]
    recs = [r[4] for r in rows]
    return ScoredVolume(
        subject_id=subject_id, kind=kind,
        score=np.stack([r[0] for r in rows]).astype(np.float32),
        image=np.stack([r[1] for r in rows]).astype(np.float32),
        brain_mask=np.stack([r[2] for r in rows]).astype(bool),
        seg=np.stack([r[3] for r in rows]) > 0,
        reconstruction=None if recs[0] is None else np.stack(recs).astype(np.float32))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
