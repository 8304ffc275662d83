"""How close each vectorised test-time sweep runs to plain batched passes of its network.

    python -m benchmarks.sweep_efficiency [--size cpu] [--batch 0] [--repeats 3]
        [--configs ddpm,ddpm:ens,pddpm,pddpm:ens,pddpm:overlap,maediff,maediff:grid,disyre]

For each config it times (a) the jitted score function on B random slices, as evaluation
runs it, and (b) one jitted plain forward pass of the same network on a batch as large as
one chunk of the sweep (the network inputs the sweep evaluates at once), and prints
  - network evaluations per slice (t values x patch positions / windows),
  - network evaluations per second inside the sweep,
  - the efficiency = the time (b) predicts for the sweep's evaluations / measured time (a)
    (target >= 90 %; the rest is noising, masking, blending and the chunk loop).
MMCCD's mask sweep has its own script (benchmarks/mmccd_sweep.py: two networks, DDIM steps
in a scan). Networks are freshly initialised: timing does not depend on the weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.mmccd_sweep import seconds_per_call
from uadjax.methods import get_method, maediff

DEFAULT_CONFIGS = ("ddpm", "ddpm:ens", "pddpm", "pddpm:ens", "pddpm:overlap", "maediff",
                   "maediff:grid", "disyre")


@dataclasses.dataclass
class SweepShape:
    """What one slice costs: `calls` network evaluations, `per_chunk` of them evaluated at
    once (per slice of the batch); `plain_args(rng, n)` builds the arguments of one plain
    forward pass of the network on n inputs."""

    calls: int
    per_chunk: int
    plain_args: Callable


def _t(n):
    return jnp.full((n,), 500, jnp.int32)


def _image(rng, n, hw, c):
    return jnp.asarray(rng.standard_normal((n, *hw, c)), jnp.float32)


def sweep_shape(name: str, config) -> SweepShape:
    """The network evaluations per slice (the method's own declaration), how many of them
    one chunk of the sweep evaluates at once, and the plain-pass arguments."""
    hw = tuple(config.data.image_size)
    c = len(config.data.modalities)
    calls = int(sum(get_method(config.method).network_evaluations(config).values()))
    if name in ("ddpm", "pddpm"):  # t values (x patch positions), chunked by sweep_chunk
        chunk = min(config.diffusion.get("sweep_chunk") or calls, calls)
        return SweepShape(calls, chunk, lambda rng, n: (_image(rng, n, hw, c), _t(n)))
    if name == "maediff":
        chunk = min(config.diffusion.get("sweep_chunk") or calls, calls)
        corners = maediff.sliding_corners(hw, config.patch)
        visible = maediff.visible_tokens(corners[:1], hw, config.patch)  # [1, Nv]

        def args(rng, n):
            return _image(rng, n, hw, c), _t(n), jnp.broadcast_to(visible, (n, visible.shape[1]))

        return SweepShape(calls, chunk, args)
    if name == "disyre":  # windows x test labels; window_chunk windows at once, all labels
        d = config.disyre
        if d.score_mode != "single_step":
            raise ValueError("disyre: only the single-step score is a plain sweep")
        num_t, size = int(d.num_test_timesteps), int(d.patch_size)
        windows = calls // num_t
        chunk = min(d.get("window_chunk") or windows, windows) * num_t
        return SweepShape(calls, chunk, lambda rng, n: (_image(rng, n, (size, size), c), _t(n)))
    raise ValueError(f"no sweep description for {name!r}")


def measure(spec: str, size: str, batch: int, repeats: int) -> dict:
    name, _, modifiers = spec.partition(":")
    config = importlib.import_module(f"configs.{name}").get_config(
        ",".join(p for p in (size, modifiers) if p))
    method = get_method(config.method)
    (stage,) = method.scoring_stages(config)
    net = stage.make_model(config, nnx.Rngs(0))
    batch_size = batch or config.eval.batch_size
    h, w = config.data.image_size
    rng = np.random.default_rng(0)
    data = {"image": jnp.asarray(rng.random((batch_size, h, w, len(config.data.modalities))),
                                 jnp.float32),
            "brain_mask": jnp.ones((batch_size, h, w), jnp.uint8)}
    score = jax.jit(lambda b, k: method.score_fn({stage.name: net}, b, k, config))
    sweep_s = seconds_per_call(lambda: score(data, jax.random.key(0)), repeats)

    shape = sweep_shape(name, config)
    n = shape.per_chunk * batch_size
    args = shape.plain_args(rng, n)
    plain = jax.jit(lambda *a: net(*a))
    per_call = seconds_per_call(lambda: plain(*args), repeats) / n
    calls = shape.calls * batch_size
    return {"config": spec, "calls_per_slice": shape.calls, "chunk_inputs": n,
            "plain_per_s": 1 / per_call, "sweep_per_s": calls / sweep_s,
            "slices_per_s": batch_size / sweep_s, "efficiency": calls * per_call / sweep_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="cpu")
    parser.add_argument("--batch", type=int, default=0, help="slices per score call "
                        "(0: config.eval.batch_size)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    args = parser.parse_args()
    print(f"devices: {jax.devices()}")
    print("| config | network evaluations / slice | inputs per chunk | plain passes / s | "
          "sweep evaluations / s | slices / s | efficiency |")
    print("|---|---|---|---|---|---|---|")
    for spec in args.configs.split(","):
        r = measure(spec, args.size, args.batch, args.repeats)
        print(f"| {r['config']} | {r['calls_per_slice']} | {r['chunk_inputs']} | "
              f"{r['plain_per_s']:.0f} | {r['sweep_per_s']:.0f} | {r['slices_per_s']:.1f} | "
              f"{100 * r['efficiency']:.0f} % |", flush=True)


if __name__ == "__main__":
    main()
