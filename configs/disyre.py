"""DISYRE: synthetic-anomaly restoration (Naval Marimont et al., ISBI 2024 / MICCAI 2024).

Usage: --config=configs/disyre.py:<size>[,modifier...]
  size      paper | cpu | tiny (see configs/common.py)
  modifiers t1         train and test on T1 (default T2; the authors train one model per
                       modality on CamCAN)
            dag        the authors' "dag" configuration: intensity-bias corruption on top of
                       the foreign patch, foreign patch min-max matched to the target
            multistep  score with the multi-step restoration (v1 Algorithm 1) instead of the
                       ensemble of single-step restorations
            notebook   test labels t = 99, 74, 49, 24 (the authors' notebook spacing)
                       instead of the strong-anomaly labels 0, 3, 13, 24 (issue 22, D3)
            1mm        the authors' pixel sizes: slices at 1 mm (192 x 192), 128 px patches,
                       64 px anomaly box, shapes 10..44 px, blur sigma up to 5 px, window step 32
            short      (common) the 300-step budget of the seed study
e.g. `python -m uadjax.main run --config=configs/disyre.py:cpu --workdir=runs/disyre_cpu`.

Authors' values (experiments/002D/*.json, trainer_disyre.py; docs/methods.md, DISYRE: the
authors' values) are given at 1 mm. At 2 mm (`paper`, the resolution all methods of this
project share) every length is halved, so the patch still covers the authors' 128 mm; at 3 mm
(`cpu`) lengths are a third, rounded to sizes the UNet can halve.
"""

from __future__ import annotations

import ml_collections

from configs import common
from configs import data as data_configs

MODIFIERS = frozenset({"t1", "dag", "multistep", "1mm", "notebook"})


def unet_config(size: str, channels: int) -> ml_collections.ConfigDict:
    """The authors' diffusers UNet2DModel: block_out_channels (32, 64, 96, 128, 256, 256),
    2 layers per block, attention in the 5th down block (1/16 resolution) and its mirror,
    attention head dim 8, additive time embedding, conv down / nearest+conv up."""
    m = ml_collections.ConfigDict()
    m.name = "unet"
    m.in_channels = channels
    m.out_channels = channels
    m.base_channels = 32
    m.channel_mult = (1, 2, 3, 4, 8, 8)
    m.num_res_blocks = 2
    m.attention_resolutions = (16,)
    m.use_middle_attention = True     # diffusers' mid block has attention
    m.num_heads = 1
    m.num_head_channels = 8           # diffusers attention_head_dim 8
    m.dropout = 0.0
    m.use_scale_shift_norm = False    # diffusers resnet_time_scale_shift='default'
    m.resblock_updown = False
    m.conv_resample = True
    m.use_timestep = True
    m.cond_dim = 0
    if size in common.SMALL_UNETS:
        # The DDPM cpu / tiny UNet without resblock up/down or attention: 48 px patches.
        common.small_unet(m, size)
        m.attention_resolutions = ()
    return m


