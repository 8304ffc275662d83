"""Throughput of a method's jitted train step and score function on random batches.

    python -m benchmarks.train_and_score --config=configs/ddpm.py:cpu [--steps 10] [--notrain]

Prints compile time and steady-state slices/s for training (forward + backward + Adam +
EMA, state donated) and for scoring (the method's score_fn, as evaluation runs it), on all
visible devices, with XLA's cost-analysis GFLOP per slice, and at the end the peak host
memory (RSS) of the process and, where the backend reports it, the peak device memory.
Inputs are random, so the data pipeline is not part of the figure (see
benchmarks/input_pipeline.py for that). `--json=FILE` also writes the figures as JSON
(benchmarks/methods_speed.py collects them for every method).
"""

from __future__ import annotations

import json
import resource
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from uadjax import parallel, train_state, trainer
from uadjax.methods import get_method

_CONFIG = config_flags.DEFINE_config_file("config", "configs/ddpm.py:cpu", "Method config.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps after the warm-up.")
_JSON = flags.DEFINE_string("json", "", "Also write the figures to this JSON file.")
_TRAIN = flags.DEFINE_bool("train", True, "Also time the train step of every stage (else "
                           "the score runs on freshly initialised networks).")


def _batch(config, batch_size: int, rng: np.random.Generator) -> dict:
    h, w = config.data.image_size
    m = len(config.data.modalities)
    return {"image": rng.random((batch_size, h, w, m), np.float32),
            "brain_mask": np.ones((batch_size, h, w), np.uint8),
            "seg": np.zeros((batch_size, h, w), np.uint8),
            "slice_index": np.arange(batch_size, dtype=np.int32)}


def _gflop(jitted, *args) -> float:
    """XLA cost-analysis GFLOP of one call of `jitted` on `args`."""
    cost = jitted.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", 0.0)) / 1e9


def _peak_memory() -> dict:
    """Peak host RSS (MiB) of this process; peak device memory (MiB) where reported."""
    out = {"host_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_mib"] = stats["peak_bytes_in_use"] / 2 ** 20
    return out


def _time(fn, n: int) -> tuple[float, float]:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n):
        out = fn()
    jax.block_until_ready(out)
    return compile_s, (time.perf_counter() - start) / n


def main(_):
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    method = get_method(config.method)
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(0)
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}")
    figures = {"method": config.method, "devices": jax.device_count(),
               "device_kind": jax.devices()[0].device_kind, "train": {}}
    models = {}
    for stage in method.active_stages(config):
        cfg = trainer.stage_config(config, stage.name)
        tx = train_state.make_optimizer(cfg.train)
        graphdef, state = trainer.init_state(stage, cfg, tx, seed=0)
        if not _TRAIN.value:
            models[stage.name] = trainer.merge(graphdef, state["params"], state["rest"])
            continue
        state = parallel.replicate(state, mesh)
        step = jax.jit(trainer.make_train_step(stage, graphdef, tx, cfg,
                                             base_key=jax.random.key(0)), donate_argnums=(0,))
        batch = parallel.to_global(_batch(cfg, cfg.train.batch_size, rng), mesh)
        holder = {"state": state}

        def run_step(holder=holder, step=step, batch=batch):
            holder["state"], metrics = step(holder["state"], batch)
            return metrics["loss"]

        compile_s, dt = _time(run_step, _STEPS.value)
        gflop = _gflop(step, holder["state"], batch) / cfg.train.batch_size
        print(f"train/{stage.name}: batch {cfg.train.batch_size}, compile {compile_s:.1f} s, "
              f"{dt * 1000:.0f} ms/step, {cfg.train.batch_size / dt:.0f} slices/s, "
              f"{gflop:.2f} GFLOP/slice")
        figures["train"][stage.name] = {"batch": cfg.train.batch_size, "ms_per_step": dt * 1e3,
                                        "slices_per_s": cfg.train.batch_size / dt,
                                        "gflop_per_slice": gflop, "compile_s": compile_s}
        models[stage.name] = trainer.merge(graphdef, holder["state"]["ema_params"],
                                         holder["state"]["rest"])
    models = {s.name: models[s.name] for s in method.scoring_stages(config)}

    @jax.jit
    def score(batch, key):
        return method.score_fn(models, batch, key, config)["score"]

    batch = parallel.to_global(_batch(config, config.eval.batch_size, rng), mesh)
    compile_s, dt = _time(lambda: score(batch, jax.random.key(1)), _STEPS.value)
    gflop = _gflop(score, batch, jax.random.key(1)) / config.eval.batch_size
    print(f"score: batch {config.eval.batch_size}, compile {compile_s:.1f} s, "
          f"{dt * 1000:.0f} ms/batch, {config.eval.batch_size / dt:.0f} slices/s, "
          f"{gflop:.2f} GFLOP/slice")
    figures["score"] = {"batch": config.eval.batch_size, "ms_per_batch": dt * 1e3,
                        "slices_per_s": config.eval.batch_size / dt, "gflop_per_slice": gflop,
                        "compile_s": compile_s}
    figures["memory"] = _peak_memory()
    print("peak memory: " + ", ".join(f"{k} {v:.0f}" for k, v in figures["memory"].items()))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    app.run(main)
