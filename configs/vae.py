"""Variational autoencoder (VAE) baseline: the AE of configs/ae.py with a Gaussian latent,
loss = recon + kl_weight * KL, score |x - f(x)| decoding the posterior mean.

Usage: --config=configs/vae.py:<size>[,modifier...]
  size      paper | cpu | tiny (see configs/common.py)
  modifiers spatial  a spatial bottleneck (1x1 convs) instead of the dense one
            l2       L2 instead of L1 reconstruction loss
            flair    train and test on FLAIR instead of T2
            short    (all methods) the 300-step budget of the seed study
"""

from __future__ import annotations

import ml_collections

from configs import ae as ae_configs
from configs import common

# Our choice of kl_weight: the reconstruction term is a per-element mean and the KL a sum
# over latent dimensions (uadjax/methods/vae.py), so kl_weight = b / (H * W * M) is the
# ELBO (beta = 1) of a Laplace likelihood of scale b for the L1 loss (of a Gaussian with
# 2 sigma^2 = b for L2). b = 0.1 is a mild KL: on the cpu phantom at lr 1e-3 the L1 term is
# about 0.055 after 300 steps and the KL about 100 nats, so the weighted KL is about 4% of
# the loss (and the reconstruction error is that of the plain AE).
LIKELIHOOD_SCALE = 0.1


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config, _, modifiers = ae_configs.get_base_config(arg, method="vae", variational=True)
    height, width = config.data.image_size
    elements = height * width * len(config.data.modalities)
    config.autoencoder.kl_weight = LIKELIHOOD_SCALE / elements  # 1.1e-5 at 96 x 96 x 1
    common.apply_common_modifiers(config, modifiers)
    return config
