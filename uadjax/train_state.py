"""A stage's training state: the optimiser of its recipe, the state pytree and the module.

The trainer (`uadjax.trainer`) updates this state and the run-folder helpers (`uadjax.runs`)
restore it; both build it here, so a checkpoint always has the structure it was saved with.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from uadjax.methods.base import Stage

# The fields of a statistics pass (`config.stage_statistics.<name>`).
STATISTICS_FIELDS = ("data_split", "augment", "num_batches", "batch_size")


def stage_config(config, stage_name: str):
    """The config a stage runs with: `config.train` overridden by
    `config.stage_train.<stage_name>` (a training stage), or set from
    `config.stage_statistics.<stage_name>` (a statistics pass: `num_batches` batches become
    its steps, one checkpoint at the end, no validation)."""
    overrides = config.get("stage_train", {}).get(stage_name)
    statistics = config.get("stage_statistics", {}).get(stage_name)
    if overrides and statistics:
        raise ValueError(f"stage {stage_name!r} is in both config.stage_train and "
                         "config.stage_statistics; a stage is trained or a statistics pass")
    if not overrides and not statistics:
        return config
    config = config.copy_and_resolve_references()
    if statistics:
        unknown = set(statistics.keys()) - set(STATISTICS_FIELDS)
        if unknown:
            raise ValueError(f"config.stage_statistics.{stage_name} sets unknown fields "
                             f"{sorted(unknown)}; known: {list(STATISTICS_FIELDS)}")
        t = config.train
        t.update({k: v for k, v in statistics.items() if k != "num_batches"})
        t.num_steps = t.checkpoint_every_steps = int(statistics.num_batches)
        t.val_every_steps = 0
        return config
    unknown = set(overrides.keys()) - set(config.train.keys())
    if unknown:
        raise ValueError(f"config.stage_train.{stage_name} sets unknown train fields "
                         f"{sorted(unknown)}; known: {sorted(config.train.keys())}")
    config.train.update(dict(overrides))
    return config


def learning_rate_schedule(cfg):
    """The learning rate of `cfg` (a float, or step -> rate): 'constant' after an optional
    linear warm-up from 0 over `warmup_steps`; 'cosine' = that warm-up, then a cosine decay
    to 1 % of the peak at `num_steps`."""
    lr = cfg.learning_rate
    warmup = int(cfg.warmup_steps)
    if cfg.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, lr, max(warmup, 1), max(int(cfg.num_steps), warmup + 1), end_value=lr * 0.01)
    if warmup:
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    return lr


def make_optimizer(cfg) -> optax.GradientTransformation:
    """Adam/AdamW with optional warm-up, cosine decay and global-norm clipping.

    cfg fields (all required; their defaults are `configs/common.py`'s): optimizer
    ('adam'|'adamw'), learning_rate, weight_decay, warmup_steps, lr_schedule
    ('constant'|'cosine'), num_steps, grad_clip (0 disables), b1, b2.
    """
    schedule = learning_rate_schedule(cfg)
    name = cfg.optimizer
    b1, b2 = cfg.b1, cfg.b2
    if name == "adam":
        opt = optax.adam(schedule, b1=b1, b2=b2)
    elif name == "adamw":
        opt = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {name!r}; use 'adam' or 'adamw'")
    clip = cfg.grad_clip
    return optax.chain(optax.clip_by_global_norm(clip), opt) if clip else opt


def ema_decay_at(step, decay: float):
    """EMA decay with warm-up: min(decay, (1 + step) / (10 + step))."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def init_state(stage: Stage, config, tx, *, seed: int, earlier: dict | None = None):
    """Builds the stage's networks and returns (graphdef, state).

    state: {'step', 'params', 'ema_params', 'opt_state', 'rest', 'nonfinite_step'}; a
    statistics stage (`tx` None) has no 'opt_state', and its 'ema_params' are its params.
    """
    model = stage.make_model(config, nnx.Rngs(seed))
    if stage.init_from is not None and earlier:
        stage.init_from(model, earlier)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(jnp.asarray, nnx.to_pure_dict(params))
    rest = jax.tree.map(jnp.asarray, nnx.to_pure_dict(rest))
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "ema_params": jax.tree.map(jnp.copy, params),
        "rest": rest,
        "nonfinite_step": jnp.full((), -1, jnp.int32),
    }
    if tx is not None:
        state["opt_state"] = tx.init(params)
    return graphdef, state


def stage_optimizer(stage: Stage, cfg) -> optax.GradientTransformation | None:
    """The optimiser of a training stage's recipe `cfg` (its `config.train`); None for a
    statistics stage, which trains nothing."""
    return None if stage.is_statistics else make_optimizer(cfg)


def merge(graphdef, params: dict, rest: dict) -> nnx.Module:
    """Rebuilds a module from pure-dict params and non-param state (inside or outside jit)."""
    return nnx.merge(graphdef, nnx.State(params), nnx.State(rest))
