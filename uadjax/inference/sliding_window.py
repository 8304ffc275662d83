"""Sliding-window inference with Gaussian blending, vectorised over windows.

A function trained on P x P patches is applied to whole slices: windows of side P start every
`step` pixels (the last one flush with the border, `uadjax.inference.patches`), all windows of
a batch go through one `sweep` (vmap, chunked to bound memory), and the outputs are blended
with a Gaussian importance map (MONAI's `sliding_window_inference` with mode 'gaussian'):

    out(p) = sum_w g_w(p) y_w(p) / sum_w g_w(p)

where g_w is the importance map placed at window w. Images smaller than a window are zero-
padded to the window size and the output cropped back.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from uadjax.inference.patches import patch_positions
from uadjax.inference.sweep import sweep


def gaussian_importance(size: int, sigma_scale: float = 0.125,
                        min_weight: float = 1e-3) -> np.ndarray:
    """[size, size] float32 Gaussian window weights, 1 at the centre.

    sigma = sigma_scale * size (MONAI default 0.125); weights below `min_weight` are raised to
    it so the borders of the image (covered by one window's edge only) keep a finite weight.
    """
    if size < 1 or sigma_scale <= 0:
        raise ValueError(f"need size >= 1 and sigma_scale > 0, got {size}, {sigma_scale}")
    coords = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-0.5 * (coords / (sigma_scale * size)) ** 2)
    weights = np.outer(g, g)
    return np.maximum(weights / weights.max(), min_weight).astype(np.float32)


def _pad_to(tree, height: int, width: int):
    """Zero-pads axes 1 and 2 of every leaf [B, h, w, ...] to at least (height, width)."""
    def pad(a):
        extra = ((0, 0), (0, max(0, height - a.shape[1])), (0, max(0, width - a.shape[2])))
        return jnp.pad(a, extra + ((0, 0),) * (a.ndim - 3))
    return jax.tree.map(pad, tree)


def sliding_window(fn: Callable, inputs, *, window: int, step: int,
                   weights: np.ndarray | None = None, chunk_size: int | None = None):
    """Applies `fn` to every window of `inputs` and blends the outputs.

    Args:
      fn: window inputs (the pytree of `inputs`, leaves cut to [B, P, P, ...]) -> pytree of
        outputs with leaves [B, P, P, ...]. Must be jit-able.
      inputs: pytree of arrays [B, H, W, ...] sharing B, H, W (e.g. image and brain mask).
      window: P, the window side.
      step: pixels between window starts (<= P); MONAI's overlap o is step = (1 - o) P.
      weights: [P, P] blending weights (default `gaussian_importance(P)`).
      chunk_size: windows evaluated at once (each on the whole batch); None = all.

    Returns:
      pytree of [B, H, W, ...]: the weighted mean of the window outputs at each pixel.
    """
    leaves = jax.tree.leaves(inputs)
    height, width = leaves[0].shape[1:3]
    padded_h, padded_w = max(height, window), max(width, window)
    inputs = _pad_to(inputs, padded_h, padded_w)
    if weights is None:
        weights = gaussian_importance(window)
    weights = np.asarray(weights, np.float32)
    if weights.shape != (window, window):
        raise ValueError(f"weights must be [{window}, {window}], got {weights.shape}")
    positions = patch_positions((padded_h, padded_w), window, step)  # [N, 2] static

    def one_window(corner):
        def cut(a):
            start = (0, corner[0], corner[1]) + (0,) * (a.ndim - 3)
            return jax.lax.dynamic_slice(a, start, (a.shape[0], window, window) + a.shape[3:])
        return fn(jax.tree.map(cut, inputs))

    outputs = sweep(one_window, jnp.asarray(positions), chunk_size=chunk_size)  # [N, B, P, P..]
    coverage = np.zeros((padded_h, padded_w), np.float32)
    for r, c in positions:
        coverage[r:r + window, c:c + window] += weights

    def blend(stacked):
        trailing = stacked.shape[4:]
        w = jnp.asarray(weights).reshape((1, window, window) + (1,) * len(trailing))
        canvas = jnp.zeros((stacked.shape[1], padded_h, padded_w) + trailing, stacked.dtype)
        for n, (r, c) in enumerate(positions):
            canvas = canvas.at[:, r:r + window, c:c + window].add(stacked[n] * w)
        norm = jnp.asarray(coverage).reshape((1, padded_h, padded_w) + (1,) * len(trailing))
        return (canvas / norm)[:, :height, :width]

    return jax.tree.map(blend, outputs)
