"""Likelihood terms of the reverse process (the variational bound's KL terms)."""

from __future__ import annotations

import jax.numpy as jnp

from uadjax.diffusion.forward import q_posterior, q_sample, to_x0
from uadjax.diffusion.samplers import clip_x0_fn


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) element-wise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def kl_terms(model_fn, schedule, *, z0, t, noise, prediction_type="eps", clip_x0=None):
    """Per-element KL(q(z_{t-1} | z_t, z0) || p(z_{t-1} | z_t)) at one timestep.

    Args:
      model_fn: (z_t [B, h, w, D], t [B]) -> the network's prediction.
      schedule: the diffusion schedule.
      z0: [B, h, w, D] clean latents.
      t: [B] int timesteps, t >= 1 (at t = 0 the ELBO term is the decoder likelihood).
      noise: [B, h, w, D] the forward noise giving z_t.
      prediction_type: 'eps', 'x0' or 'v'.
      clip_x0: optional clip of the model's x0 estimate.

    Returns:
      [B, h, w, D] KL in nats. p has the fixed-small (posterior) variance, as q.
    """
    z_t = q_sample(schedule, x0=z0, t=t, noise=noise)
    pred = model_fn(z_t, t)
    x0_hat = clip_x0_fn(
        to_x0(schedule, prediction=pred, x_t=z_t, t=t,
                        prediction_type=prediction_type), clip_x0)
    mean_q, _, logvar = q_posterior(schedule, x0=z0, x_t=z_t, t=t)
    mean_p, _, _ = q_posterior(schedule, x0=x0_hat, x_t=z_t, t=t)
    return normal_kl(mean_q, logvar, mean_p, logvar)
