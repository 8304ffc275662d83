"""Where LDM (Pinaya et al.) loses lesions: three evaluation-only checks on a trained run
(issue 22).

    python -m benchmarks.ldm_checks --workdir=runs/budget/ldm-cpu_long/seed0 \
        [--per_kind 5] [--slice_step 2] [--t_starts 149,299,499] [--json F]

On the first `per_kind` lesion-test subjects of each kind (every `slice_step`-th brain slice)
and the healthy test subjects:
  (a) per-timestep KL: the AUROC of lesion latent cells (at least half their pixels lesion)
      against healthy in-brain cells (no lesion pixel), for the KL term of each t of
      `ldm.kl_timesteps` and for their mean (the score's mask statistic), and the recall of
      lesion cells at the calibrated threshold (the mask the score uses);
  (b) oracle mask: the downsampled ground truth (cells with any lesion pixel) as the healing
      mask, with the resampling start t_s of `--t_starts`, against the KL mask: pixel AUPRC
      and best pooled Dice (oracle threshold) over the brain pixels, beside the intensity
      threshold on the same pixels. Well above the KL mask: the mask is the bottleneck; not
      above: healing or decoding is;
  (c) re-quantisation: the healed latents snapped to the codebook before decoding (MONAI's
      `decode_stage_2_outputs`), against decoding them as they are: the same accuracy
      figures, and on healthy test slices the mean in-brain score and the share of brain
      pixels above the lesion-calibrated threshold (false positives).
All figures use raw maps (before the evaluation's post-processing) and fixed keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from sklearn.metrics import roc_auc_score

from benchmarks.subsets import pixel_accuracy, slices_of
from uadjax import atomic, diffusion, metrics, runs
from uadjax.data import schema
from uadjax.methods import ldm, shared

_WORKDIR = flags.DEFINE_string("workdir", None, "Trained LDM run folder.", required=True)
_PER_KIND = flags.DEFINE_integer("per_kind", 5, "Lesion-test subjects per kind.")
_SLICE_STEP = flags.DEFINE_integer("slice_step", 2, "Every n-th brain slice of a volume.")
_T_STARTS = flags.DEFINE_list("t_starts", ["149", "299", "499"], "Oracle-mask t_s values.")
_BATCH = flags.DEFINE_integer("batch", 16, "Slices per call.")
_JSON = flags.DEFINE_string("json", "", "Also write the figures to this file.")
_KL_TIMESTEPS = flags.DEFINE_list(
    "kl_timesteps", [], "Check (a) only, at these KL timesteps instead of the run's (the "
    "recall then uses the run's calibrated threshold, which belongs to its own timesteps).")


def cell_fraction(mask: np.ndarray, factor: int) -> np.ndarray:
    """[N, H, W] bool -> [N, H/f, W/f] share of each f x f cell that is True."""
    n, h, w = mask.shape
    return mask.reshape(n, h // factor, factor, w // factor, factor).mean(axis=(2, 4))


def batched(fn, data: dict, batch: int, keys=("image", "brain_mask", "seg")) -> dict:
    """fn(batch dict, index) -> dict of arrays [B, ...], over `data` in padded batches."""
    n = len(data["image"])
    outs: dict[str, list] = {}
    for i, start in enumerate(range(0, n, batch)):
        part = {k: data[k][start:start + batch] for k in keys}
        pad = batch - len(part["image"])
        part = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
                for k, v in part.items()}
        for k, v in fn(part, i).items():
            outs.setdefault(k, []).append(np.asarray(v)[:batch - pad])
    return {k: np.concatenate(v) for k, v in outs.items()}


def per_timestep_kl(model, data: dict, config, batch: int) -> dict:
    """(a): [N, h, w] KL map per t of `ldm.kl_timesteps` (one noise draw per batch, shared
    by every t, as the score) and their mean."""
    net = model.ldm
    schedule = shared.schedule_of(config)
    model_fn = shared.model_fn_of(net.unet)
    timesteps = [int(t) for t in config.ldm.kl_timesteps]

    @jax.jit
    def run(image, key):
        z0 = net.latents(image)
        noise = jax.random.normal(key, z0.shape, z0.dtype)
        out = {}
        for t in timesteps:
            tb = jnp.full((z0.shape[0],), t, jnp.int32)
            kl = diffusion.kl_terms(model_fn, schedule, z0=z0, t=tb, noise=noise,
                                    prediction_type=config.diffusion.prediction,
                                    clip_x0=config.ldm.get("clip_x0", None))
            out[f"t{t}"] = jnp.sum(kl, axis=-1)
        out["mean"] = sum(out[f"t{t}"] for t in timesteps) / len(timesteps)
        return out

    return batched(lambda b, i: run(jnp.asarray(b["image"]), jax.random.key(i)), data, batch)


def kl_figures(kl: dict, data: dict, factor: int, threshold: float) -> dict:
    """(a): AUROC of lesion cells against healthy in-brain cells, per t and for the mean;
    the lesion cells' recall at the calibrated threshold (mean KL > threshold)."""
    lesion_share = cell_fraction(data["seg"], factor)
    brain = cell_fraction(data["brain_mask"], factor) >= 0.5
    lesion, healthy = lesion_share >= 0.5, brain & (lesion_share == 0)
    out = {}
    for name, values in kl.items():
        scores = np.concatenate([values[lesion], values[healthy]])
        labels = np.concatenate([np.ones(lesion.sum()), np.zeros(healthy.sum())])
        out[name] = {"auroc": float(roc_auc_score(labels, scores))}
    out["mean"]["recall_at_threshold"] = float(np.mean(kl["mean"][lesion] > threshold))
    out["mean"]["healthy_cells_flagged"] = float(np.mean(kl["mean"][healthy] > threshold))
    out["cells"] = {"lesion": int(lesion.sum()), "healthy": int(healthy.sum())}
    return out


