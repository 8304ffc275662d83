"""MMCCD: modality cycles with masked conditional diffusion (Liang et al. 2023), and the
Cyclic-UNet baseline of the same paper.

Usage: --config=configs/mmccd.py:<size>[,modifier...]
  size      paper | cpu | tiny (see configs/common.py)
  modifiers cyclic       the Cyclic-UNet baseline: f a plain UNet, no masking, no diffusion
            <src>-<tgt>  the modality pair, any two of flair, t1, t2, pd (default flair-t2,
                         the paper's Table 1); e.g. t1-t2, t2-t1, flair-t1 (Table 2)
            flair|t1|t2  source only, target T2 (FLAIR for t2): t1 = t1-t2
            short        (common) the short training budget of the seed study
e.g. `python -m uadjax.main run --config=configs/mmccd.py:cpu,short,t1-t2 --workdir=...`.
Both stages ('forward' f: x -> y, 'backward' g: y -> x) train from one config (or one of
them is reused from another run with `--config.stage_workdirs.<stage>=<run>`); the data
config loads both modalities, source first (`data.modalities = (source, target)`).
"""

from __future__ import annotations

import ml_collections

from configs import common
from configs import data as data_configs

MODALITIES = ("flair", "t1", "t2", "pd")
# Single-word source modifiers -> (source, target).
SOURCE_ONLY = {"flair": ("flair", "t2"), "t1": ("t1", "t2"), "t2": ("t2", "flair")}
PAPER_SIZE = 128


def unet_config(size: str, in_channels: int, use_timestep: bool) -> ml_collections.ConfigDict:
    """The guided-diffusion UNet of the authors (both f and g), smaller for cpu / tiny."""
    m = ml_collections.ConfigDict()
    m.name = "unet"
    m.in_channels = in_channels
    m.out_channels = 1
    # Authors (configs/brats_configs.py): num_channels 32, channel_mult (1, 1, 2, 3, 4),
    # 2 res blocks, attention at resolutions 32/16/8 of 128 = ds (4, 8, 16), 1 head, dropout
    # 0.1, scale-shift norm, resblock up/down.
    m.base_channels = 32
    m.channel_mult = (1, 1, 2, 3, 4)
    m.num_res_blocks = 2
    m.attention_resolutions = (4, 8, 16)
    m.use_middle_attention = True
    m.num_heads = 1
    m.num_head_channels = -1
    m.dropout = 0.1
    m.use_scale_shift_norm = True
    m.resblock_updown = True
    m.use_timestep = use_timestep   # g (and the cyclic f) are called without timesteps
    m.cond_dim = 0
    if size in common.SMALL_UNETS:
        # The DDPM cpu / tiny UNet (0.74 M parameters at cpu size), no attention or dropout.
        common.small_unet(m, size)
        m.attention_resolutions = ()
        m.dropout = 0.0
    return m


