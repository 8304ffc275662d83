"""The one module that talks to orbax: train state, data-iterator state and config together.

A checkpoint step folder holds three items:
  state      the train state pytree (params, EMA params, optimiser state, step, ...)
  data_iter  the grain iterator state (JSON), so a resumed run sees exactly the batches it
             would have seen
  config     the run's config as JSON (for evaluation and prediction from a run directory)
  integrity  SHA-256 of every array of `state` (JSON), checked on restore
  selection  (best-validation copies only) why this step was kept: {"metric", "value",
             "step"} (JSON)
orbax writes each step to a temporary folder and renames it when complete, so a killed run
never leaves a half-written checkpoint behind (leftover temporary folders are removed at the
next start). What renaming cannot catch (a truncated, bit-flipped or emptied step folder:
OCDBT itself stores no checksum, a flipped byte restores as a wrong weight) the integrity
digest does: `restore` then warns and falls back to the newest step that reads back intact,
and raises `CheckpointError` if none does, never starting over silently.

Nothing here can execute code from the files: arrays are TensorStore/OCDBT, everything else
JSON; no pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp

ITEMS = ("state", "data_iter", "config", "integrity", "selection")


class CheckpointError(RuntimeError):
    """No usable checkpoint: every saved step is unreadable, or it belongs to another run."""


def has_checkpoint(directory: str) -> bool:
    """Whether `directory` holds a finished step folder (checked without creating anything)."""
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def host_copy(state):
    """`state` with every fully replicated array as one numpy copy (other arrays unchanged).

    orbax writes a replicated jax.Array by slicing it across its replicas (thousands of tiny
    device ops per save: 3 s for the tiny UNet on 8 devices); one host copy per array is
    written directly and restores into the sharding of the abstract state all the same.
    """
    def one(leaf):
        if isinstance(leaf, jax.Array) and leaf.sharding.is_fully_replicated:
            return np.asarray(leaf.addressable_data(0))
        return leaf

    return jax.tree.map(one, state)


def state_digest(state) -> dict:
    """{'sha256': hex, 'arrays': n}: a digest of the shapes, dtypes and bytes of every array
    of `state` (replicated arrays are read from this process's first copy)."""
    digest = hashlib.sha256()
    leaves = jax.tree.leaves(state)
    for leaf in leaves:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = leaf.addressable_data(0)
        array = np.ascontiguousarray(jax.device_get(leaf))
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.view(np.uint8).reshape(-1) if array.size else b"")
    return {"sha256": digest.hexdigest(), "arrays": len(leaves)}


