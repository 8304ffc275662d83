"""Latent diffusion anomaly detection (Pinaya et al., MICCAI 2022, arXiv 2206.03461).

Stages (each starts from the finished one before it):
  'vqvae'      VQ-VAE (`uadjax/models/vqvae.py`) on healthy slices in [0, 1]: L1 (or MSE)
               reconstruction + beta * commitment; the codebook follows an EMA of the encoder
               outputs (default; MONAI `EMAQuantizer`) or is learnt by the codebook loss.
  'diffusion'  DDPM (eps prediction, T = 1000) on the quantised latents z0 = s * z_q, with the
               VQ-VAE copied in and frozen (its weights become `Frozen` variables, which the
               optimiser never sees). s = 1 / std(z_q) of the first training batch (the LDM
               `scale_by_std` rule), stored in the `LatentScale` variable of the stage.
  'calibrate'  a statistics pass (no optimiser): the latent KL maps of healthy *validation*
               slices (split `val_healthy`, no augmentation) are accumulated in a histogram
               of log10 KL over in-brain latent positions (`KLHistogram`, networks frozen,
               `config.stage_statistics.calibrate.num_batches` batches). The latent-mask
               threshold is its `ldm.kl_percentile` quantile, so it is fixed before any test
               slice is scored and lives in the run folder like the other stages
               (`<workdir>/calibrate/checkpoints`). `ldm.kl_threshold > 0` overrides it.
Score of x [B, H, W, M] (`score_fn`, reads only the 'calibrate' stage, which holds every
network):
  1. z0 = s * quantise(E(x))                                   [B, h, w, D]
  2. latent anomaly map: for each t in `ldm.kl_timesteps`, z_t = q_sample(z0, t, eps) (one eps
     for every t, as MONAI `LatentDiffusionInferer.get_likelihood`) and the Gaussian KL
     KL(q(z_{t-1} | z_t, z0) || p(z_{t-1} | z_t)) per element, summed over D; mean over t.
     Both Gaussians have the posterior variance (fixed-small reverse variance), so the KL is
     a weighted squared error of the x0 estimate.                       [B, h, w]
  3. latent mask m = KL > threshold.
  4. resampling: from z_{t_s} = q_sample(z0, t_s) the reverse chain is run to 0; after every
     step the unmasked positions are replaced by the forward-noised original q_sample(z0,
     t_prev) with fresh noise (z0 itself after the last step), so they end equal to z0.
  5. healed image x_h = clip(D(z_healed / s), 0, 1); the pixel map is mean_c |x - x_h| times
     the mask upsampled to H x W (nearest) and smoothed by a Gaussian (`ldm.mask_sigma` px).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uadjax import diffusion
from uadjax.inference.sweep import sweep, weighted_mean
from uadjax.methods import shared
from uadjax.methods.base import Method, Stage
from uadjax.models import make_model
from uadjax.models.vqvae import nearest_code

KL_LOG10_RANGE = (-8.0, 4.0)  # histogram range of log10 KL (nats); values outside are clipped


class Frozen(nnx.Variable):
    """A weight copied from an earlier stage and kept fixed (not an `nnx.Param`)."""


class LatentScale(nnx.Variable):
    """The latent normalisation s (0 until the first diffusion training batch sets it)."""


class KLHistogram(nnx.Variable):
    """Counts of log10 KL of healthy validation latent positions (the calibration)."""


# ------------------------------------------------------------------------------ state helpers


def freeze(module: nnx.Module) -> nnx.Module:
    """Turns every `nnx.Param` of `module` into a `Frozen` variable, in place; returns it."""
    for path, node in list(nnx.iter_graph(module)):
        if isinstance(node, nnx.Param):
            parent = module
            for p in path[:-1]:
                parent = parent[p] if isinstance(parent, nnx.List) else getattr(parent, p)
            frozen = Frozen(node[...])
            if isinstance(parent, nnx.List):
                parent[path[-1]] = frozen
            else:
                setattr(parent, path[-1], frozen)
    return module


def copy_values(dst: nnx.Module, src: nnx.Module) -> None:
    """Copies every variable value of `src` into the variable at the same path of `dst`,
    whatever their types (a `Param` into a `Frozen`, for instance)."""
    values = dict(nnx.to_flat_state(nnx.state(src)))
    targets = list(nnx.to_flat_state(nnx.state(dst)))
    missing = [p for p, _ in targets if p not in values]
    if missing:
        raise ValueError(f"source module lacks the variables {missing[:5]}")
    for path, var in targets:
        var[...] = values[path][...]


# ------------------------------------------------------------------------------ networks


class LatentDiffusion(nnx.Module):
    """The frozen VQ-VAE, the latent UNet and the latent scale s."""

    def __init__(self, vqvae: nnx.Module, unet: nnx.Module):
        self.vqvae = vqvae
        self.unet = unet
        self.latent_scale = LatentScale(jnp.zeros((), jnp.float32))

    def latents(self, image: jax.Array) -> jax.Array:
        """image [B, H, W, M] in [0, 1] -> z0 = s * z_q [B, h, w, D]."""
        return self.latent_scale[...] * self.vqvae.quantize(image)

    def decode(self, z0: jax.Array) -> jax.Array:
        """z0 [B, h, w, D] (scaled) -> image [B, H, W, M]."""
        return self.vqvae.decode(z0 / self.latent_scale[...])


class Calibrated(nnx.Module):
    """The frozen latent diffusion model and the histogram of healthy KL values."""

    def __init__(self, ldm: LatentDiffusion, num_bins: int):
        self.ldm = ldm
        self.kl_counts = KLHistogram(jnp.zeros((num_bins,), jnp.float32))


def make_vqvae(config, rngs: nnx.Rngs) -> nnx.Module:
    return make_model(config.vqvae, rngs=rngs)


def make_latent_diffusion(config, rngs: nnx.Rngs) -> LatentDiffusion:
    if config.model.in_channels != config.vqvae.embedding_dim:
        raise ValueError(f"model.in_channels ({config.model.in_channels}) must equal "
                         f"vqvae.embedding_dim ({config.vqvae.embedding_dim})")
    return LatentDiffusion(freeze(make_vqvae(config, rngs)), make_model(config.model, rngs=rngs))


def make_calibrated(config, rngs: nnx.Rngs) -> Calibrated:
    ldm = make_latent_diffusion(config, rngs)
    freeze(ldm.unet)
    return Calibrated(ldm, int(config.ldm.kl_bins))


def init_from_vqvae(model: LatentDiffusion, earlier: dict) -> None:
    copy_values(model.vqvae, earlier["vqvae"])


def init_from_diffusion(model: Calibrated, earlier: dict) -> None:
    copy_values(model.ldm, earlier["diffusion"])


# ------------------------------------------------------------------------------ maths


def latent_kl_map(model_fn, schedule, *, z0, timesteps, key, prediction_type="eps",
                  clip_x0=None, chunk_size=None):
    """Mean over `timesteps` of the channel-summed KL terms: z0 [B, h, w, D] -> [B, h, w].

    One Gaussian noise draw (from `key`) is shared by every timestep. The timesteps are
    swept with `sweep` (vmapped, or in chunks of `chunk_size`).
    """
    noise = jax.random.normal(key, z0.shape, z0.dtype)
    ts = jnp.asarray(timesteps, jnp.int32)

    def one_t(t_value):
        t = jnp.full((z0.shape[0],), t_value, jnp.int32)
        kl = diffusion.kl_terms(model_fn, schedule, z0=z0, t=t, noise=noise,
                      prediction_type=prediction_type, clip_x0=clip_x0)
        return jnp.sum(kl, axis=-1)

    return weighted_mean(sweep(one_t, ts, chunk_size=chunk_size))


def masked_resample(model_fn, schedule, *, z0, mask, t_start, key, prediction_type="eps",
                    sampler="ddpm", num_steps=None, eta=1.0, clip_x0=None):
    """Regenerates the masked latent positions with the reverse chain from t_start.

    x_{t_start} = q_sample(z0, t_start, n0); each step t -> t_prev is a DDPM (or DDIM) step
    and then x <- where(mask, x, q_sample(z0, t_prev, fresh noise)), with z0 itself after
    the last step (t_prev = -1). With `mask` all True this is `diffusion.partial_diffusion`
    with the same key.

    Args:
      model_fn: (z_t, t [B]) -> prediction.
      schedule: the diffusion schedule.
      z0: [B, h, w, D] original latents.
      mask: [B, h, w] bool, True = regenerate.
      t_start: static int in [0, T), the timestep the chain starts from.
      key: PRNG key; k0, k1 = split(key): n0 = N(k0), step i uses fold_in(k1, i) (as
        `sample_loop`) and the known part fold_in(k0, i + 1).
      prediction_type: 'eps', 'x0' or 'v'.
      sampler: 'ddpm' (every step from t_start) or 'ddim' (`num_steps` respaced steps,
        stochasticity `eta`; eta = 1 is ancestral sampling on the respaced chain).
      num_steps: DDIM only; None = every step.
      eta: DDIM stochasticity.
      clip_x0: optional clip of the x0 estimates.

    Returns:
      [B, h, w, D] healed latents; exactly z0 where mask is False.
    """
    t_start = int(t_start)
    if not 0 <= t_start < schedule.num_timesteps:
        raise ValueError(f"t_start must be in [0, {schedule.num_timesteps}), got {t_start}")
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"unknown sampler {sampler!r}; use 'ddpm' or 'ddim'")
    if sampler == "ddim" and num_steps is not None:
        timesteps = diffusion.respaced_timesteps(t_start + 1, int(num_steps))
    else:
        timesteps = np.arange(t_start, -1, -1, dtype=np.int32)
    batch = z0.shape[0]
    keep = mask[..., None]
    k0, k1 = jax.random.split(key)
    x_start = diffusion.q_sample(schedule, x0=z0, t=jnp.full((batch,), t_start, jnp.int32),
                                 noise=jax.random.normal(k0, z0.shape, z0.dtype))

    def replace_known(x, i, t_prev):
        """After step i: the unmasked positions become z0 noised to t_prev (z0 at -1)."""
        prev = jnp.full((batch,), jnp.maximum(t_prev, 0), jnp.int32)
        noised = diffusion.q_sample(
            schedule, x0=z0, t=prev,
            noise=jax.random.normal(jax.random.fold_in(k0, i + 1), z0.shape, z0.dtype))
        known = jnp.where(t_prev >= 0, noised, z0)
        return jnp.where(keep, x, known)

    x = diffusion.sample_loop(model_fn, schedule, x_T=x_start, timesteps=timesteps, key=k1,
                              sampler=sampler, eta=eta, prediction_type=prediction_type,
                              clip_x0=clip_x0, after_step=replace_known)
    return x


def kl_bin_edges(num_bins: int) -> np.ndarray:
    """[num_bins + 1] edges of the log10 KL histogram."""
    return np.linspace(*KL_LOG10_RANGE, num_bins + 1)


def histogram_add(counts, values, weights):
    """Adds `values` (KL >= 0, any shape) with `weights` (same shape) to the log10 histogram
    `counts` [N]; values outside `KL_LOG10_RANGE` land in the first or last bin."""
    n = counts.shape[0]
    lo, hi = KL_LOG10_RANGE
    logv = jnp.log10(jnp.maximum(values, 1e-30)).reshape(-1)
    idx = jnp.clip(jnp.floor((logv - lo) / (hi - lo) * n), 0, n - 1).astype(jnp.int32)
    return counts + jax.ops.segment_sum(weights.reshape(-1).astype(counts.dtype), idx,
                                        num_segments=n)


def histogram_quantile(counts, q):
    """The q-quantile of the histogrammed KL values: the upper edge of the first bin where
    the cumulative share reaches q (so at most one bin, 12 / N decades, above the exact
    quantile). +inf when the histogram is empty (nothing is flagged)."""
    n = counts.shape[0]
    lo, hi = KL_LOG10_RANGE
    total = jnp.sum(counts)
    cdf = jnp.cumsum(counts) / jnp.maximum(total, 1e-12)
    idx = jnp.argmax(cdf >= q)
    edge = 10.0 ** (lo + (idx + 1) * (hi - lo) / n)
    return jnp.where(total > 0, edge, jnp.inf)


def gaussian_blur(x, sigma: float):
    """Separable Gaussian smoothing of x [B, H, W] (zero padding, radius ceil(3 sigma));
    sigma <= 0 returns x."""
    if sigma <= 0:
        return x
    radius = math.ceil(3.0 * sigma)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (offsets / sigma) ** 2)
    k = jnp.asarray(k / k.sum(), x.dtype)
    h = x[..., None]
    dn = ("NHWC", "HWIO", "NHWC")
    h = jax.lax.conv_general_dilated(h, k.reshape(-1, 1, 1, 1), (1, 1), "SAME",
                                     dimension_numbers=dn)
    h = jax.lax.conv_general_dilated(h, k.reshape(1, -1, 1, 1), (1, 1), "SAME",
                                     dimension_numbers=dn)
    return h[..., 0]


def latent_brain_mask(brain_mask, factor: int):
    """brain_mask [B, H, W] -> [B, H/f, W/f] float: 1 where at least half the f x f pixels of
    a latent position are brain."""
    b, h, w = brain_mask.shape
    m = brain_mask.astype(jnp.float32).reshape(b, h // factor, factor, w // factor, factor)
    return (jnp.mean(m, axis=(2, 4)) >= 0.5).astype(jnp.float32)


# ------------------------------------------------------------------------------ losses


def vqvae_loss_fn(model, batch, key, config):
    """Reconstruction + commitment (+ codebook for 'loss'); updates an EMA codebook."""
    del key
    lcfg = config.ldm
    image = batch["image"]
    out = model(image, update_codebook=True)
    diff = out["reconstruction"] - image
    rec = jnp.mean(jnp.abs(diff)) if lcfg.rec_loss == "l1" else jnp.mean(jnp.square(diff))
    loss = rec + lcfg.commitment_cost * out["commitment"]
    if config.vqvae.codebook_update == "loss":
        loss = loss + out["codebook"]
    return loss, {"reconstruction": rec, "commitment": out["commitment"],
                  "perplexity": out["perplexity"]}


def diffusion_loss_fn(model: LatentDiffusion, batch, key, config):
    """DDPM loss on the scaled quantised latents; sets s on the first batch."""
    dcfg = config.diffusion
    z_q = model.vqvae.quantize(batch["image"])
    scale = model.latent_scale[...]
    scale = jnp.where(scale > 0, scale, 1.0 / jnp.maximum(jnp.std(z_q), 1e-6))
    model.latent_scale[...] = scale
    z0 = scale * z_q
    schedule = shared.schedule_of(config)
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    t = shared.sample_train_t(k_t, z0.shape[0], dcfg)
    noise = shared.noise_fn_of(dcfg)(k_noise, z0.shape, t)
    z_t = diffusion.q_sample(schedule, x0=z0, t=t, noise=noise)
    pred = model.unet(z_t, t, deterministic=False, rngs=nnx.Rngs(dropout=k_drop))
    target = diffusion.target_for(dcfg.prediction, z0, noise, schedule, t)
    return diffusion.diffusion_loss(pred, target, kind=dcfg.loss), {"latent_scale": scale}


def _kl_map(ldm: LatentDiffusion, z0, key, config):
    lcfg = config.ldm
    return latent_kl_map(
        shared.model_fn_of(ldm.unet), shared.schedule_of(config), z0=z0,
        timesteps=lcfg.kl_timesteps, key=key, prediction_type=config.diffusion.prediction,
        clip_x0=lcfg.get("clip_x0", None), chunk_size=lcfg.get("sweep_chunk", None))


def calibrate_statistics_fn(model: Calibrated, batch, key, config) -> dict:
    """Adds the in-brain latent KL values of a healthy validation batch to the histogram, in
    place (the statistics pass of the 'calibrate' stage). -> {'mean_kl': in-brain mean of
    this batch, 'kl_threshold': the quantile of the counts so far}."""
    ldm = model.ldm
    z0 = ldm.latents(batch["image"])
    kl = _kl_map(ldm, z0, key, config)
    weights = latent_brain_mask(batch["brain_mask"], ldm.vqvae.downsample)
    counts = histogram_add(model.kl_counts[...], kl, weights)
    model.kl_counts[...] = counts
    mean_kl = jnp.sum(kl * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    return {"mean_kl": mean_kl,
            "kl_threshold": histogram_quantile(counts, config.ldm.kl_percentile)}


def kl_threshold(model: Calibrated, config):
    """`ldm.kl_threshold` when > 0, else the calibrated `ldm.kl_percentile` quantile."""
    fixed = float(config.ldm.get("kl_threshold", 0.0))
    if fixed > 0:
        return jnp.asarray(fixed, jnp.float32)
    return histogram_quantile(model.kl_counts[...], config.ldm.kl_percentile)


# ------------------------------------------------------------------------------ score


def requantize(vqvae: nnx.Module, z0: jax.Array, scale) -> jax.Array:
    """Scaled latents z0 [B, h, w, D] snapped to the nearest codebook vectors (as MONAI
    GenerativeModels' VQ-VAE `decode_stage_2_outputs` does before decoding), still scaled."""
    codebook = vqvae.quantizer.embedding[...]
    z_q = vqvae.quantizer.lookup(nearest_code(z0 / scale, codebook))
    return scale * z_q


def anomaly_maps(model: Calibrated, batch, key, config, *, mask=None) -> dict:
    """Every intermediate of the score (see the module docstring) -> {'score': [B, H, W],
    'reconstruction': [B, H, W, M] healed image, 'latent_kl': [B, h, w], 'latent_mask':
    [B, h, w] bool, 'z0', 'healed_z': [B, h, w, D]}.

    mask: [B, h, w] bool latent positions to heal instead of the KL mask (diagnostics, e.g.
    the downsampled ground truth as an oracle). `ldm.requantize` snaps the healed latents to
    the codebook before decoding.
    """
    ldm = model.ldm
    lcfg = config.ldm
    image = batch["image"]
    k_kl, k_res = jax.random.split(key)
    z0 = ldm.latents(image)
    kl = _kl_map(ldm, z0, k_kl, config)
    if mask is None:
        mask = kl > kl_threshold(model, config)
    healed_z = masked_resample(
        shared.model_fn_of(ldm.unet), shared.schedule_of(config), z0=z0, mask=mask,
        t_start=lcfg.resample_t_start, key=k_res, prediction_type=config.diffusion.prediction,
        sampler=lcfg.resample_sampler, num_steps=lcfg.get("resample_num_steps", None),
        eta=lcfg.get("resample_eta", 1.0), clip_x0=lcfg.get("clip_x0", None))
    if lcfg.get("requantize", False):
        healed_z = requantize(ldm.vqvae, healed_z, ldm.latent_scale[...])
    healed = jnp.clip(ldm.decode(healed_z), 0.0, 1.0)
    f = ldm.vqvae.downsample
    up = jnp.repeat(jnp.repeat(mask.astype(jnp.float32), f, axis=1), f, axis=2)
    pixel_mask = gaussian_blur(up, float(lcfg.mask_sigma))
    residual = jnp.mean(jnp.abs(image - healed), axis=-1)
    return {"score": residual * pixel_mask, "reconstruction": healed, "latent_kl": kl,
            "latent_mask": mask, "z0": z0, "healed_z": healed_z}


def score_fn(models, batch, key, config):
    """-> {'score': [B, H, W], 'reconstruction': [B, H, W, M] (the healed image)}."""
    out = anomaly_maps(models["calibrate"], batch, key, config)
    return {"score": out["score"], "reconstruction": out["reconstruction"]}


METHOD = Method(
    name="ldm",
    stages=(
        Stage(name="vqvae", make_model=make_vqvae, loss_fn=vqvae_loss_fn),
        Stage(name="diffusion", make_model=make_latent_diffusion, loss_fn=diffusion_loss_fn,
              init_from=init_from_vqvae),
        Stage(name="calibrate", make_model=make_calibrated, statistics_fn=calibrate_statistics_fn,
              init_from=init_from_diffusion),
    ),
    score_fn=score_fn,
    score_stages=("calibrate",),
    network_evaluations=lambda config: {
        "vq-vae encoder": 1, "vq-vae decoder": 1,
        "latent unet": len(config.ldm.kl_timesteps) + shared.sampler_steps(
            int(config.ldm.resample_t_start), config.ldm.resample_sampler,
            config.ldm.get("resample_num_steps", None))},
)