def disyre_config(size: str) -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    # Severity labels: DDPM schedule, T = 100, linear beta 1e-3 .. 0.2 (diffusion/scheduler.py).
    d.num_timesteps = 100
    d.beta_start = 1e-3
    d.beta_end = 0.2
    # Lengths in pixels at 2 mm (authors' 1 mm values halved).
    d.patch_size = 64                  # authors: 128 px training patches
    d.anomaly_box = 32                 # authors: 64 px box centred on a brain pixel
    d.shape_size = (5.0, 22.0)         # authors: side / diameter U{10..44} px
    d.shapes = ("square", "disc", "blob")  # authors: square, sphere, random shape, p = 1/3
    d.rotation_deg = 15.0              # authors: +-15 deg (squares with p = 0.5)
    d.square_rotation_p = 0.5
    d.blur_sigma_max = 2.5             # authors: sigma U(0, 5) px ...
    d.blur_p = 0.7                     # ... with p_per_channel 0.7
    d.p_anomaly = 1.0                  # authors: every training patch is corrupted
    d.normalize_fp = "none"            # 'none' (fpi) | 'minmax' (dag)
    d.intensity_bias = False           # dag: intensity bias on top of the foreign patch
    d.bias_codebook = (0.00565, 0.38284, 0.61224, 0.76921, 0.93855)
    # Authors at 1 mm: n_k / (sum n + 1e3), sic; a pixel count, so it scales with the pixel
    # area (1e3 / 4 at 2 mm); the class-mask blur of 1 px scales with the pixel side.
    d.bias_count_offset = 1e3 / 4
    d.bias_blur_sigma = 0.5
    # Irregular shapes: share of the box they fill (authors' shipped shapes, zoomed by 1/s,
    # s in [0.5, 1], and cut to the box: 24-100 %, mean 74 %; issue 22).
    d.blob_fill = (0.24, 1.0)
    d.blob_fill_mean = 0.74
    # Score.
    d.score_mode = "single_step"       # 'single_step' (authors' evaluations) | 'multi_step'
    # Test labels: the severities alpha = sqrt(alpha_bar_t) 1.0, 0.99, 0.90, 0.73 (t = 0, 3,
    # 13, 24), the strong-anomaly end of the training mapping (`severity_to_t`, as the
    # authors' map_alpha_to_timestep) and of the paper's Table 1, where single-step AP peaks.
    # The authors' notebook spacing, N = 4 -> t = 99, 74, 49, 24 (alpha 0.005 .. 0.73: faint
    # anomalies, so it restores little), is the `notebook` modifier (test_timesteps = None).
    # docs/findings.md, D3: at 3,000 steps they remove as much of a synthetic anomaly as the
    # oracle label does (0.311 against 0.317 of the inserted change).
    d.num_test_timesteps = 4           # notebook spacing, used when test_timesteps is None
    d.test_timesteps = ml_collections.config_dict.placeholder(tuple)
    d.test_timesteps = (0, 3, 13, 24)
    d.foreground_weighting = True      # "DISYRE f.w."
    d.foreground = "brain_mask"        # authors: x > 0 ('nonzero'); the mask is robust to
    #                                    dark tissue normalised to 0
    d.window_step = 16                 # authors: overlap 0.25 used as step = 0.25 P (32 px at 1 mm)
    d.window_sigma_scale = 0.125       # Gaussian blending, sigma = 0.125 P
    d.window_chunk = None              # windows scored at once (None: all)
    if size == "cpu":
        # 3 mm: the authors' lengths / 3 (patch 128 -> 43, rounded up to 48 for the UNet).
        d.patch_size = 48
        d.anomaly_box = 24
        d.shape_size = (3.0, 15.0)
        d.blur_sigma_max = 5.0 / 3.0
        d.bias_count_offset = 1e3 / 9
        d.bias_blur_sigma = 1.0 / 3.0
        d.window_step = 16             # step P / 3 (authors P / 4): 4 windows per 64 px slice
    elif size == "tiny":
        d.patch_size = 8
        d.anomaly_box = 6
        d.shape_size = (2.0, 5.0)
        d.blur_sigma_max = 1.0
        d.bias_count_offset = 1e3 / 9
        d.bias_blur_sigma = 1.0 / 3.0
        d.window_step = 4
    return d


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size, modifiers = common.parse_variant(arg, "disyre", MODIFIERS)
    config = common.base_config(size)
    config.method = "disyre"
    if size == "paper":
        # 96 x 96 at 2 mm with the authors' quantile scaling (q0 .. q0.98 over all voxels).
        paths = {k: config.data[k] for k in ("dataset_dir", "data_dir", "phantom_dir",
                                             "phantom_variant", "phantom_seed")}
        config.data = data_configs.get_config("disyre")
        config.data.update(paths)
    if "t1" in modifiers:
        config.data.modalities = ("t1",)
    config.disyre = disyre_config(size)
    d = config.disyre
    if "1mm" in modifiers:
        upd = data_configs.get_config("disyre_upd")  # the UPD study's 1 mm protocol
        config.data.target_spacing = upd.target_spacing
        config.data.image_size = upd.image_size
        d.patch_size, d.anomaly_box, d.shape_size = 128, 64, (10.0, 44.0)
        d.blur_sigma_max, d.window_step = 5.0, 32
        d.bias_count_offset, d.bias_blur_sigma = 1e3, 1.0
    if "dag" in modifiers:
        d.intensity_bias = True
        d.normalize_fp = "minmax"
    if "multistep" in modifiers:
        d.score_mode = "multi_step"
    if "notebook" in modifiers:
        d.test_timesteps = None
    config.model = unet_config(size, len(config.data.modalities))
    t = config.train
    if size == "paper":
        t.batch_size = 96              # authors: 8 volumes x 12 slices
        t.num_steps = 100_000
        t.optimizer = "adamw"
        t.learning_rate = 1e-4
        t.b1, t.b2 = 0.95, 0.999
        t.weight_decay = 1e-6
        t.lr_schedule = "cosine"
        t.warmup_steps = 500
        t.grad_clip = 1.0
        t.ema_decay = 0.0              # authors: EMA off
        t.checkpoint_every_steps = 5000
        t.val_every_steps = 5000
        # The paper configs test the lowest-validation-loss step (common.base_config). For
        # DISYRE that loss (restoring synthetic anomalies of healthy slices) is a poor guide:
        # on the phantom it rose from 0.0054 to 0.0115 between 1,000 and 3,000 steps while
        # real-lesion detection improved (docs/findings.md); --config.train.select_checkpoint
        # =latest tests the last step.
    elif size == "cpu":
        common.cpu_training(config)
        t.grad_clip = 1.0
    common.apply_common_modifiers(config, modifiers)
    return config
