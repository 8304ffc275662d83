"""Autoencoder reconstruction baseline (AE), in the style of Baur et al. (2021).

Training: a convolutional autoencoder (`conv_autoencoder`, dense or spatial bottleneck)
reconstructs healthy slices x [B, H, W, M] in [0, 1]; the loss is the L1 or L2 error
(`config.autoencoder.loss`) averaged over every pixel and channel of the whole image.
Score: |x - f(x)| averaged over channels.

The helpers below (`make_autoencoder`, `reconstruction_loss`) are shared
by the VAE (`vae.py`) and the denoising autoencoder (`dae.py`).
"""

from __future__ import annotations

import jax
from flax import nnx

from uadjax import diffusion
from uadjax.methods.base import Method, Stage, residual_score
from uadjax.models import make_model

STAGE = "autoencoder"
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


def make_ae(config, rngs: nnx.Rngs) -> nnx.Module:
    return make_autoencoder(config, rngs, variational=False)


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


def loss_fn(model, batch, key, config):
    """Reconstruction loss of healthy slices -> (loss, {}); `key` is unused."""
    reconstruction = model(batch["image"])["reconstruction"]
    return reconstruction_loss(reconstruction, batch["image"], config.autoencoder.loss), {}


def score_fn(models, batch, key, config):
    """-> residual_score of the deterministic reconstruction f(x) (the VAE decodes its mean)."""
    image = batch["image"]
    return residual_score(image, models[STAGE](image)["reconstruction"])


METHOD = Method(
    name="ae",
    stages=(Stage(name=STAGE, make_model=make_ae, loss_fn=loss_fn),),
    score_fn=score_fn,
    network_evaluations=lambda config: {"autoencoder": 1},
)
