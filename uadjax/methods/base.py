"""What a method is: its networks and loss per training stage, and its anomaly score.

A stage is either trained (`loss_fn`: the trainer's optimiser, EMA and validation apply) or
a statistics pass (`statistics_fn`: frozen networks, non-parameter variables such as a
histogram updated in place over a fixed number of batches, no optimiser); both run in the
same loop with the same checkpoints, resume and data handling (`uadjax/trainer.py`).

Everything else (data, trainer, checkpoints, sharding, evaluation, prediction) is shared, so a
new method is one module in `uadjax/methods/` exposing `METHOD`, plus one config file.

Shapes: batches are dicts of arrays, `image [B, H, W, M]` float32 (M modalities in the data
config's order), `brain_mask [B, H, W]`, `seg [B, H, W]`, `slice_index [B]`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# make_model(config, rngs) -> nnx.Module holding every network of the stage.
MakeModelFn = Callable[[Any, nnx.Rngs], nnx.Module]
# loss_fn(model, batch, key, config) -> (scalar loss, dict of scalar metrics).
LossFn = Callable[[nnx.Module, dict, jax.Array, Any], tuple[jax.Array, dict]]
# statistics_fn(model, batch, key, config) -> dict of scalar metrics; it updates the model's
# non-parameter variables (counts, sums) in place and trains nothing.
StatisticsFn = Callable[[nnx.Module, dict, jax.Array, Any], dict]
# score_fn(models, batch, key, config) -> {'score': [B, H, W], 'reconstruction': [B, H, W, C]?}
# `models` maps stage names to the (EMA) networks of each trained stage.
ScoreFn = Callable[[dict[str, nnx.Module], dict, jax.Array, Any], dict]
# init_from(model, earlier_models) -> None: copies weights of earlier stages in place.
InitFromFn = Callable[[nnx.Module, dict[str, nnx.Module]], None]
# enabled(config) -> bool: whether the stage is part of this configuration.
EnabledFn = Callable[[Any], bool]


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage: the networks it holds and what is run on them, in order.

    A training stage has a `loss_fn`; its settings are `config.train`, overridden by the
    fields of `config.stage_train.<name>` when present (e.g. another optimiser for
    pre-training). A statistics stage has a `statistics_fn` instead, and its pass (split,
    augmentation, number of batches) is `config.stage_statistics.<name>`: training budgets
    (`short`, ...) never cut it. `init_from` receives only the earlier stages that ran;
    `enabled` (default: always) lets a config switch an optional stage off (e.g. cDDPM
    without pre-training).
    """

    name: str
    make_model: MakeModelFn
    loss_fn: LossFn | None = None
    init_from: InitFromFn | None = None
    enabled: EnabledFn | None = None
    statistics_fn: StatisticsFn | None = None

    def __post_init__(self):
        if (self.loss_fn is None) == (self.statistics_fn is None):
            raise ValueError(f"stage {self.name!r} needs exactly one of loss_fn (a training "
                             "stage) and statistics_fn (a statistics pass)")

    @property
    def is_statistics(self) -> bool:
        """True for a statistics pass (no optimiser), False for a training stage."""
        return self.statistics_fn is not None

    def is_enabled(self, config) -> bool:
        return self.enabled is None or bool(self.enabled(config))


@dataclasses.dataclass(frozen=True)
class Method:
    """A method: zero or more training stages and an anomaly-score function.

    Attributes:
      name: the config name (`config.method`).
      stages: training stages in order; a later stage may start from earlier ones.
      score_fn: pure, jit-able anomaly score of a batch of slices.
      score_stages: the stages whose networks `score_fn` reads (None: every active stage);
        a pre-training stage used only to initialise a later one is left out, so scoring
        and prediction never load it.
      network_evaluations: config -> {network: forward passes per scored slice} (the
        benchmark's cost column; a sweep of T t values over P patches is T * P).
    """

    name: str
    stages: tuple[Stage, ...]
    score_fn: ScoreFn
    score_stages: tuple[str, ...] | None = None
    network_evaluations: Callable[[Any], dict[str, float]] | None = None

    def active_stages(self, config) -> tuple[Stage, ...]:
        """The stages this config trains, in order."""
        return tuple(s for s in self.stages if s.is_enabled(config))

    def scoring_stages(self, config) -> tuple[Stage, ...]:
        """The active stages whose networks the score reads."""
        return tuple(s for s in self.active_stages(config)
                     if self.score_stages is None or s.name in self.score_stages)

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"method {self.name!r} has no stage {name!r}; "
                       f"stages: {[s.name for s in self.stages]}")


RESIDUALS = ("l1", "l2")


def residual_score(image: jax.Array, reconstruction: jax.Array, kind: str = "l1") -> dict:
    """The reconstruction-error score shared by reconstruction-based methods.

    image, reconstruction [B, H, W, M] -> {'score': [B, H, W] |x - rec| ('l1') or
    (x - rec)^2 ('l2') averaged over channels, 'reconstruction': [B, H, W, M]}.
    """
    if kind not in RESIDUALS:
        raise ValueError(f"unknown residual {kind!r}; use one of {RESIDUALS}")
    diff = image - reconstruction
    residual = jnp.square(diff) if kind == "l2" else jnp.abs(diff)
    return {"score": jnp.mean(residual, axis=-1), "reconstruction": reconstruction}
