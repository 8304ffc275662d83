"""One mechanism for every test-time sweep (over t values, patch positions, windows, masks).

Build a stacked batch of variants, map the score function over it with `jax.lax.map`
(vectorised in chunks of `chunk_size`, so memory stays within budget), then reduce with weights.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def sweep(fn: Callable, variants, *, chunk_size: int | None = None):
    """Applies `fn` to every variant (leading axis V of the `variants` pytree).

    Args:
      fn: variant -> pytree of arrays. Must be jit-able.
      variants: pytree whose leaves share a leading axis V.
      chunk_size: variants evaluated at once (vmapped); None = all V at once.
    Returns:
      pytree of arrays with a leading axis V, identical to `[fn(v) for v in variants]` stacked.
    """
    num = jax.tree.leaves(variants)[0].shape[0]
    if chunk_size is None or chunk_size >= num:
        return jax.vmap(fn)(variants)
    return jax.lax.map(fn, variants, batch_size=chunk_size)


def weighted_mean(stacked, weights=None):
    """Reduces the leading variant axis V of every leaf: [V, ...] -> [...]."""
    if weights is None:
        return jax.tree.map(lambda x: jnp.mean(x, axis=0), stacked)
    weights = jnp.asarray(weights, jnp.float32)
    weights = weights / jnp.sum(weights)

    def reduce(x):
        w = weights.reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.sum(w * x, axis=0)

    return jax.tree.map(reduce, stacked)
