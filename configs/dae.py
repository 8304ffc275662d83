"""Denoising autoencoder (DAE, Kascenas et al. 2022): a UNet without timestep trained to
remove coarse (low-resolution, upsampled) Gaussian noise; score |x - f(x)|.

Usage: --config=configs/dae.py:<size>[,modifier...]
  size      paper | cpu | tiny (see configs/common.py)
  modifiers flair    train and test on FLAIR instead of T2
            short    (all methods) the 300-step budget of the seed study
"""

from __future__ import annotations

import ml_collections

from configs import common

MODIFIERS = frozenset({"flair"})


def unet_config(size: str, channels: int) -> ml_collections.ConfigDict:
    """A plain UNet (no timestep, no condition) close to the authors' network."""
    m = ml_collections.ConfigDict()
    m.name = "unet"
    m.in_channels = channels
    m.out_channels = channels
    # Kascenas: UNet depth 4, wf 6 = widths 64, 128, 256, 512, two 3x3 convs with GroupNorm
    # per level. Here one ResBlock (two 3x3 convs, GroupNorm) per encoder level; with the
    # guided-diffusion middle block and two decoder blocks per level this has 37.6 M
    # parameters at these widths (theirs: about 7.7 M).
    m.base_channels = 64
    m.channel_mult = (1, 2, 4, 8)
    m.num_res_blocks = 1
    m.attention_resolutions = ()   # the authors' UNet has no attention
    m.use_middle_attention = False
    m.num_heads = 1
    m.num_head_channels = 64
    m.dropout = 0.0
    m.use_scale_shift_norm = True  # no embedding, so unused
    # Resampling layers between the levels: stride-2 conv down, nearest + conv up (the
    # authors: 2x2 average pooling, F.avg_pool2d in unet.py::UNet.forward_down, and
    # transposed convs).
    m.resblock_updown = False
    m.conv_resample = True
    m.use_timestep = False
    m.cond_dim = 0
    if size == "cpu":
        m.base_channels = 16       # 1.0 M parameters; cheap on 2 CPU cores
        m.channel_mult = (1, 2, 4, 4)
    elif size == "tiny":
        m.base_channels = 8
        m.channel_mult = (1, 2)
    return m


def dae_config(size: str) -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.noise_res = 16           # Kascenas: 16 x 16 noise grid for 128 px slices ...
    d.noise_std = 0.2          # ... with std 0.2, bilinearly upsampled
    d.noise_roll = True        # random circular shift of the noise (authors' code)
    d.noise_in_brain = True    # noise only inside the brain (authors: foreground x > 0.01)
    d.loss = "l2"              # Kascenas: squared error ...
    d.loss_in_brain = True     # ... inside the foreground, averaged over the whole image
    if size == "paper":
        d.noise_res = 12       # the same grid spacing (8 px) at 96 px (our scaling)
    elif size == "cpu":
        d.noise_res = 8        # 8 px spacing at 64 px
    elif size == "tiny":
        d.noise_res = 2
    return d


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size, modifiers = common.parse_variant(arg, "dae", MODIFIERS)
    config = common.base_config(size)
    config.method = "dae"
    if "flair" in modifiers:
        config.data.modalities = ("flair",)
    config.model = unet_config(size, len(config.data.modalities))
    config.dae = dae_config(size)
    t = config.train
    if size == "paper":
        t.batch_size = 16      # Kascenas: batch 16
        t.learning_rate = 1e-4  # Kascenas: Adam, lr 1e-4 (they add AMSGrad, weight decay 1e-5)
        t.num_steps = 67200    # Kascenas: 2100 epochs x 32 batches; their CosineAnnealingLR
        #                        (T_max 100 epochs) oscillates, we keep the rate constant
    elif size == "cpu":
        common.cpu_training(config)
    common.apply_common_modifiers(config, modifiers)
    return config