class Checkpointer:
    """Saves and restores the train state of one training stage in `directory`."""

    def __init__(self, directory: str, *, max_to_keep: int = 2, asynchronous: bool = True,
                 read_only: bool = False):
        """`read_only` (evaluation, prediction, loading an earlier stage): never create the
        folder nor remove half-written step folders, which may be a training run's save in
        progress."""
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=not read_only,
            enable_async_checkpointing=asynchronous, cleanup_tmp_directories=not read_only)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        self.restored_step: int | None = None  # the step folder the last `restore` read

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, *, data_iter=None, config=None, selection=None,
             force: bool = True) -> bool:
        """Saves `state` (and the iterator state, config, integrity digest and, for a
        best-validation copy, the `selection` record) at `step`."""
        state = host_copy(state)
        items = {"state": ocp.args.StandardSave(state),
                 "integrity": ocp.args.JsonSave(state_digest(state))}
        if data_iter is not None:
            items["data_iter"] = ocp.args.JsonSave(_iterator_state(data_iter))
        if config is not None:
            items["config"] = ocp.args.JsonSave(_config_to_dict(config))
        if selection is not None:
            items["selection"] = ocp.args.JsonSave(selection)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state, *, step: int | None = None, data_iter=None,
                quarantine: bool = False):
        """Restores the state (placed with `abstract_state`'s shardings) and the iterator.

        Without `step`, the newest step that reads back intact: an unreadable or corrupted
        newer step is reported with a warning (and, with `quarantine`, moved to
        `<directory>_corrupt/` so training can write that step again).

        Args:
          abstract_state: pytree of `jax.ShapeDtypeStruct` with shardings (`jax.eval_shape`).
          step: restore exactly this step (no fallback).
          data_iter: a grain iterator whose position is restored in place.
          quarantine: move corrupted newer steps aside (training); evaluation leaves them.
        Returns:
          The restored state pytree.
        Raises:
          CheckpointError: no step can be restored (each step's problem is listed).
        """
        steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        problems = []
        for candidate in steps:
            try:
                state, iterator_state = self._restore_step(candidate, abstract_state,
                                                           with_iterator=data_iter is not None)
            except Exception as err:  # noqa: BLE001 - any failure means: try an older step
                problems.append(f"step {candidate}: {_short(err)}")
                continue
            if problems and _multi_host():
                # Each host would decide alone (a transient read error on one host would
                # put the hosts on different steps): stop and let a person look.
                raise CheckpointError(
                    f"{self.directory}: newer checkpoints are unreadable on process "
                    f"{jax.process_index()} ({'; '.join(problems)}); multi-host runs do not "
                    f"fall back on their own: move the bad step folders away and rerun")
            if problems:
                warnings.warn(f"{self.directory}: falling back to step {candidate} because "
                              f"newer checkpoints are unreadable ({'; '.join(problems)})",
                              stacklevel=2)
                print(f"warning: checkpoint {'; '.join(problems)}; "
                      f"resuming from step {candidate} instead")
                if quarantine:
                    self._quarantine([s for s in steps if s > candidate])
            if data_iter is not None:
                _set_iterator_state(data_iter, iterator_state)
            self.restored_step = candidate
            return state
        raise CheckpointError(f"{self.directory}: no checkpoint can be restored "
                              f"({'; '.join(problems)}). Move the folder away to start over.")

    def _restore_step(self, step: int, abstract_state, *, with_iterator: bool):
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if with_iterator:
            items["data_iter"] = ocp.args.JsonRestore()
        has_digest = os.path.isdir(os.path.join(self.directory, str(step), "integrity"))
        if has_digest:
            items["integrity"] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if has_digest:
            expected = restored["integrity"]
            actual = state_digest(restored["state"])
            if actual != expected:
                raise CheckpointError(f"integrity check failed (SHA-256 {actual['sha256'][:12]}"
                                      f" of {actual['arrays']} arrays, saved "
                                      f"{expected.get('sha256', '?')[:12]} of "
                                      f"{expected.get('arrays', '?')})")
        return restored["state"], restored["data_iter"] if with_iterator else None

    def _quarantine(self, steps) -> None:
        """Moves step folders to `<directory>_corrupt/<step>-<time>` (kept for inspection)."""
        target_root = self.directory.rstrip("/") + "_corrupt"
        os.makedirs(target_root, exist_ok=True)
        for step in steps:
            source = os.path.join(self.directory, str(step))
            if os.path.isdir(source) and jax.process_index() == 0:
                shutil.move(source, os.path.join(target_root, f"{step}-{int(time.time())}"))
        if _multi_host():
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("uadjax checkpoint quarantine")
        self._manager.reload()

    def restore_config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return restored["config"]

    def restore_selection(self, step: int | None = None) -> dict | None:
        """The `selection` record saved with `step` (default: the latest); None if the step
        has none (an ordinary checkpoint) or there is no checkpoint."""
        step = self.latest_step() if step is None else step
        if step is None or not os.path.isdir(os.path.join(self.directory, str(step),
                                                          "selection")):
            return None
        restored = self._manager.restore(
            step, args=ocp.args.Composite(selection=ocp.args.JsonRestore()))
        return restored["selection"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(state, sharding_tree=None):
    """`jax.ShapeDtypeStruct` pytree of `state`, with the given (or the arrays') shardings."""
    if sharding_tree is None:
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            state)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, sharding_tree)


def _short(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _iterator_state(data_iter) -> dict:
    """JSON form of an iterator's position (grain `get_state()`: a dict, or bytes)."""
    state = data_iter.get_state()
    if isinstance(state, bytes):
        return {"bytes": state.decode()}
    return {"state": state}


def _set_iterator_state(data_iter, saved: dict) -> None:
    if "bytes" in saved:
        data_iter.set_state(saved["bytes"].encode())
    else:
        data_iter.set_state(saved["state"])


def _config_to_dict(config) -> dict:
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return dict(config)


def _multi_host() -> bool:
    """Whether this run has several JAX processes (then hosts must agree on every step)."""
    return jax.process_count() > 1
