"""Autoencoder reconstruction baseline (AE), in the style of Baur et al. (2021).

Training: a convolutional autoencoder (`conv_autoencoder`, dense or spatial bottleneck)
reconstructs healthy slices x [B, H, W, M] in [0, 1]; the loss is the L1 or L2 error
(`config.autoencoder.loss`) averaged over every pixel and channel of the whole image.
Score: |x - f(x)| averaged over channels.

The network builder, the loss and the score are in `shared.py`, with the VAE (`vae.py`)
and the denoising autoencoder (`dae.py`).
"""

from __future__ import annotations

from flax import nnx

from uadjax.methods import shared
from uadjax.methods.base import Method, Stage


def make_ae(config, rngs: nnx.Rngs) -> nnx.Module:
    return shared.make_autoencoder(config, rngs, variational=False)


def loss_fn(model, batch, key, config):
    """Reconstruction loss of healthy slices -> (loss, {}); `key` is unused."""
    reconstruction = model(batch["image"])["reconstruction"]
    return shared.reconstruction_loss(reconstruction, batch["image"],
                                      config.autoencoder.loss), {}


METHOD = Method(
    name="ae",
    stages=(Stage(name=shared.AE_STAGE, make_model=make_ae, loss_fn=loss_fn),),
    score_fn=shared.autoencoder_score,
    network_evaluations=lambda config: {"autoencoder": 1},
)
