"""pDDPM: patched DDPM (Behrendt et al., MIDL 2023), simplex noise, x0 objective, L1 loss.

Usage: --config=configs/pddpm.py:<size>[,modifier...]
  size      paper | cpu | tiny (see configs/common.py)
  modifiers ens      t_test ensemble {250, 500, 750} (pDDPM-ENS of the cDDPM paper)
            overlap  stride = size / 2: overlapping patches averaged where they meet, and
                     training boxes at uniformly random positions
            short    (common) the short training budget of the seed study
e.g. `python -m uadjax.main run --config=configs/pddpm.py:cpu,ens --workdir=runs/pddpm_cpu_ens`.

The UNet, schedule, noise and training recipe are those of configs/ddpm.py.
"""

from __future__ import annotations

import ml_collections

from configs import common
from configs import data as data_configs
from configs.ddpm import diffusion_config, unet_config

# Patch side per size: half the image, a 2x2 grid. Authors: patch_size 48 on 96x96
# (configs/experiment/MIDL23_DDPM/DDPM_patched.yaml); cpu 64 px -> 32; tiny 16 px -> 8.
PATCH_SIZE = {"paper": 48, "cpu": 32, "tiny": 8}


def patch_config(size: str) -> ml_collections.ConfigDict:
    p = ml_collections.ConfigDict()
    p.size = PATCH_SIZE[size]
    p.stride = p.size              # authors: stride = patch size, overlap False -> 2x2 grid
    p.train_positions = "grid"     # 'grid' (authors' grid_boxes: True) | 'random'
    p.loss_reduction = "image"     # 'image' (authors: inpaint + F.l1_loss) | 'patch'
    return p


MODIFIERS = frozenset({"ens", "overlap"})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size, modifiers = common.parse_variant(arg, "pddpm", MODIFIERS)
    config = common.base_config(size)
    config.method = "pddpm"
    channels = len(config.data.modalities)
    # Authors: attention_resolutions (6, 12, 24) instead of DDPM's (3, 6, 12), but both only
    # reach the middle block; use_checkpoint (gradient checkpointing) changes no result.
    config.model = unet_config(size, channels)
    # Paper: cosine T = 1000, x0, L1, simplex, t ~ U{0..999}, t_test 500 (index 499); training
    # as DDPM (lr 1e-4, batch 32, 19200 steps = 1600 epochs) from common.base_config.
    config.diffusion = diffusion_config(size)
    config.patch = patch_config(size)
    # The pDDPM repository has no intensity augmentation.
    config.data.augment = data_configs.augment_preset("none", None)
    d, p = config.diffusion, config.patch
    if size == "cpu":
        # The DDPM cpu recipe (configs/ddpm.py): few steps, so train on the noise levels where
        # the score is read and read it at a high t.
        common.cpu_training(config)
        d.train_t_range = (200, 900)
        d.test_timesteps = (749,)
    # Modifiers come after the size, so they win over its defaults.
    if "ens" in modifiers:
        d.test_timesteps = (249, 499, 749)  # t {250, 500, 750}, 0-based
    if "overlap" in modifiers:
        # Authors' overlap / agg_overlap='avg' option: half-patch stride, averaged overlaps.
        p.stride = p.size // 2
        p.train_positions = "random"
    common.apply_common_modifiers(config, modifiers)
    return config
