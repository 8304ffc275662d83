"""The one module that talks to orbax: train state, data-iterator state and config together.

A checkpoint step folder holds three items:
  state      the train state pytree (params, EMA params, optimiser state, step, ...)
  data_iter  the grain iterator state (JSON), so a resumed run sees exactly the batches it
             would have seen
  config     the run's config as JSON (for evaluation and prediction from a run directory)
orbax writes each step to a temporary folder and renames it when complete, so a killed run
never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves and restores the train state of one training stage in `directory`."""

    def __init__(self, directory: str, *, max_to_keep: int = 2, asynchronous: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=asynchronous)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data_iter", "config"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, *, data_iter=None, config=None, force: bool = True) -> bool:
        """Saves `state` (and the iterator state and config) at `step`."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data_iter"] = ocp.args.JsonSave(_iterator_state(data_iter))
        if config is not None:
            items["config"] = ocp.args.JsonSave(_config_to_dict(config))
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state, *, step: int | None = None, data_iter=None):
        """Restores the state (placed with `abstract_state`'s shardings) and the iterator.

        Args:
          abstract_state: pytree of `jax.ShapeDtypeStruct` with shardings (`jax.eval_shape`).
          step: the step to restore; the latest by default.
          data_iter: a grain iterator whose position is restored in place.
        Returns:
          The restored state pytree.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data_iter"] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if data_iter is not None:
            _set_iterator_state(data_iter, restored["data_iter"])
        return restored["state"]

    def restore_config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return restored["config"]

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
