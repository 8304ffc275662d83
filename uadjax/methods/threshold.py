"""The intensity-threshold baseline ("Thresh" in the cDDPM paper): the score is the
normalised intensity itself. No training. On hyperintense FLAIR lesions it is strong, so
every table shows it beside the learned methods."""

from __future__ import annotations

from uadjax.methods.base import Method


def intensity_score(image, channels=None):
    """image [..., M] (NumPy or JAX) -> [...] the mean intensity over `channels` (all when
    None): the score of this method, and of the baseline an evaluation scores beside a
    method (`uadjax.evaluation`)."""
    if channels is not None:
        image = image[..., list(channels)]
    return image.mean(axis=-1)


def score_fn(models, batch, key, config):
    """-> {'score': [B, H, W]} = mean intensity over the chosen channels (all by default)."""
    return {"score": intensity_score(batch["image"], config.get("threshold_channels", None))}


METHOD = Method(name="threshold", stages=(), score_fn=score_fn,
                network_evaluations=lambda config: {})
