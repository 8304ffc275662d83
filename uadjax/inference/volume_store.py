"""Scored volumes on disk: what an evaluation has scored so far, one file per volume.

Every process of an evaluation writes the volumes it scored here (`<out_dir>/.scored-volumes/
<split>/<subject>.npz`, each file written under a temporary name and renamed), and process
0 reads them all back for the protocol. So the hosts of a pod share the scoring, and an
evaluation killed mid-way (a host lost, a preemption) resumes: the rerun scores only the
volumes that have no file yet. The folder records what made its volumes (`identity`: the
config and the checkpoint steps); a store made by anything else is discarded, not reused.
The run folder must be on a file system all hosts share, as for the checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from uadjax import atomic
from uadjax.inference.scoring import ScoredVolume

STORE_DIR = ".scored-volumes"
IDENTITY_FILE = "identity.json"
ARRAYS = ("score", "image", "brain_mask", "seg", "reconstruction")


def identity_of(config, checkpoint_steps: dict, data: dict | None = None) -> dict:
    """What a store's volumes depend on: a digest of the whole config, the steps of the
    checkpoints that scored them and the dataset (`jobs.data_identity`: a regenerated
    phantom under the same folder is other data)."""
    text = json.dumps(json.loads(config.to_json_best_effort()), sort_keys=True)
    return {"config_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "checkpoints": {k: v["step"] for k, v in sorted(checkpoint_steps.items())},
            "data": data}


class VolumeStore:
    def __init__(self, out_dir: str | Path, identity: dict):
        self.folder = Path(out_dir) / STORE_DIR
        self.identity = identity

    def prepare(self) -> int:
        """Keeps the volumes of an interrupted evaluation with the same identity (returns how
        many), discards any other store. Call on one process, before the others write."""
        saved = None
        path = self.folder / IDENTITY_FILE
        if path.is_file():
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                saved = None
        if saved != self.identity and self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic.write_json(path, self.identity)
        # scored volumes only: not the temporary files of a write cut short
        return sum(not p.name.startswith(".") for p in self.folder.glob("*/*.npz"))

    def path(self, split: str, subject_id: str) -> Path:
        return self.folder / split / f"{subject_id}.npz"

    def has(self, split: str, subject_id: str) -> bool:
        return self.path(split, subject_id).is_file()

    def save(self, split: str, volume: ScoredVolume) -> None:
        arrays = {name: getattr(volume, name) for name in ARRAYS
                  if getattr(volume, name) is not None}
        with atomic.atomic_path(self.path(split, volume.subject_id)) as tmp, \
                open(tmp, "wb") as fh:
            np.savez(fh, kind=np.array(volume.kind), **arrays)

    def load(self, split: str, subject_id: str) -> ScoredVolume:
        path = self.path(split, subject_id)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: volume {subject_id} of {split} was not scored (did a host stop "
                "before its share was done? Rerun the same command: scored volumes are kept)")
        with np.load(path, allow_pickle=False) as data:
            return ScoredVolume(subject_id=subject_id, kind=str(data["kind"]),
                                **{name: data[name] for name in ARRAYS if name in data})

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def split(self, split: str, kinds: Mapping[str, str]) -> "StoredSplit":
        """The split's stored volumes as a lazy mapping (`kinds`: subject -> lesion kind)."""
        return StoredSplit(self, split, kinds)

    @property
    def processed_dir(self) -> Path:
        """Where the protocol keeps the post-processed scores of these volumes."""
        return self.folder / "processed"


class StoredSplit(Mapping):
    """subject -> ScoredVolume of one split, each loaded from the store when asked for (the
    last one is kept), so the protocol holds one volume at a time, whatever the split's size.

    `kinds` (subject -> lesion kind) answers without loading anything.
    """

    def __init__(self, store: VolumeStore, split: str, kinds: Mapping[str, str]):
        self.store, self.name, self.kinds = store, split, dict(kinds)
        self._last: ScoredVolume | None = None

    def __getitem__(self, subject_id: str) -> ScoredVolume:
        if subject_id not in self.kinds:
            raise KeyError(subject_id)
        if self._last is None or self._last.subject_id != subject_id:
            self._last = self.store.load(self.name, subject_id)
        return self._last

    def __iter__(self) -> Iterator[str]:
        return iter(self.kinds)

    def __len__(self) -> int:
        return len(self.kinds)