def _pair(modifiers: set[str]) -> tuple[tuple[str, str], set[str]]:
    """The (source, target) pair named by the modifiers, and the modifiers left over."""
    pairs = []
    rest = set()
    for word in modifiers:
        if word in SOURCE_ONLY:
            pairs.append(SOURCE_ONLY[word])
        elif "-" in word and all(p in MODALITIES for p in word.split("-")) and \
                len(word.split("-")) == 2:
            pairs.append(tuple(word.split("-")))
        else:
            rest.add(word)
    if len(pairs) > 1:
        raise ValueError(f"more than one modality pair in the modifiers: {sorted(pairs)}")
    pair = pairs[0] if pairs else ("flair", "t2")
    if pair[0] == pair[1]:
        raise ValueError(f"source and target modality are both {pair[0]!r}")
    return pair, rest


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size, modifiers = common.split_variant(arg)
    (source, target), modifiers = _pair(modifiers)
    common.check_modifiers("mmccd", modifiers, {"cyclic", *SOURCE_ONLY, "<source>-<target>"})
    cyclic = "cyclic" in modifiers
    config = common.base_config(size)
    config.method = "mmccd"

    d = config.data
    d.modalities = (source, target)  # channel 0 = x (scored), channel 1 = y
    # Intensity augmentation off: the authors use none, and changing x and y independently
    # would blur the tissue-wise x -> y mapping that f and g learn.
    d.augment.enabled = False
    if size == "paper":
        # Authors: BraTS 240 px at 1 mm resized to 128 x 128 (1.875 mm), MMCCD [-3, 3]
        # normalisation (data variant 'mmccd'); the networks see those values unchanged.
        # Axial slices 70-89 at 1 mm: the data variant 'mmccd_brats' (`data_prep.datasets
        # --preset mmccd`), with this pair's modalities.
        preset = data_configs.get_config("mmccd_brats")
        for key in ("image_size", "target_spacing", "slice_range", "normalisation",
                    "mmccd_lower_over"):
            d[key] = preset[key]
        assert d.image_size == (PAPER_SIZE, PAPER_SIZE)

    # f: [y_t, masked x] -> y0 (diffusion) or x -> y (cyclic); g: y -> x.
    config.model_f = unet_config(size, 1 if cyclic else 2, use_timestep=not cyclic)
    config.model_g = unet_config(size, 1, use_timestep=False)

    config.diffusion = ml_collections.ConfigDict()
    config.diffusion.schedule = "linear"  # guided-diffusion linear betas 1e-4 .. 0.02
    config.diffusion.num_timesteps = 1000

    h = d.image_size[0]
    config.mmccd = ml_collections.ConfigDict()
    c = config.mmccd
    c.source, c.target = source, target
    c.forward = "unet" if cyclic else "diffusion"  # 'diffusion' (MMCCD) | 'unet' (Cyclic UNet)
    # Network range = image * scale + shift: [0, 1] -> [-1, 1] for the percentile-normalised
    # cpu / tiny data; the paper's [-3, 3]-normalised data is used as is.
    c.input_scale, c.input_shift = (1.0, 0.0) if size == "paper" else (2.0, -1.0)
    # Bands: 16 px wide at 128 px (paper), scaled with the image: 8 at 64, 2 at 16. Starts on
    # a stride of 2 px at 128 px (authors: 2 * U{0..63}), scaled likewise (1 at 64 and 16).
    c.band_width = max(1, 16 * h // PAPER_SIZE)
    c.train_stride = max(1, 2 * h // PAPER_SIZE)
    c.test_stride = 2                      # paper: every start on a stride of 2 -> 128 masks
    c.directions = ("horizontal", "vertical")
    c.ddim_steps = 100                     # authors: timestep_respacing 100, DDIM
    c.ddim_eta = 0.0                       # authors: sampling.eta = 0
    c.cond_noise = "step"                  # authors' code: fresh band noise at every step
    c.normalise = "none"                   # 'none' | 'image'; the paper's test-set min-max
                                           # is `mmccd.dataset_minmax` (see the method)
    c.max_batch = 256                      # network inputs (masks x slices) per sweep call

    # Run folder of a stage trained elsewhere and reused here ('' = train it in this run): the
    # Cyclic UNet and MMCCD of one modality pair share g (same network, loss and data), e.g.
    # `--config.stage_workdirs.backward=<the MMCCD run>` for the Cyclic-UNet run.
    config.stage_workdirs = ml_collections.ConfigDict({"forward": "", "backward": ""})

    t = config.train
    if size == "paper":
        # Authors: AdamW lr 1e-4, weight decay 0, batch 32, 100 000 iterations per network,
        # the raw weights (their EMA is not saved).
        t.num_steps = 100_000
        t.checkpoint_every_steps = 10_000
        t.val_every_steps = 10_000
        config.eval.batch_size = 8         # 128 masks x 8 slices per scored batch
    elif size == "cpu":
        common.cpu_training(config)
        # 2 CPU cores: full MMCCD is 128 masks x 100 DDIM steps = 12 800 UNet calls per slice
        # (about 2.5 minutes per slice here). Ours, chosen from the cost-accuracy curve of
        # benchmarks/mmccd_protocol.py (issue 22, M1; docs/findings.md): both directions as
        # the authors, one band per pixel per direction (the 8 + 8 bands of 8 px on a stride
        # of 8) and 2 DDIM steps (t = 500, 0): 32 f + 16 g = 48 calls per slice, 11.6 ms
        # each on 2 idle cores, about 32 minutes for a whole evaluation (3,422 slices); every
        # other point of the curve costs at least twice as much. Batches of 128 inputs ran
        # fastest per input (19 ms at 32, 23 ms at 128, 41 ms at 512 on 2 busy cores).
        c.test_stride = c.band_width
        c.directions = ("horizontal", "vertical")
        c.ddim_steps = 2
        c.max_batch = 128
    elif size == "tiny":
        c.test_stride = c.band_width
        c.ddim_steps = 3
        c.max_batch = 64
    common.apply_common_modifiers(config, modifiers)
    return config
