"""Throughput of a method's jitted train step and score function on random batches.

    python -m benchmarks.train_and_score --config=configs/ddpm.py:cpu [--steps 10] [--notrain]

Prints compile time and steady-state slices/s for training (forward + backward + Adam +
EMA, state donated) and for scoring (the method's score_fn, as evaluation runs it), on all
visible devices. Inputs are random, so the data pipeline is not part of the figure (see
benchmarks/input_pipeline.py for that).
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from uadjax import parallel, train
from uadjax.methods import get_method

_CONFIG = config_flags.DEFINE_config_file("config", "configs/ddpm.py:cpu", "Method config.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps after the warm-up.")
_TRAIN = flags.DEFINE_bool("train", True, "Also time the train step of every stage (else "
                           "the score runs on freshly initialised networks).")


def _batch(config, batch_size: int, rng: np.random.Generator) -> dict:
    h, w = config.data.image_size
    m = len(config.data.modalities)
    return {"image": rng.random((batch_size, h, w, m), np.float32),
            "brain_mask": np.ones((batch_size, h, w), np.uint8),
            "seg": np.zeros((batch_size, h, w), np.uint8),
            "slice_index": np.arange(batch_size, dtype=np.int32)}


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
    models = {}
    for stage in method.active_stages(config):
        cfg = train.stage_config(config, stage.name)
        tx = train.make_optimizer(cfg.train)
        graphdef, state = train.init_state(stage, cfg, tx, seed=0)
        if not _TRAIN.value:
            models[stage.name] = train.merge(graphdef, state["params"], state["rest"])
            continue
        state = parallel.replicate(state, mesh)
        step = jax.jit(train.make_train_step(stage, graphdef, tx, cfg,
                                             base_key=jax.random.key(0)), donate_argnums=(0,))
        batch = parallel.to_global(_batch(cfg, cfg.train.batch_size, rng), mesh)
        holder = {"state": state}

        def run_step(holder=holder, step=step, batch=batch):
            holder["state"], metrics = step(holder["state"], batch)
            return metrics["loss"]

        compile_s, dt = _time(run_step, _STEPS.value)
        print(f"train/{stage.name}: batch {cfg.train.batch_size}, compile {compile_s:.1f} s, "
              f"{dt * 1000:.0f} ms/step, {cfg.train.batch_size / dt:.0f} slices/s")
        models[stage.name] = train.merge(graphdef, holder["state"]["ema_params"],
                                         holder["state"]["rest"])
    models = {s.name: models[s.name] for s in method.scoring_stages(config)}

    @jax.jit
    def score(batch, key):
        return method.score_fn(models, batch, key, config)["score"]

    batch = parallel.to_global(_batch(config, config.eval.batch_size, rng), mesh)
    compile_s, dt = _time(lambda: score(batch, jax.random.key(1)), _STEPS.value)
    print(f"score: batch {config.eval.batch_size}, compile {compile_s:.1f} s, "
          f"{dt * 1000:.0f} ms/batch, {config.eval.batch_size / dt:.0f} slices/s")


if __name__ == "__main__":
    app.run(main)
