"""Autoencoder (AE) baseline: a convolutional AE with a dense bottleneck (Baur et al. 2021
comparative-study style), L1 reconstruction loss, score |x - f(x)|.

Usage: --config=configs/ae.py:<size>[,modifier...]
  size      paper | cpu | tiny (see configs/common.py)
  modifiers spatial  a spatial bottleneck (1x1 convs) instead of the dense one
            l2       L2 instead of L1 reconstruction loss
            flair    train and test on FLAIR instead of T2
            short    (all methods) the 300-step budget of the seed study
"""

from __future__ import annotations

import ml_collections

from configs import common

MODIFIERS = frozenset({"spatial", "l2", "flair"})


def autoencoder_model_config(size: str, channels: int, *,
                             variational: bool) -> ml_collections.ConfigDict:
    """The `conv_autoencoder` fields; its input size is taken from `config.data.image_size`."""
    m = ml_collections.ConfigDict()
    m.name = "conv_autoencoder"
    m.in_channels = channels
    m.out_channels = channels
    m.channels = (32, 64, 128, 256)  # 4 stride-2 levels: 96 px -> 6 x 6 (our choice)
    m.convs_per_level = 2             # one extra 3x3 conv per level (our choice)
    m.latent = "dense"                # Baur et al.: dense bottleneck ('spatial' = 1x1 convs)
    m.latent_dim = 128                # our choice
    m.variational = variational
    m.downsample = "conv"             # stride-2 3x3 convs ('avgpool': conv + 2x2 pooling)
    m.activation = "silu"             # our choice ('leaky_relu' also available)
    if size == "cpu":
        # 64 px -> 4 x 4 x 128 -> 128; cheap on 2 CPU cores.
        m.channels = (16, 32, 64, 128)
        m.convs_per_level = 1
    elif size == "tiny":
        m.channels = (8, 16)          # 16 px -> 4 x 4 x 16
        m.convs_per_level = 1
        m.latent_dim = 16
    return m


def get_base_config(arg: str | None, *, method: str, variational: bool,
                    extra_modifiers: frozenset = frozenset()):
    """The AE / VAE config shared by configs/ae.py and configs/vae.py.

    Returns (config, size, modifiers left for the caller); the caller applies
    `common.apply_common_modifiers` last.
    """
    size, modifiers = common.parse_variant(arg, method, MODIFIERS | extra_modifiers)
    config = common.base_config(size)
    config.method = method
    if "flair" in modifiers:
        config.data.modalities = ("flair",)
    config.model = autoencoder_model_config(size, len(config.data.modalities),
                                            variational=variational)
    config.autoencoder = ml_collections.ConfigDict()
    config.autoencoder.loss = "l1"    # 'l1' | 'l2' (our choice; the score is the L1 residual)
    if size == "cpu":
        common.cpu_training(config)
    if "spatial" in modifiers:
        config.model.latent = "spatial"
        config.model.latent_dim = 16 if size == "tiny" else 32  # channels at h x w (our choice)
    if "l2" in modifiers:
        config.autoencoder.loss = "l2"
    return config, size, modifiers


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config, _, modifiers = get_base_config(arg, method="ae", variational=False)
    # Training: the base protocol (Adam, lr 1e-4, batch 32, 19200 steps; as the DDPM).
    common.apply_common_modifiers(config, modifiers)
    return config
