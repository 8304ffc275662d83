"""DDPM reconstruction (Behrendt et al.; AnoDDPM with simplex noise as an option).

Training: x0 in [-1, 1] is noised to x_t with Gaussian or multi-octave simplex noise at a
random t; the UNet predicts x0 (or eps / v) with an L1 or L2 loss.
Score: |x - rec| averaged over channels, where rec is
  'single_step'  one network call at each t in `diffusion.test_timesteps` (one t = the
                 Behrendt protocol at t_test; {250, 500, 750} = the ENS ensemble), averaged;
  'partial'      AnoDDPM partial diffusion: noise to t_start, run the chain back to 0.
Inputs are images in [0, 1] (`image [B, H, W, M]`); the network works on 2x - 1. The pieces
the DDPM family shares (loss, reconstruction, score) are in `shared.py`.
"""

from __future__ import annotations

from uadjax.methods import shared
from uadjax.methods.base import Method, Stage


def loss_fn(model, batch, key, config):
    """Denoising loss of the unconditioned UNet -> (loss, metrics)."""
    return shared.denoising_loss(
        lambda x_t, t, rngs: model(x_t, t, deterministic=False, rngs=rngs), batch, key, config)


def score_fn(models, batch, key, config):
    """-> {'score': [B, H, W] mean |x - rec| over channels, 'reconstruction': [B, H, W, C]}."""
    image = batch["image"]
    model_fn = shared.model_fn_of(models["diffusion"])
    rec = shared.from_model_range(
        shared.reconstruct(model_fn, shared.to_model_range(image), key, config))
    return shared.residual_score(image, rec, config)


METHOD = Method(
    name="ddpm",
    stages=(Stage(name="diffusion", make_model=shared.make_network, loss_fn=loss_fn),),
    score_fn=score_fn,
    network_evaluations=lambda config: {"unet": shared.denoising_passes(config.diffusion)},
)
