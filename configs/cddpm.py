"""cDDPM: conditioned DDPM with a SparK pre-trained condition encoder (Behrendt et al.).

Usage: --config=configs/cddpm.py:<size>[,modifier...]
  size      paper | cpu | tiny (see configs/common.py)
  modifiers ens         t_test ensemble {250, 500, 750} (cDDPM-ENS; the paper's full model)
            nopretrain  no SparK stage: the encoder starts random (the "w/o SSL" rows)
            code        the authors' code instead of the paper for the condition width:
                        512 (paper 128)
            paperlr     the paper's learning rate 1e-5 (section 4.4) instead of the code's
                        1e-4, which DDPM and pDDPM use too
            short       the leaderboard budget, --budget=short (configs/common.py)
Both stages run from one config: `--mode=train` trains 'pretrain' then 'diffusion' (which
loads the first's checkpoint); `--stage=pretrain` / `--stage=diffusion` run them separately,
and `--config.stage_workdirs.pretrain=<run>` reuses the encoder pre-trained in another run.
"""

from __future__ import annotations

import ml_collections

from configs import common, ddpm
from configs import data as data_configs
from uadjax.models.resnet import resnet_encoder_config

MODIFIERS = {"ens", "nopretrain", "code", "paperlr"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size, modifiers = common.parse_variant(arg, "cddpm", MODIFIERS)
    # The DDPM config (same UNet, noise, schedule, single-step protocol and CPU recipe).
    config = ddpm.get_config(",".join([size] + sorted(modifiers & {"ens"})))
    config.method = "cddpm"
    channels = len(config.data.modalities)

    # The cDDPM repository's intensity augmentation for the denoiser (get_augment); the
    # SparK pre-training runs without it (below).
    config.data.augment = data_configs.augment_preset(
        "cddpm", (config.data.target_spacing or (None,))[0])
    config.model.cond_dim = 128        # paper section 4.4: d = 128 (code: 512, `code` modifier)
    if "code" in modifiers:
        config.model.cond_dim = 4 * config.model.base_channels  # DDPM_2D: unet_dim * 4 = 512
    if size == "paper":
        config.train.num_steps = 14400     # code: 1200 epochs x 12 batches (paper: up to 1600)
        # The released code trains every model with Adam(lr=cfg.lr) (src/models/DDPM_2D.py,
        # configure_optimizers), lr 1e-4 (configs/datamodule/IXI.yaml): the value DDPM and
        # pDDPM use here (configs/common.py), so the three compare at one rate. The paper
        # (section 4.4) says 1e-5: the `paperlr` modifier.
        config.train.learning_rate = 1e-5 if "paperlr" in modifiers else 1e-4

    # Condition encoder: ResNet-50 (timm resnet50, in_chans=1) in the paper.
    config.encoder = resnet_encoder_config(size)
    config.encoder.in_channels = channels

    config.cddpm = ml_collections.ConfigDict()
    c = config.cddpm
    c.pretrain = "nopretrain" not in modifiers
    c.mask_ratio = 0.65                # SparK mask ratio (paper 3.3, code)
    c.decoder_width = 512              # SparK LightDecoder dec_dim

    # SparK pre-training: AdamW(1e-4, wd 0.05, betas (0.9, 0.95)), 1200 epochs, batch 32.
    config.stage_train = ml_collections.ConfigDict()
    config.stage_train.pretrain = ml_collections.ConfigDict({
        "optimizer": "adamw", "learning_rate": 1e-4, "weight_decay": 0.05, "b1": 0.9,
        "b2": 0.95, "num_steps": 14400, "ema_decay": 0.0, "warmup_steps": 0,
        "lr_schedule": "constant", "augment": False})

    # Run folder of a stage trained elsewhere and reused here ('' = train it in this run).
    config.stage_workdirs = ml_collections.ConfigDict({"pretrain": ""})

    if size == "cpu":
        # The DDPM CPU recipe (lr 1e-3, cosine, EMA) for the denoiser; the small encoder and
        # decoder (16 px mask units on 64 px slices: 16 units, 6 visible) pre-train as long.
        common.cpu_training(config)
        c.decoder_width = 64
        if "code" not in modifiers:
            config.model.cond_dim = 64
        config.stage_train.pretrain.update({"num_steps": config.train.num_steps,
                                            "learning_rate": 1e-3, "warmup_steps": 50,
                                            "lr_schedule": "cosine"})
    elif size == "tiny":
        c.decoder_width = 16
        config.model.cond_dim = 16
        config.stage_train.pretrain.num_steps = config.train.num_steps
    common.apply_common_modifiers(config, modifiers)
    return config
