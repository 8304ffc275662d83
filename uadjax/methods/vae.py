"""Variational autoencoder reconstruction baseline (VAE), in the style of Baur et al. (2021).

Training: the AE's network with `variational=True` encodes N(mu, diag(sigma^2)), decodes a
reparameterised sample, and minimises

    loss = recon + kl_weight * KL,
    recon = mean over pixels and channels of the L1 / L2 error (as the AE,
            `shared.reconstruction_loss`),
    KL    = mean over the batch of KL(N(mu, sigma^2) || N(0, I)) summed over latent dims.

Sum/mean convention: the KL is the divergence of each slice's whole latent (summed over its
dimensions, in nats) and is averaged over the batch like the reconstruction term, which is
a per-element mean so that the AE and VAE share losses and learning rates. `kl_weight` is
therefore beta divided by the number of image elements: for the L2 loss,
`kl_weight = 2 sigma^2 / (H W M)` is the ELBO (beta = 1) of a Gaussian likelihood with
standard deviation sigma; for L1, `b / (H W M)` that of a Laplace likelihood of scale b.
Score: as the AE, |x - f(x)| averaged over channels, where f decodes the posterior mean
(no sampling: the score is deterministic).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from uadjax.methods import shared
from uadjax.methods.base import Method, Stage


def make_vae(config, rngs: nnx.Rngs) -> nnx.Module:
    return shared.make_autoencoder(config, rngs, variational=True)


def gaussian_kl(mu: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mu, exp(logvar)) || N(0, 1)) summed over all but the leading axis.

    Args:
      mu, logvar: [B, ...] posterior mean and log-variance.

    Returns:
      [B] float32, `0.5 * sum(mu^2 + exp(logvar) - 1 - logvar)` per row.
    """
    mu = mu.astype(jnp.float32)
    logvar = logvar.astype(jnp.float32)
    per_dim = 0.5 * (jnp.square(mu) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(per_dim.reshape(per_dim.shape[0], -1), axis=-1)


def kl_weight_of(config) -> float:
    """`config.autoencoder.kl_weight` as a float; ValueError if negative."""
    weight = float(config.autoencoder.kl_weight)
    if weight < 0:
        raise ValueError(f"config.autoencoder.kl_weight must be >= 0, got {weight}")
    return weight


def loss_fn(model, batch, key, config):
    """ELBO-style loss of healthy slices -> (loss, {'recon', 'kl'}) (see the module doc)."""
    image = batch["image"]
    out = model(image, key=key)
    recon = shared.reconstruction_loss(out["reconstruction"], image, config.autoencoder.loss)
    kl = jnp.mean(gaussian_kl(out["mu"], out["logvar"]))
    return recon + kl_weight_of(config) * kl, {"recon": recon, "kl": kl}


METHOD = Method(
    name="vae",
    stages=(Stage(name=shared.AE_STAGE, make_model=make_vae, loss_fn=loss_fn),),
    score_fn=shared.autoencoder_score,
    network_evaluations=lambda config: {"autoencoder": 1},
)
