"""What the methods share: one place, so that no method module imports another.

Methods import `base`, this module, `uadjax.diffusion`, `uadjax.inference` and
`uadjax.models`, never each other (tests/test_methods.py checks it).

Sections:
  Diffusion models (DDPM, cDDPM, pDDPM, MAEDiff, LDM): the schedule and noise named by the
    config, the [0, 1] <-> [-1, 1] image range, training timesteps, the denoising loss, the
    single-step / partial-diffusion reconstruction and the residual score.
  Patches (pDDPM, MAEDiff): training boxes, noising inside a patch, the (t, position) sweep
    and its stitching.
  Autoencoders (AE, VAE, DAE): building the network for the data, the reconstruction loss
    and the score of f(x).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from uadjax import diffusion
from uadjax.inference.patches import check_geometry, patch_positions
from uadjax.inference.sweep import sweep, weighted_mean
from uadjax.methods import base
from uadjax.models import make_model

# ------------------------------------------------------------------------------------------
# Diffusion models.

def schedule_of(config):
    """The schedule named by `config.diffusion` (schedule, num_timesteps)."""
    return diffusion.get_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)


NOISES = ("gaussian", "simplex", "simplex_3d")


def noise_fn_of(dcfg):
    """noise_fn(key, shape, t) for `dcfg.noise`: 'gaussian', 'simplex' (2D multi-octave,
    Behrendt) or 'simplex_3d' (AnoDDPM: the z = t slice of 3D multi-octave noise)."""
    if dcfg.noise == "gaussian":
        return diffusion.gaussian_noise
    if dcfg.noise in ("simplex", "simplex_3d"):
        generator = (diffusion.simplex_noise if dcfg.noise == "simplex"
                     else diffusion.simplex_noise_3d)
        return functools.partial(
            generator, octaves=dcfg.simplex_octaves,
            persistence=dcfg.simplex_persistence, frequency=dcfg.simplex_frequency,
            shared_across_batch=dcfg.simplex_shared)
    raise ValueError(f"unknown noise {dcfg.noise!r}; use one of {NOISES}")


def to_model_range(image):
    """[0, 1] -> [-1, 1]."""
    return image * 2.0 - 1.0


def from_model_range(values):
    """[-1, 1] -> [0, 1]."""
    return (values + 1.0) / 2.0


def sample_train_t(key, batch_size: int, dcfg):
    """t ~ U{t_min, ..., t_max} (the whole chain by default)."""
    t_min, t_max = dcfg.train_t_range
    t_max = dcfg.num_timesteps - 1 if t_max is None else t_max
    return jax.random.randint(key, (batch_size,), t_min, t_max + 1)


def model_fn_of(model: nnx.Module, cond=None):
    """(x_t [B, H, W, C], t [B]) -> prediction, with an optional fixed condition [B, D]."""

    def model_fn(x_t, t):
        return model(x_t, t) if cond is None else model(x_t, t, cond)

    return model_fn


def make_network(config, rngs: nnx.Rngs) -> nnx.Module:
    """The `config.model` network (the UNet of the DDPM family)."""
    return make_model(config.model, rngs=rngs)


def denoising_loss(apply_fn, batch, key, config):
    """The DDPM training loss of a batch of healthy slices -> (loss, metrics).

    apply_fn(x_t [B, H, W, C], t [B], rngs) -> the network's prediction in training mode
    (dropout drawn from `rngs`); conditioned methods close over their condition.
    """
    dcfg = config.diffusion
    schedule = schedule_of(config)
    x0 = to_model_range(batch["image"])
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    t = sample_train_t(k_t, x0.shape[0], dcfg)
    noise = noise_fn_of(dcfg)(k_noise, x0.shape, t)
    x_t = diffusion.q_sample(schedule, x0=x0, t=t, noise=noise)
    prediction = apply_fn(x_t, t, nnx.Rngs(dropout=k_drop))
    target = diffusion.target_for(dcfg.prediction, x0, noise, schedule, t)
    mask = None
    if dcfg.get("loss_in_brain", False):
        mask = batch["brain_mask"][..., None].astype(jnp.float32)
    loss = diffusion.diffusion_loss(prediction, target, kind=dcfg.loss, mask=mask)
    return loss, {}


def reconstruct(model_fn, x0, key, config):
    """Healthy reconstruction of x0 [B, H, W, C] in [-1, 1] -> [B, H, W, C] in [-1, 1].

    model_fn(x_t, t) -> the network's prediction (see `model_fn_of`).
    """
    dcfg = config.diffusion
    schedule = schedule_of(config)
    noise_fn = noise_fn_of(dcfg)
    if dcfg.score_mode == "single_step":
        timesteps = jnp.asarray(dcfg.test_timesteps, jnp.int32)
        keys = jax.random.split(key, timesteps.shape[0])

        def one_t(variant):
            t_value, k = variant
            t = jnp.full((x0.shape[0],), t_value, jnp.int32)
            return diffusion.reconstruct_single_step(
                model_fn, schedule, x0=x0, t=t, noise=noise_fn(k, x0.shape, t),
                prediction_type=dcfg.prediction)

        recs = sweep(one_t, (timesteps, keys), chunk_size=dcfg.get("sweep_chunk", None))
        return weighted_mean(recs)
    if dcfg.score_mode == "partial":
        return diffusion.partial_diffusion(
            model_fn, schedule, x0=x0, t_start=int(dcfg.partial_t_start), key=key,
            noise_fn=noise_fn, sampler=dcfg.partial_sampler,
            num_steps=dcfg.get("partial_num_steps", None), prediction_type=dcfg.prediction,
            clip_x0=(-1.0, 1.0), variance=dcfg.get("partial_variance", "fixed_small"))
    raise ValueError(f"unknown score_mode {dcfg.score_mode!r}; use 'single_step' or 'partial'")


def residual_score(image, rec, config) -> dict:
    """`base.residual_score` with the kind from `config.diffusion.residual` ('l1' | 'l2')."""
    return base.residual_score(image, rec, config.diffusion.get("residual", "l1"))


def denoising_passes(dcfg) -> int:
    """UNet passes per slice of `reconstruct`: one per test t (single step), or one per
    sampler step of the partial-diffusion chain."""
    if dcfg.score_mode == "single_step":
        return len(dcfg.test_timesteps)
    return sampler_steps(int(dcfg.partial_t_start), dcfg.partial_sampler,
                         dcfg.get("partial_num_steps", None))


def sampler_steps(t_start: int, sampler: str, num_steps) -> int:
    """Network passes of a chain from t_start to 0: every step (DDPM) or the respaced ones."""
    return int(num_steps) if sampler == "ddim" and num_steps else t_start + 1


# ------------------------------------------------------------------------------------------
# Patches (pDDPM, MAEDiff).

TRAIN_POSITIONS = ("grid", "random")
# patch.loss_reduction -> diffusion.diffusion_loss(mask_reduction=...)
LOSS_REDUCTIONS = {"image": "image", "patch": "mask"}


def sample_boxes(key, batch_size: int, image_size, pcfg):
    """Per-image training box corners -> [B, 2] int32 (traced).

    'grid': one of the test-time `patch_positions`, uniformly (authors' `grid_boxes`);
    'random': a uniform corner among all (H - size + 1) x (W - size + 1).
    """
    height, width = check_geometry(image_size, pcfg.size, pcfg.stride)
    if pcfg.train_positions == "grid":
        positions = jnp.asarray(patch_positions((height, width), pcfg.size, pcfg.stride))
        return positions[jax.random.randint(key, (batch_size,), 0, positions.shape[0])]
    if pcfg.train_positions == "random":
        k_row, k_col = jax.random.split(key)
        rows = jax.random.randint(k_row, (batch_size,), 0, height - pcfg.size + 1)
        cols = jax.random.randint(k_col, (batch_size,), 0, width - pcfg.size + 1)
        return jnp.stack([rows, cols], axis=-1).astype(jnp.int32)
    raise ValueError(f"unknown patch.train_positions {pcfg.train_positions!r}; "
                     f"use one of {TRAIN_POSITIONS}")


def noise_patch(schedule, *, x0, t, noise, mask):
    """x_t inside the mask, the clean x0 (exactly) outside.

    Args:
      x0: [B, H, W, C] clean images in [-1, 1].
      t: [B] int timesteps.
      noise: [B, H, W, C].
      mask: [B, H, W, 1] (or broadcastable) bool / {0, 1}.
    Returns:
      [B, H, W, C].
    """
    x_t = diffusion.q_sample(schedule, x0=x0, t=t, noise=noise)
    return jnp.where(mask.astype(bool), x_t, x0)


def stitch(patch_predictions, masks):
    """Averages patch predictions where they overlap.

    Args:
      patch_predictions: [..., P, B, H, W, C], each already zero outside its patch.
      masks: [P, H, W] patch masks whose union covers the image.
    Returns:
      [..., B, H, W, C] sum_p pred_p / sum_p mask_p.
    """
    coverage = jnp.sum(jnp.asarray(masks, jnp.float32), axis=0)[None, :, :, None]
    return jnp.sum(patch_predictions, axis=-5) / coverage


def patch_sweep_reconstruct(predict, x0, masks, key, config):
    """Single-step reconstruction of every patch at every test t, stitched and averaged.

    Args:
      predict: (x_t [B, H, W, C], t [B] int32, patch index [] int32) -> network prediction.
      x0: [B, H, W, C] in [-1, 1].
      masks: [P, H, W] patch masks whose union covers the image.
      key: PRNG key of the noise (one map per t, shared by every patch position).
      config: `diffusion.test_timesteps`, `diffusion.sweep_chunk` and the schedule fields.
    Returns:
      [B, H, W, C] in [-1, 1]: the T x P variants run as one `sweep`; results
      [T, P, B, H, W, C] are averaged over overlapping patches, then over T.
    """
    dcfg = config.diffusion
    schedule = schedule_of(config)
    noise_fn = noise_fn_of(dcfg)
    timesteps = jnp.asarray(dcfg.test_timesteps, jnp.int32)  # [T]
    num_t, num_p = timesteps.shape[0], masks.shape[0]
    # One noise map per t, shared by every patch position (and, for shared simplex noise,
    # every slice): [T, B, H, W, C].
    noises = jnp.stack([noise_fn(k, x0.shape, jnp.full((x0.shape[0],), t, jnp.int32))
                        for k, t in zip(jax.random.split(key, num_t), dcfg.test_timesteps,
                                        strict=True)])
    t_index, p_index = jnp.meshgrid(jnp.arange(num_t), jnp.arange(num_p), indexing="ij")

    def one_variant(variant):
        ti, pi = variant
        t = jnp.full((x0.shape[0],), timesteps[ti], jnp.int32)
        mask = masks[pi][None, :, :, None]
        x_t = noise_patch(schedule, x0=x0, t=t, noise=noises[ti], mask=mask)
        x0_hat = diffusion.to_x0(schedule, prediction=predict(x_t, t, pi), x_t=x_t, t=t,
                                 prediction_type=dcfg.prediction)
        return x0_hat * mask

    preds = sweep(one_variant, (t_index.reshape(-1), p_index.reshape(-1)),
                  chunk_size=dcfg.get("sweep_chunk", None))  # [T * P, B, H, W, C]
    preds = preds.reshape((num_t, num_p) + x0.shape)
    return weighted_mean(stitch(preds, masks))


# ------------------------------------------------------------------------------------------
# Autoencoders (AE, VAE, DAE).

AE_STAGE = "autoencoder"
LOSSES = ("l1", "l2")


def make_autoencoder(config, rngs: nnx.Rngs, *, variational: bool) -> nnx.Module:
    """The `config.model` network built for the data's image size (`config.data.image_size`).

    Raises:
      ValueError: `config.model.variational` is not `variational` (an AE config used for
        the VAE or the reverse), or `config.model.image_size` disagrees with the data.
    """
    fields = config.model.to_dict()
    if bool(fields.get("variational", False)) != variational:
        raise ValueError(f"config.model.variational must be {variational} for method "
                         f"{config.method!r}, got {fields.get('variational')}")
    image_size = tuple(int(s) for s in config.data.image_size)
    given = fields.get("image_size")
    if given is not None and tuple(given) != image_size:
        raise ValueError(f"config.model.image_size {tuple(given)} differs from "
                         f"config.data.image_size {image_size}; leave it unset")
    fields["image_size"] = image_size
    return make_model(fields, rngs=rngs)


def reconstruction_loss(reconstruction: jax.Array, image: jax.Array, kind: str,
                        mask: jax.Array | None = None) -> jax.Array:
    """Mean L1 or L2 error over every pixel and channel -> scalar float32.

    Args:
      reconstruction: [B, H, W, M] network output.
      image: [B, H, W, M] target.
      kind: 'l1' or 'l2'.
      mask: optional [B, H, W, 1] weights; the error outside counts as 0 and the mean still
        runs over the whole image (Kascenas et al.'s masked loss).

    Raises:
      ValueError: unknown kind.
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown reconstruction loss {kind!r}; use one of {LOSSES}")
    return diffusion.diffusion_loss(reconstruction, image, kind=kind, mask=mask,
                                    mask_reduction="image")


def autoencoder_score(models, batch, key, config):
    """-> residual_score of the deterministic reconstruction f(x) of the `AE_STAGE` network
    (the VAE decodes its mean); `key` is unused."""
    image = batch["image"]
    return base.residual_score(image, models[AE_STAGE](image)["reconstruction"])
