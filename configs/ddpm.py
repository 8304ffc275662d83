"""DDPM reconstruction (Behrendt et al. protocol), simplex or Gaussian noise, AnoDDPM option.

Usage: --config=configs/ddpm.py:<size>[,modifier...]
  size      paper | cpu | tiny (see configs/common.py)
  modifiers ens       t_test ensemble {250, 500, 750} (DDPM-ENS)
            gaussian  Gaussian instead of simplex noise (the plain DDPM row)
            anoddpm   AnoDDPM: linear schedule, eps prediction, L2, partial diffusion from 250
            flair     train and test on FLAIR instead of T2
"""

from __future__ import annotations

import ml_collections

from configs import common


def unet_config(size: str, channels: int) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.name = "unet"
    m.in_channels = channels
    m.out_channels = channels
    m.base_channels = 128          # Behrendt: model_channels 128
    m.channel_mult = (1, 2, 2)
    m.num_res_blocks = 3
    m.attention_resolutions = ()   # the authors' code inserts attention only in the middle
    m.use_middle_attention = True
    m.num_heads = 1
    m.num_head_channels = 64
    m.dropout = 0.0
    m.use_scale_shift_norm = True
    m.resblock_updown = True
    m.use_timestep = True
    m.cond_dim = 0
    common.small_unet(m, size)
    return m


def diffusion_config(size: str) -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.schedule = "cosine"          # Behrendt: cosine, T = 1000
    d.num_timesteps = 1000
    d.prediction = "x0"            # 'x0' | 'eps' | 'v'
    d.loss = "l1"                  # 'l1' | 'l2'
    d.loss_in_brain = False
    d.noise = "simplex"            # 'simplex' | 'gaussian'
    d.simplex_octaves = 6
    d.simplex_persistence = 0.8
    d.simplex_frequency = 64.0
    d.simplex_shared = True        # one noise map shared by the whole batch (authors' code)
    d.train_t_range = (0, None)    # t ~ U{lo, hi}; None = T - 1
    d.score_mode = "single_step"   # 'single_step' | 'partial'
    d.test_timesteps = (499,)      # 0-based; Behrendt t_test = 500 (index 499 in their code)
    d.sweep_chunk = None           # variants evaluated at once; None = all
    d.partial_t_start = 249        # 0-based; AnoDDPM lambda = 250
    d.partial_sampler = "ddpm"
    d.partial_num_steps = None     # None = every step from t_start to 0
    d.residual = "l1"              # |x - rec| ('l2': squared)
    return d


MODIFIERS = frozenset({"ens", "gaussian", "anoddpm", "flair"})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size, modifiers = common.parse_variant(arg, "ddpm", MODIFIERS)
    config = common.base_config(size)
    config.method = "ddpm"
    if "flair" in modifiers:
        config.data.modalities = ("flair",)
    channels = len(config.data.modalities)
    config.model = unet_config(size, channels)
    config.diffusion = diffusion_config(size)
    d = config.diffusion
    if size == "cpu":
        # Sized for the main job (about 11 minutes of training on 2 cores). With so few steps
        # the network learns coarse anatomy only, so training is concentrated on the noise
        # levels where the score is read, and the score is read at a high t (749), where a
        # coarse reconstruction removes more of the lesion (probed: t = 249 / 499 / 749 gave
        # tumour Dice 0.11 / 0.14 / 0.18 after 500 steps).
        common.cpu_training(config)
        d.train_t_range = (200, 900)
        d.test_timesteps = (749,)
    # Modifiers come after the size, so they win over its defaults.
    if "ens" in modifiers:
        d.test_timesteps = (249, 499, 749)
    if "gaussian" in modifiers:
        d.noise = "gaussian"
    if "anoddpm" in modifiers:
        d.schedule = "linear"
        d.prediction = "eps"
        d.loss = "l2"
        d.train_t_range = (0, 799)
        d.score_mode = "partial"
        d.residual = "l2"
    common.apply_common_modifiers(config, modifiers)
    return config
