"""MAEDiff: masked-autoencoder-enhanced patch diffusion (Xu, Wang, Du, arXiv 2401.10561).

Usage: --config=configs/maediff.py:<size>[,modifier...]
  size      paper | cpu | tiny (see configs/common.py)
  modifiers ens      t_test ensemble {250, 500, 750}
            grid     s = p: the non-overlapping grid of pDDPM (4 calls per slice instead of
                     16 (paper) / 9 (cpu)), the MAE module alone against pDDPM
            short    (common) the short training budget of the seed study
e.g. `python -m uadjax.main run --config=configs/maediff.py:cpu,short --workdir=runs/maediff`.

No code is public and the paper body could not be read (only its abstract and the captions
of Figures 1 and 2), so the values below are ours unless marked otherwise:

* Base (MAEDiff is built on the pDDPM pipeline, docs/methods.md, MAEDiff): the pDDPM UNet,
  cosine schedule T = 1000, simplex noise, x0 objective, L1 loss inside the noised patch
  averaged over the image, single-step reconstruction at t_test 500 (index 499), training
  recipe of configs/ddpm.py; cpu: the pDDPM cpu recipe (t ~ U{200..900}, t_test 749).
* Partition (paper: upper-level p x p patches, sub-level r x r cells, test-time sliding step
  s; values not readable). The paper compares against pDDPM with strides 48 (the 2x2 grid,
  4 calls per slice) and 16 (16 calls); MAEDiff slides its patch like the second.
  paper (96 px): p = 48 (pDDPM's patch, half the image), s = 16 (the overlapping baseline,
    4 x 4 = 16 positions, every pixel covered by 1 to 9 of them), r = 8 (a 12 x 12 cell
    grid; each patch masks 6 x 6 = 36 cells, 25 %, 108 stay visible; a cell is 2 x 2
    features of the 24 x 24 x 256 encoder output).
  cpu (64 px): p = 32 (half the image, as pDDPM cpu), s = 16 (3 x 3 = 9 positions, the
    cpu counterpart of the paper's sliding: half-patch overlap on the same patch as pDDPM
    cpu; 2.25x pDDPM's 4 calls per slice, ',grid' restores pDDPM's cost), r = 8 (8 x 8 cells; 16 masked, 48 visible; one cell = one feature of
    the 8 x 8 x 64 encoder output of the 4-level cpu UNet).
  tiny (16 px): p = 8, s = 4 (3 x 3 positions), r = 4.
* Training positions 'grid' (ours): the patch is one of the test-time sliding positions,
  uniformly (the paper: "one patch is randomly selected"), so every position the score
  reads was trained.
* MAE module (paper: after the UNet encoder, visible tokens through the MAE encoder, then
  with the entire feature map through the MAE decoder, reshaped and upsampled back):
  transformer widths / depths / heads below (ours; MAE's own are ViT-sized), fixed 2-D
  sin-cos positions, residual zero-initialised output (see uadjax/models/maediff.py).
"""

from __future__ import annotations

import ml_collections

from configs import common
from configs.ddpm import diffusion_config, unet_config

# (p, s, r) per size, in pixels; see the module docstring for why.
PARTITION = {"paper": (48, 16, 8), "cpu": (32, 16, 8), "tiny": (8, 4, 4)}
# MAE module: (dim, encoder depth, decoder dim, decoder depth, heads) per size. Ours: paper
# 64-channel heads like the UNet's attention and a shallower decoder as in MAE; cpu and tiny
# shrunk with the UNet.
MAE = {"paper": (256, 4, 256, 2, 4), "cpu": (64, 2, 64, 1, 2), "tiny": (16, 1, 16, 1, 2)}


def patch_config(size: str) -> ml_collections.ConfigDict:
    p = ml_collections.ConfigDict()
    patch, stride, sub = PARTITION[size]
    p.size = patch                 # upper-level patch side p (pixels)
    p.stride = stride              # test-time sliding step s (pixels)
    # Sub-level cell side r (pixels); the model's token_size refers to this field, so
    # --config.patch.sub_size changes both.
    p.sub_size = ml_collections.FieldReference(sub)
    p.train_positions = "grid"     # 'grid' (sliding positions) | 'random' (any r-aligned)
    p.loss_reduction = "image"     # 'image' (pDDPM authors: inpaint + F.l1_loss) | 'patch'
    return p


def model_config(size: str, channels: int, patch: ml_collections.ConfigDict):
    m = unet_config(size, channels)  # the pDDPM UNet per size
    m.name = "maediff_unet"
    m.token_size = patch.get_ref("sub_size")
    dim, enc_depth, dec_dim, dec_depth, heads = MAE[size]
    m.mae_dim = dim                # MAE encoder width
    m.mae_encoder_depth = enc_depth
    m.mae_decoder_dim = dec_dim    # MAE decoder width
    m.mae_decoder_depth = dec_depth
    m.mae_num_heads = heads
    m.mae_mlp_ratio = 4.0          # ViT / MAE
    return m


MODIFIERS = frozenset({"ens", "grid"})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size, modifiers = common.parse_variant(arg, "maediff", MODIFIERS)
    config = common.base_config(size)
    config.method = "maediff"
    channels = len(config.data.modalities)
    config.patch = patch_config(size)
    config.model = model_config(size, channels, config.patch)
    config.diffusion = diffusion_config(size)
    d = config.diffusion
    if size == "paper":
        # 16 positions x eval batch 64 at 96 px: evaluate 4 positions at a time (memory).
        d.sweep_chunk = 4
    if size == "cpu":
        # The pDDPM cpu recipe (configs/pddpm.py), so the two are compared like for like.
        common.cpu_training(config)
        d.train_t_range = (200, 900)
        d.test_timesteps = (749,)
    if "ens" in modifiers:
        d.test_timesteps = (249, 499, 749)  # t {250, 500, 750}, 0-based
    if "grid" in modifiers:
        config.patch.stride = config.patch.size
    common.apply_common_modifiers(config, modifiers)
    return config
