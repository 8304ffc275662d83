"""How close the MMCCD mask sweep runs to plain batched forward passes of its networks.

    python -m benchmarks.mmccd_sweep --config=configs/mmccd.py:cpu [--batch 32] [--repeats 3]

The score of one batch of B slices makes R x S calls of f (R masks, S DDIM steps) and R calls
of g per slice, evaluated as `sweep` chunks of `mmccd.max_batch` inputs (masks x slices). This
times (a) the jitted score_fn on B random slices and (b) jitted plain forward passes of f and
of g on one batch of the same size as a sweep chunk, and prints
  - network evaluations per second inside the sweep (f + g calls per second),
  - the sweep's efficiency = the time (b) predicts for the sweep's calls / measured time (a)
    (target >= 90 %; the rest is the mask, noise and DDIM arithmetic and the chunk loop),
  - wall time per slice.
Networks are freshly initialised with perturbed weights (timing does not depend on them).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from uadjax.methods import mmccd

_CONFIG = config_flags.DEFINE_config_file("config", "configs/mmccd.py:cpu", "MMCCD config.")
_BATCH = flags.DEFINE_integer("batch", 0, "Slices per score call (0: config.eval.batch_size).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions after the warm-up.")


def _perturbed(module, seed: int):
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    leaves = [p + 0.05 * rng.standard_normal(p.shape).astype(np.float32) for p in leaves]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), rest)


def seconds_per_call(fn, repeats: int) -> float:
    """Mean wall time of `fn()` over `repeats` calls after a compiling warm-up call."""
    jax.block_until_ready(fn())  # compile + warm up
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn())
    return (time.perf_counter() - start) / repeats


def main(argv):
    del argv
    config = _CONFIG.value
    c = config.mmccd
    batch_size = _BATCH.value or config.eval.batch_size
    h, w = config.data.image_size
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.random((batch_size, h, w, 2)), jnp.float32),
             "brain_mask": jnp.ones((batch_size, h, w), jnp.uint8)}
    f = _perturbed(mmccd.make_forward(config, nnx.Rngs(0)), 0)
    g = _perturbed(mmccd.make_backward(config, nnx.Rngs(1)), 1)
    models = {"forward": f, "backward": g}

    score = jax.jit(lambda b, k: mmccd.score_fn(models, b, k, config))
    sweep_s = seconds_per_call(lambda: score(batch, jax.random.key(0)), _REPEATS.value)

    if c.forward == "unet":
        masks, steps = 1, 1
        chunk_inputs = batch_size
    else:
        masks = len(mmccd.band_masks((h, w), c.band_width, c.test_stride, tuple(c.directions)))
        steps = c.ddim_steps
        chunk = mmccd.sweep_chunk(config, batch_size) or masks
        chunk_inputs = min(chunk, masks) * batch_size
    f_in = config.model_f.in_channels
    xf = jnp.asarray(rng.standard_normal((chunk_inputs, h, w, f_in)), jnp.float32)
    xg = jnp.asarray(rng.standard_normal((chunk_inputs, h, w, 1)), jnp.float32)
    t = jnp.full((chunk_inputs,), 500, jnp.int32)
    call_f = jax.jit(lambda x, t: f(x, t))
    call_g = jax.jit(lambda x: g(x, None))
    f_s = seconds_per_call(lambda: call_f(xf, t), _REPEATS.value) / chunk_inputs
    g_s = seconds_per_call(lambda: call_g(xg), _REPEATS.value) / chunk_inputs

    f_calls = masks * steps * batch_size
    g_calls = masks * batch_size
    predicted = f_calls * f_s + g_calls * g_s
    print(f"config: {c.forward}, {masks} masks x {steps} DDIM steps, {batch_size} slices of "
          f"{h}x{w}, sweep chunk {chunk_inputs} network inputs, devices {jax.devices()}")
    print(f"plain forward passes (batch {chunk_inputs}): f {1 / f_s:.1f} / s, "
          f"g {1 / g_s:.1f} / s")
    print(f"sweep: {f_calls + g_calls} network evaluations in {sweep_s:.3f} s = "
          f"{(f_calls + g_calls) / sweep_s:.1f} / s")
    print(f"efficiency (plain-pass time of the same calls / sweep time): "
          f"{100 * predicted / sweep_s:.1f} %")
    print(f"wall time per slice: {sweep_s / batch_size:.3f} s "
          f"({f_calls // batch_size} f + {g_calls // batch_size} g calls per slice)")


if __name__ == "__main__":
    app.run(main)