def score_maps(model, data: dict, config, batch: int, *, oracle: bool) -> np.ndarray:
    """[N, H, W] LDM scores with the KL mask or (oracle) the downsampled ground truth."""
    factor = model.ldm.vqvae.downsample

    @jax.jit
    def run(b, key):
        mask = None
        if oracle:
            n, h, w = b["seg"].shape
            cells = b["seg"].reshape(n, h // factor, factor, w // factor, factor)
            mask = jnp.any(cells, axis=(2, 4))
        return {"score": ldm.anomaly_maps(model, b, key, config, mask=mask)["score"]}

    return batched(lambda b, i: run({k: jnp.asarray(v) for k, v in b.items()},
                                    jax.random.key(100 + i)), data, batch)["score"]


def healthy_false_positives(maps: np.ndarray, healthy: dict, threshold: float) -> dict:
    brain = healthy["brain_mask"]
    return {"mean_score": float(maps[brain].mean()),
            "share_above_threshold": float(np.mean(maps[brain] > threshold))}


def main(argv):
    del argv
    config = runs.run_config(_WORKDIR.value)
    models, steps = runs.load_models_and_steps(config, _WORKDIR.value)
    model = models["calibrate"]
    lesions = slices_of(config, schema.TEST_LESION, _PER_KIND.value, _SLICE_STEP.value)
    healthy = slices_of(config, schema.TEST_HEALTHY, _PER_KIND.value, _SLICE_STEP.value)
    factor = model.ldm.vqvae.downsample
    threshold = float(ldm.kl_threshold(model, config))
    print(f"{len(lesions['image'])} lesion and {len(healthy['image'])} healthy slices; "
          f"checkpoints { {k: v['step'] for k, v in steps.items()} }; KL threshold "
          f"{threshold:.4g}", flush=True)
    result: dict = {"workdir": _WORKDIR.value, "kl_threshold": threshold}

    # (a)
    if _KL_TIMESTEPS.value:
        config.ldm.kl_timesteps = tuple(int(t) for t in _KL_TIMESTEPS.value)
    result["a_kl"] = kl_figures(per_timestep_kl(model, lesions, config, _BATCH.value),
                                lesions, factor, threshold)
    order = [f"t{int(t)}" for t in config.ldm.kl_timesteps] + ["mean"]
    print("(a) lesion cells against healthy in-brain cells, AUROC: " + ", ".join(
        f"{k} {result['a_kl'][k]['auroc']:.3f}" for k in order))
    print(f"    recall at the threshold {result['a_kl']['mean']['recall_at_threshold']:.3f}, "
          f"healthy cells flagged {result['a_kl']['mean']['healthy_cells_flagged']:.3f}",
          flush=True)
    if _KL_TIMESTEPS.value:
        _write(result)
        return

    # (b)
    intensity = np.mean(lesions["image"], axis=-1)
    rows = {"intensity threshold": pixel_accuracy(intensity, lesions),
            f"KL mask, t_s = {config.ldm.resample_t_start}":
                pixel_accuracy(score_maps(model, lesions, config, _BATCH.value, oracle=False),
                         lesions)}
    for t_start in (int(t) for t in _T_STARTS.value):
        cfg = config.copy_and_resolve_references()
        cfg.ldm.resample_t_start = t_start
        rows[f"oracle mask, t_s = {t_start}"] = pixel_accuracy(
            score_maps(model, lesions, cfg, _BATCH.value, oracle=True), lesions)
        print(f"(b) oracle t_s = {t_start} done", flush=True)
    result["b_mask"] = rows

    # (c)
    result["c_requantize"] = {}
    for requant in (False, True):
        cfg = config.copy_and_resolve_references()
        cfg.ldm.requantize = requant
        lesion_maps = score_maps(model, lesions, cfg, _BATCH.value, oracle=False)
        healthy_maps = score_maps(model, healthy, cfg, _BATCH.value, oracle=False)
        # the lesion-calibrated threshold of this variant: best pooled Dice on the lesions
        brain = lesions["brain_mask"]
        cut = metrics.best_dice_threshold([lesion_maps[brain]], [lesions["seg"][brain]])
        result["c_requantize"]["requantized" if requant else "as decoded"] = {
            "lesions": pixel_accuracy(lesion_maps, lesions),
            "healthy": healthy_false_positives(healthy_maps, healthy, cut.threshold)}
    kinds = sorted(set(lesions["kind"].tolist()))
    print("| scoring | " + " | ".join(f"{k} AUPRC | {k} Dice" for k in kinds) + " |")
    print("|---" * (1 + 2 * len(kinds)) + "|")
    for name, acc in rows.items():
        print(f"| {name} | " + " | ".join(
            f"{100 * acc[k]['auprc']:.1f} | {100 * acc[k]['dice']:.1f}" for k in kinds) + " |")
    for name, r in result["c_requantize"].items():
        print(f"| (c) {name} | " + " | ".join(
            f"{100 * r['lesions'][k]['auprc']:.1f} | {100 * r['lesions'][k]['dice']:.1f}"
            for k in kinds) + f" | healthy: mean score {r['healthy']['mean_score']:.4f}, "
            f"{100 * r['healthy']['share_above_threshold']:.2f} % of brain above threshold |")
    _write(result)


def _write(result: dict) -> None:
    if _JSON.value:
        atomic.write_json(_JSON.value, result, indent=1)


if __name__ == "__main__":
    app.run(main)
