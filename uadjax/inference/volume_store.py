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
from pathlib import Path

import numpy as np

from uadjax import atomic
from uadjax.inference.scoring import ScoredVolume

STORE_DIR = ".scored-volumes"
IDENTITY_FILE = "identity.json"
ARRAYS = ("score", "image", "brain_mask", "seg", "reconstruction")


def identity_of(config, checkpoint_steps: dict) -> dict:
    """What a store's volumes depend on: a digest of the whole config and the steps of the
    checkpoints that scored them."""
    text = json.dumps(json.loads(config.to_json_best_effort()), sort_keys=True)
    return {"config_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "checkpoints": {k: v["step"] for k, v in sorted(checkpoint_steps.items())}}


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
        return len(list(self.folder.glob("*/*.npz")))

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
