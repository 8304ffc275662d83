"""Does a trained DISYRE restorer remove its own synthetic anomalies? (issue 22, D5)

    python -m benchmarks.disyre_learning --workdir=runs/disyre_cpu [--workdir=...] [--batches 8]

For each run folder: the restorer of its latest checkpoint, on random patches of the
healthy validation slices corrupted by the training corruption (`disyre.corrupt`, fixed
keys, so every run sees the same anomalies), measured
  - removed: the share of the inserted change the restoration removes inside the anomaly,
    1 - sum m (f(x_c) - x)^2 / sum m (x_c - x)^2 (m the soft mask);
  - AUROC of the residual |x_c - f(x_c)| (mean over channels) between anomalous pixels
    (m > 0.5) and the other brain pixels of the patches;
once with the label the training gives each anomaly (t from its severity: the oracle) and
once with the test-time score's labels (`disyre.test_labels`, their residuals averaged, as
the single-step score). Both must rise with training steps for a method that learns.
t sensitivity = mean |f(x_c, 0) - f(x_c, T - 1)| / mean |f(x_c, 0) - x_c|: how much the
severity label changes the restoration, relative to the restoration itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from sklearn.metrics import roc_auc_score

from uadjax import atomic, runs
from uadjax.data import builder, schema
from uadjax.methods import disyre

_WORKDIRS = flags.DEFINE_multi_string("workdir", [], "Trained DISYRE run folders.")
_BATCHES = flags.DEFINE_integer("batches", 8, "Batches of corrupted patches.")
_LABELS = flags.DEFINE_list("test_timesteps", [], "Test labels (default: the run's).")
_JSON = flags.DEFINE_string("json", "", "Also write the figures to this file.")


def corrupted_patches(config, batches: int) -> list[dict]:
    """Fixed corrupted patches of the healthy validation slices: [{'x', 'x_c', 'm',
    'alpha', 'brain'}] (arrays [B, P, P, C] / [B, P, P] / [B])."""
    scfg = config.disyre
    source = builder.load_split(config.data.data_dir, config.data, schema.VAL_HEALTHY)
    rng = np.random.default_rng(0)
    size = int(config.train.batch_size)
    out = []
    for step in range(batches):
        records = [source[int(i)] for i in rng.integers(0, len(source), size)]
        batch = {"image": jnp.asarray(np.stack([r["image"] for r in records])),
                 "brain_mask": jnp.asarray(np.stack([r["brain_mask"] for r in records]))}
        k_crop, k_corrupt = jax.random.split(jax.random.key(1000 + step))
        x, brain = disyre.random_crops(k_crop, batch, int(scfg.patch_size))
        x_c, alpha, m = disyre.corrupt(k_corrupt, x, brain, scfg)
        out.append({"x": x, "x_c": x_c, "m": m, "alpha": alpha, "brain": brain})
    return out


def restoration(model, patches: list[dict], scfg) -> dict:
    """{'oracle': {...}, 'test_labels': {...}} with 'removed' and 'auroc' each."""
    table = disyre.severity_schedule(scfg)
    labels = disyre.test_labels(scfg)
    call = jax.jit(lambda xc, t: model(xc, t))
    result = {}
    for name in ("oracle", "test_labels"):
        err_before = err_after = 0.0
        scores, truth = [], []
        for p in patches:
            x, x_c = p["x"], p["x_c"]
            if name == "oracle":
                restored = call(x_c, disyre.severity_to_t(p["alpha"], table))
                residual = jnp.abs(x_c - restored)
            else:
                outs = [call(x_c, jnp.full((x.shape[0],), t, jnp.int32)) for t in labels]
                restored = sum(outs) / len(outs)
                residual = sum(jnp.abs(x_c - o) for o in outs) / len(outs)
            weight = p["m"][..., None]  # inside the anomaly, as the mask weights it
            err_before += float(jnp.sum(weight * (x_c - x) ** 2))
            err_after += float(jnp.sum(weight * (restored - x) ** 2))
            inside = np.asarray(p["brain"]) > 0
            scores.append(np.asarray(jnp.mean(residual, -1))[inside])
            truth.append((np.asarray(p["m"]) > 0.5)[inside])
        result[name] = {"removed": 1.0 - err_after / max(err_before, 1e-12),
                        "auroc": float(roc_auc_score(np.concatenate(truth),
                                                     np.concatenate(scores)))}
    # How much the label matters: the restoration at the strongest-anomaly label against
    # the weakest, relative to what the restorer changes at all.
    first = patches[0]["x_c"]
    strong = call(first, jnp.zeros((first.shape[0],), jnp.int32))
    weak = call(first, jnp.full((first.shape[0],), int(scfg.num_timesteps) - 1, jnp.int32))
    result["t_sensitivity"] = float(jnp.mean(jnp.abs(strong - weak))
                                    / jnp.maximum(jnp.mean(jnp.abs(strong - first)), 1e-12))
    return result


def main(argv):
    del argv
    rows = []
    patches = None
    for workdir in _WORKDIRS.value:
        config = runs.run_config(workdir)
        if _LABELS.value:
            config.disyre.test_timesteps = tuple(int(t) for t in _LABELS.value)
        if patches is None:
            patches = corrupted_patches(config, _BATCHES.value)
        models, steps = runs.load_models_and_steps(config, workdir)
        stats = restoration(models[disyre.STAGE], patches, config.disyre)
        rows.append({"workdir": workdir, "step": steps[disyre.STAGE]["step"], **stats})
    print("| run | steps | removed (oracle t) | AUROC (oracle t) | removed (test labels) "
          "| AUROC (test labels) | t sensitivity |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workdir']} | {r['step']} | "
              f"{r['oracle']['removed']:.3f} | {r['oracle']['auroc']:.3f} | "
              f"{r['test_labels']['removed']:.3f} | {r['test_labels']['auroc']:.3f} | "
              f"{r['t_sensitivity']:.4f} |")
    if _JSON.value:
        atomic.write_json(_JSON.value, rows, indent=1)


if __name__ == "__main__":
    app.run(main)
