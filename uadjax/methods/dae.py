"""Denoising autoencoder (DAE) of Kascenas et al. (2022), "Denoising autoencoders for
unsupervised anomaly detection in brain MRI".

Training: a UNet without timestep (`unet`, `use_timestep=False`, `cond_dim=0`) maps
x + coarse noise back to x (x [B, H, W, M] in [0, 1]) with an L2 loss. The coarse noise is
Gaussian noise of std `dae.noise_std` drawn on a `noise_res` x `noise_res` grid per slice and
channel, bilinearly upsampled to H x W (`jax.image.resize`), randomly translated (a circular
shift per slice, as the authors' `torch.roll`), and, with `dae.noise_in_brain`, kept only
inside the brain mask. The noisy image is not clipped to [0, 1] (the authors do not clip
either), so the network sees exactly x + noise. With `dae.loss_in_brain` the error outside
the brain counts as 0 and the mean runs over the whole image (the authors' masked loss).
Score: |x - f(x)| averaged over channels, with no noise at test time.

`noise_std` is the std of the coarse grid values (the authors' convention); bilinear
interpolation lowers the variance between grid nodes, to about (2/3)^2 of `noise_std^2` on
average over the pixels (2/3 per axis), so the per-pixel std is about 2/3 of `noise_std`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from uadjax.methods import shared
from uadjax.methods.base import Method, Stage, residual_score
from uadjax.models import make_model

STAGE = "denoiser"


def make_denoiser(config, rngs: nnx.Rngs) -> nnx.Module:
    """The `config.model` UNet; ValueError if it expects a timestep or a condition."""
    if config.model.get("use_timestep", True) or config.model.get("cond_dim", 0):
        raise ValueError("the DAE's UNet takes no timestep and no condition: set "
                         "config.model.use_timestep = False and config.model.cond_dim = 0")
    return make_model(config.model, rngs=rngs)


def coarse_noise(key: jax.Array, shape: tuple[int, int, int, int], *, noise_res: int,
                 std: float, roll: bool = True) -> jax.Array:
    """Smooth Gaussian noise: N(0, std^2) on a coarse grid, bilinearly upsampled.

    Args:
      key: PRNG key.
      shape: (B, H, W, C) of the output.
      noise_res: the coarse grid is noise_res x noise_res per slice and channel
        (1 <= noise_res <= min(H, W)).
      std: standard deviation of the coarse grid values.
      roll: circularly shift each slice's noise by a random (dy, dx), so the grid nodes do
        not always fall on the same pixels.

    Returns:
      [B, H, W, C] float32.

    Raises:
      ValueError: noise_res out of range or std negative.
    """
    b, h, w, c = shape
    if not 1 <= noise_res <= min(h, w):
        raise ValueError(f"noise_res must be in [1, {min(h, w)}] for {h}x{w} images, "
                         f"got {noise_res}")
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    k_grid, k_roll = jax.random.split(key)
    grid = std * jax.random.normal(k_grid, (b, noise_res, noise_res, c), jnp.float32)
    noise = jax.image.resize(grid, (b, h, w, c), method="bilinear")
    if roll:
        shifts = jax.random.randint(k_roll, (b, 2), 0, jnp.array([h, w]))
        noise = jax.vmap(lambda n, s: jnp.roll(n, (s[0], s[1]), axis=(0, 1)))(noise, shifts)
    return noise


def add_coarse_noise(image: jax.Array, brain_mask: jax.Array, key: jax.Array,
                     dcfg) -> jax.Array:
    """image [B, H, W, M] + coarse noise (zero outside brain_mask [B, H, W] when
    `dcfg.noise_in_brain`) -> [B, H, W, M], not clipped."""
    noise = coarse_noise(key, image.shape, noise_res=int(dcfg.noise_res),
                         std=float(dcfg.noise_std), roll=bool(dcfg.get("noise_roll", True)))
    if dcfg.noise_in_brain:
        noise = noise * (brain_mask[..., None] > 0)
    return image + noise


def loss_fn(model, batch, key, config):
    """L2 (or `dae.loss`) error of f(x + coarse noise) against x -> (loss, {}); dropout (if
    the UNet has any) is active."""
    dcfg = config.dae
    image = batch["image"]
    k_noise, k_dropout = jax.random.split(key)
    noisy = add_coarse_noise(image, batch["brain_mask"], k_noise, dcfg)
    reconstruction = model(noisy, None, deterministic=False, rngs=nnx.Rngs(dropout=k_dropout))
    mask = None
    if dcfg.loss_in_brain:
        mask = (batch["brain_mask"][..., None] > 0).astype(jnp.float32)
    return shared.reconstruction_loss(reconstruction, image, dcfg.loss, mask=mask), {}


def score_fn(models, batch, key, config):
    """-> residual_score of f(x), the clean image's reconstruction (no noise)."""
    image = batch["image"]
    return residual_score(image, models[STAGE](image, None))


METHOD = Method(
    name="dae",
    stages=(Stage(name=STAGE, make_model=make_denoiser, loss_fn=loss_fn),),
    score_fn=score_fn,
    network_evaluations=lambda config: {"unet": 1},
)
