"""DDPM reconstruction (Behrendt et al.; AnoDDPM with simplex noise as an option).

Training: x0 in [-1, 1] is noised to x_t with Gaussian or multi-octave simplex noise at a
random t; the UNet predicts x0 (or eps / v) with an L1 or L2 loss.
Score: |x - rec| averaged over channels, where rec is
  'single_step'  one network call at each t in `diffusion.test_timesteps` (one t = the
                 Behrendt protocol at t_test; {250, 500, 750} = the ENS ensemble), averaged;
  'partial'      AnoDDPM partial diffusion: noise to t_start, run the chain back to 0.
Inputs are images in [0, 1] (`image [B, H, W, M]`); the network works on 2x - 1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from uadjax import diffusion
from uadjax.inference.sweep import sweep, weighted_mean
from uadjax.methods import base
from uadjax.methods.base import Method, Stage
from uadjax.models import make_model


def make_schedule(cfg):
    """The schedule named by `cfg.diffusion` (schedule, num_timesteps)."""
    return diffusion.get_schedule(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)


def make_noise_fn(dcfg):
    """noise_fn(key, shape) for `dcfg.noise` in {'gaussian', 'simplex'}."""
    if dcfg.noise == "gaussian":
        return diffusion.gaussian_noise
    if dcfg.noise == "simplex":
        return functools.partial(
            diffusion.simplex_noise, octaves=dcfg.simplex_octaves,
            persistence=dcfg.simplex_persistence, frequency=dcfg.simplex_frequency,
            shared_across_batch=dcfg.simplex_shared)
    raise ValueError(f"unknown noise {dcfg.noise!r}; use 'gaussian' or 'simplex'")


def to_model_range(image):
    """[0, 1] -> [-1, 1]."""
    return image * 2.0 - 1.0


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


def make_unet(config, rngs: nnx.Rngs) -> nnx.Module:
    return make_model(config.model, rngs=rngs)


def denoising_loss(apply_fn, batch, key, config):
    """The DDPM training loss of a batch of healthy slices -> (loss, metrics).

    apply_fn(x_t [B, H, W, C], t [B], rngs) -> the network's prediction in training mode
    (dropout drawn from `rngs`); conditioned methods close over their condition.
    """
    dcfg = config.diffusion
    schedule = make_schedule(config)
    x0 = to_model_range(batch["image"])
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    t = sample_train_t(k_t, x0.shape[0], dcfg)
    noise = make_noise_fn(dcfg)(k_noise, x0.shape)
    x_t = diffusion.q_sample(schedule, x0=x0, t=t, noise=noise)
    prediction = apply_fn(x_t, t, nnx.Rngs(dropout=k_drop))
    target = diffusion.target_for(dcfg.prediction, x0, noise, schedule, t)
    mask = None
    if dcfg.get("loss_in_brain", False):
        mask = batch["brain_mask"][..., None].astype(jnp.float32)
    loss = diffusion.diffusion_loss(prediction, target, kind=dcfg.loss, mask=mask)
    return loss, {}


def loss_fn(model, batch, key, config):
    """Denoising loss of the unconditioned UNet -> (loss, metrics)."""
    return denoising_loss(
        lambda x_t, t, rngs: model(x_t, t, deterministic=False, rngs=rngs), batch, key, config)


def reconstruct(model_fn, x0, key, config):
    """Healthy reconstruction of x0 [B, H, W, C] in [-1, 1] -> [B, H, W, C] in [-1, 1].

    model_fn(x_t, t) -> the network's prediction (see `model_fn_of`).
    """
    dcfg = config.diffusion
    schedule = make_schedule(config)
    noise_fn = make_noise_fn(dcfg)
    if dcfg.score_mode == "single_step":
        timesteps = jnp.asarray(dcfg.test_timesteps, jnp.int32)
        keys = jax.random.split(key, timesteps.shape[0])

        def one_t(variant):
            t_value, k = variant
            t = jnp.full((x0.shape[0],), t_value, jnp.int32)
            return diffusion.reconstruct_single_step(
                model_fn, schedule, x0=x0, t=t, noise=noise_fn(k, x0.shape),
                prediction_type=dcfg.prediction)

        recs = sweep(one_t, (timesteps, keys), chunk_size=dcfg.get("sweep_chunk", None))
        return weighted_mean(recs)
    if dcfg.score_mode == "partial":
        return diffusion.partial_diffusion(
            model_fn, schedule, x0=x0, t_start=int(dcfg.partial_t_start), key=key,
            noise_fn=noise_fn, sampler=dcfg.partial_sampler,
            num_steps=dcfg.get("partial_num_steps", None), prediction_type=dcfg.prediction,
            clip_x0=(-1.0, 1.0))
    raise ValueError(f"unknown score_mode {dcfg.score_mode!r}; use 'single_step' or 'partial'")


def score_fn(models, batch, key, config):
    """-> {'score': [B, H, W] mean |x - rec| over channels, 'reconstruction': [B, H, W, C]}."""
    image = batch["image"]
    model_fn = model_fn_of(models["diffusion"])
    rec = (reconstruct(model_fn, to_model_range(image), key, config) + 1.0) / 2.0
    return residual_score(image, rec, config)


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


METHOD = Method(
    name="ddpm",
    stages=(Stage(name="diffusion", make_model=make_unet, loss_fn=loss_fn),),
    score_fn=score_fn,
    network_evaluations=lambda config: {"unet": denoising_passes(config.diffusion)},
)
