"""The intensity-threshold baseline ("Thresh" in the cDDPM paper): the score is the
normalised intensity itself. No training. On hyperintense FLAIR lesions it is strong, so
every table shows it beside the learned methods."""

from __future__ import annotations

import jax.numpy as jnp

from uadjax.methods.base import Method


def score_fn(models, batch, key, config):
    """-> {'score': [B, H, W]} = mean intensity over the chosen channels (all by default)."""
    image = batch["image"]
    channels = config.get("threshold_channels", None)
    if channels is not None:
        image = image[..., jnp.asarray(channels)]
    return {"score": jnp.mean(image, axis=-1)}


METHOD = Method(name="threshold", stages=(), score_fn=score_fn,
                network_evaluations=lambda config: {})
