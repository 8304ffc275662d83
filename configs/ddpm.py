"""DDPM reconstruction (Behrendt et al. protocol), simplex or Gaussian noise, AnoDDPM option.

Usage: --config=configs/ddpm.py:<size>[,modifier...]
  size      paper | cpu | tiny (see configs/common.py)
  modifiers ens       t_test ensemble {250, 500, 750} (DDPM-ENS)
            gaussian  Gaussian instead of simplex noise (the plain DDPM row)
            anoddpm   AnoDDPM: linear schedule, eps prediction, L2, 3D simplex noise at z = t,
                      partial diffusion from 250 with the fixed-large variance
            anoddpm_net  (paper size, with anoddpm) AnoDDPM's network and recipe: 6-level
                      UNet, AdamW, gradient clipping at 1, EMA 0.9999
            flair     train and test on FLAIR instead of T2
"""

from __future__ import annotations

import ml_collections

from configs import common
from configs import data as data_configs


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
    d.noise = "simplex"            # 'simplex' (2D, Behrendt) | 'simplex_3d' | 'gaussian'
    d.simplex_octaves = 6
    d.simplex_persistence = 0.8
    d.simplex_frequency = 64.0
    d.simplex_shared = True        # one noise map shared by the whole batch (authors' code)
    d.train_t_range = (0, None)    # t ~ U{lo, hi}; None = T - 1
    d.score_mode = "single_step"   # 'single_step' | 'partial'
    d.test_timesteps = (499,)      # 0-based; Behrendt t_test = 500 (index 499 in their code)
    d.sweep_chunk = None           # variants evaluated at once; None = all
    d.partial_t_start = 249        # 0-based; AnoDDPM lambda = 250 (paper, detection.py::roc_data;
                                   # its anomalous_metric_calculation uses 200)
    d.partial_sampler = "ddpm"
    d.partial_num_steps = None     # None = every step from t_start to 0
    d.partial_variance = "fixed_small"  # reverse variance: posterior ('fixed_small') or beta_t
    d.residual = "l1"              # |x - rec| ('l2': squared)
    return d


MODIFIERS = frozenset({"ens", "gaussian", "anoddpm", "anoddpm_net", "flair"})


def anoddpm_network_and_recipe(config: ml_collections.ConfigDict) -> None:
    """AnoDDPM's UNet and optimiser (Julian-Wyatt/AnoDDPM, test_args/args28.json, the paper's
    simplex model, and diffusion_training.py). Departures: their 256 px slices at batch 1 for
    3,000 x 100 steps become our 96 px paper slices at the paper batch and steps; our EMA
    warms up (min(decay, (1 + step) / (10 + step))), theirs starts at 0.9999."""
    m = config.model
    m.base_channels = 128
    m.channel_mult = (1, 1, 2, 2, 4, 4)  # UNet.py for 256 px: 6 levels
    m.num_res_blocks = 2
    m.resblock_updown = True             # BigGAN ResBlock down/up-sampling
    # diffusion_training.py never passes args28's "16,8" to the UNet, so its default
    # "32,16,8" applies: attention at downsample factors 8, 16 and 32.
    m.attention_resolutions = (8, 16, 32)
    m.use_middle_attention = True
    m.num_heads = 2
    m.num_head_channels = -1             # heads by count (n_head_channels -1)
    m.dropout = 0.0
    t = config.train
    t.optimizer = "adamw"                # optim.AdamW(lr=1e-4, weight_decay=0.0)
    t.learning_rate = 1e-4
    t.weight_decay = 0.0
    t.b1, t.b2 = 0.9, 0.999
    t.grad_clip = 1.0                    # clip_grad_norm_(model.parameters(), 1)
    t.ema_decay = 0.9999                 # EMA of the parameters, every step


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size, modifiers = common.parse_variant(arg, "ddpm", MODIFIERS)
    config = common.base_config(size)
    config.method = "ddpm"
    if "flair" in modifiers:
        config.data.modalities = ("flair",)
    channels = len(config.data.modalities)
    config.model = unet_config(size, channels)
    config.diffusion = diffusion_config(size)
    # Behrendt's pDDPM repository (which holds the DDPM baseline) augments nothing.
    config.data.augment = data_configs.augment_preset("none", None)
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
        # Julian-Wyatt/AnoDDPM, GaussianDiffusion.py: linear betas, eps prediction, L2, the
        # z = t slice of 3D simplex noise for training and for every sampling step
        # (generate_simplex_noise -> simplex.py::rand_3d_fixed_T_octaves), and the reverse
        # variance append(posterior_variance[1], betas[1:]): beta_t for t >= 1 (at t = 0 no
        # noise is added, so the first entry never matters): our 'fixed_large'.
        d.schedule = "linear"
        d.prediction = "eps"
        d.loss = "l2"
        if "gaussian" not in modifiers:
            d.noise = "simplex_3d"
        d.train_t_range = (0, 799)
        d.score_mode = "partial"
        d.partial_variance = "fixed_large"
        d.residual = "l2"
    if "anoddpm_net" in modifiers:
        if size != "paper" or "anoddpm" not in modifiers:
            raise ValueError("anoddpm_net is AnoDDPM's paper-size network and recipe: use it "
                             "as ddpm.py:paper,anoddpm,anoddpm_net")
        anoddpm_network_and_recipe(config)
    common.apply_common_modifiers(config, modifiers)
    return config
