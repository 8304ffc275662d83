"""cDDPM: DDPM conditioned on an encoding of the input (Behrendt et al., CiBM 2025).

Stages:
  'pretrain'   (optional, `cddpm.pretrain`) SparK masked image modelling of the condition
               encoder on healthy slices: mask units of `encoder.downsample` px, `mask_ratio`
               of them hidden, a light decoder reconstructs them, MSE on masked units only.
  'diffusion'  encoder and UNet trained together with the DDPM loss; the encoder starts
               from the pre-trained one (its weights; the condition head starts fresh, as the
               authors drop the fc layer when loading).
Condition: c = Linear(global-average-pool(encoder(x))) from the clean slice in [0, 1]
  (`cond_dim` wide); the UNet embeds c with its own MLP, concatenates it with the timestep
  embedding and every ResBlock's scale-shift normalisation reads both (`UNet(cond_dim=...)`).
Score: |x - rec| with rec the mean of single-step x0 reconstructions at
  `diffusion.test_timesteps` ({250, 500, 750} = ENS), as DDPM, all with the same c.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from uadjax.methods import shared
from uadjax.methods.base import Method, Stage
from uadjax.models import make_model
from uadjax.models.layers import linear
from uadjax.models.spark import SparKPretrainer, masked_reconstruction_loss, random_unit_mask


class ConditionedDenoiser(nnx.Module):
    """Condition encoder + head + conditioned UNet (the networks of the 'diffusion' stage)."""

    def __init__(self, encoder: nnx.Module, unet: nnx.Module, *, rngs: nnx.Rngs):
        self.encoder = encoder
        self.cond_head = linear(encoder.out_channels, unet.cond_dim, rngs=rngs)
        self.unet = unet

    def condition(self, image: jax.Array) -> jax.Array:
        """image [B, H, W, C] in [0, 1] -> c [B, cond_dim]."""
        features = self.encoder(image)[-1]
        return self.cond_head(jnp.mean(features, axis=(1, 2)))

    def __call__(self, x_t, t, cond, *, deterministic=True, rngs=None):
        return self.unet(x_t, t, cond, deterministic=deterministic, rngs=rngs)


def make_encoder(config, rngs: nnx.Rngs) -> nnx.Module:
    return make_model(config.encoder, rngs=rngs)


def make_pretrainer(config, rngs: nnx.Rngs) -> SparKPretrainer:
    return SparKPretrainer(make_encoder(config, rngs), config.cddpm.decoder_width, rngs=rngs)


def make_denoiser(config, rngs: nnx.Rngs) -> ConditionedDenoiser:
    if config.model.cond_dim <= 0:
        raise ValueError("cddpm needs model.cond_dim > 0 (the condition width)")
    return ConditionedDenoiser(make_encoder(config, rngs), make_model(config.model, rngs=rngs),
                               rngs=rngs)


def pretrain_loss_fn(model: SparKPretrainer, batch, key, config):
    """SparK loss on healthy slices: MSE on the pixels of masked units."""
    image = batch["image"]
    ds = model.encoder.downsample
    grid = (image.shape[1] // ds, image.shape[2] // ds)
    active = random_unit_mask(key, image.shape[0], grid, config.cddpm.mask_ratio)
    rec = model(image, active)
    return masked_reconstruction_loss(rec, image, active), {}


def diffusion_loss_fn(model: ConditionedDenoiser, batch, key, config):
    """DDPM loss of the conditioned UNet; the encoder is trained through c."""
    cond = model.condition(batch["image"])
    return shared.denoising_loss(
        lambda x_t, t, rngs: model(x_t, t, cond, deterministic=False, rngs=rngs),
        batch, key, config)


def init_from_pretraining(model: ConditionedDenoiser, earlier: dict) -> None:
    """Copies the pre-trained encoder weights (the condition head stays random)."""
    if "pretrain" in earlier:
        nnx.update(model.encoder, nnx.state(earlier["pretrain"].encoder))


def score_fn(models, batch, key, config):
    """-> {'score': [B, H, W], 'reconstruction': [B, H, W, C]} (see module docstring)."""
    model = models["diffusion"]
    image = batch["image"]
    cond = model.condition(image)
    model_fn = shared.model_fn_of(model.unet, cond)
    rec = shared.from_model_range(
        shared.reconstruct(model_fn, shared.to_model_range(image), key, config))
    return shared.residual_score(image, rec, config)


METHOD = Method(
    name="cddpm",
    stages=(
        Stage(name="pretrain", make_model=make_pretrainer, loss_fn=pretrain_loss_fn,
              enabled=lambda config: config.cddpm.pretrain),
        Stage(name="diffusion", make_model=make_denoiser, loss_fn=diffusion_loss_fn,
              init_from=init_from_pretraining),
    ),
    score_fn=score_fn,
    score_stages=("diffusion",),
    network_evaluations=lambda config: {"encoder": 1,
                                        "unet": shared.denoising_passes(config.diffusion)},
)
