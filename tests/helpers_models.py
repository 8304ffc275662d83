"""Functional use of NNX modules in the model tests: split once, apply as a pure function."""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``nnx.split(model, nnx.Param, ...)``: (graphdef, params, rest).

    ``params`` holds the trainable ``nnx.Param`` leaves (a pytree for optax and jax.grad);
    ``rest`` everything else (batch statistics, RNG state; empty for the UNet).
    Drop ``model`` afterwards if the states are donated to a jitted step.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


def make_apply_fn(graphdef: nnx.GraphDef) -> Callable[..., jax.Array]:
    """A pure, jit-able apply function for models with the UNet call signature.

    Returns:
      ``apply(params, rest, x, t, cond=None, *, dropout_key=None) -> y`` which merges the
      module inside the (possibly traced) call and evaluates
      ``model(x, t, cond, deterministic=dropout_key is None, rngs=...)``. Dropout is active
      only when ``dropout_key`` (a ``jax.random.key``) is given; the RNG state it uses is
      created inside the call, so nothing leaks out and ``params``/``rest`` are not mutated.
    """

    def apply(
        params: nnx.State,
        rest: nnx.State,
        x: jax.Array,
        t: jax.Array | None,
        cond: jax.Array | None = None,
        *,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        model = nnx.merge(graphdef, params, rest)
        if dropout_key is None:
            return model(x, t, cond, deterministic=True)
        return model(x, t, cond, deterministic=False, rngs=nnx.Rngs(dropout=dropout_key))

    return apply
