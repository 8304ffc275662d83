"""Defaults shared by every method config: data, training loop, evaluation.

A method config (`configs/<method>.py`) starts from `base_config(variant)` and adds its
`model` and method-specific fields. Variants:
  paper   the published protocol at full size (96x96 at 2 mm, paper batch size and steps)
  cpu     sized for a 2-core CPU: 64x64 at 3 mm, small network, about 10 minutes of training
  tiny    a few steps on a tiny phantom, for tests
"""

from __future__ import annotations

import ml_collections

from configs import data as data_configs

VARIANTS = ("paper", "cpu", "tiny")


# Modifiers every method config accepts (besides its own).
# Training budgets (steps per stage): `short` is the leaderboard's; `medium` and `long`
# give the budget curve of `python -m uadjax.benchmark --budget=short,medium,long`.
BUDGET_STEPS = {"short": 300, "medium": 1000, "long": 3000}
SHORT_STEPS = BUDGET_STEPS["short"]
COMMON_MODIFIERS = frozenset({*BUDGET_STEPS, "bf16"})


def split_variant(arg: str | None, default: str = "paper") -> tuple[str, set[str]]:
    """'cpu,ens' -> ('cpu', {'ens'}). The first word is the size variant, the rest modifiers."""
    words = [w for w in (arg or default).split(",") if w]
    size, modifiers = words[0], set(words[1:])
    if size not in VARIANTS:
        raise ValueError(f"unknown config variant {size!r}; first word must be one of {VARIANTS}")
    return size, modifiers


def check_modifiers(method: str, modifiers: set[str], allowed) -> None:
    """Raises ValueError naming the modifiers that are neither `allowed` (the method's own)
    nor common to all methods (`COMMON_MODIFIERS`)."""
    unknown = set(modifiers) - set(allowed) - COMMON_MODIFIERS
    if unknown:
        raise ValueError(f"unknown {method} config modifiers {sorted(unknown)}; "
                         f"{method} takes {sorted(set(allowed))}, every method "
                         f"{sorted(COMMON_MODIFIERS)}")


def parse_variant(arg: str | None, method: str, allowed=()) -> tuple[str, set[str]]:
    """'cpu,ens' -> ('cpu', {'ens'}) after `check_modifiers`: the one place a config's
    argument is parsed and checked."""
    size, modifiers = split_variant(arg)
    check_modifiers(method, modifiers, allowed)
    return size, modifiers


def apply_common_modifiers(config: ml_collections.ConfigDict, modifiers: set[str]) -> set[str]:
    """Applies the modifiers shared by all methods; returns the ones left for the method.

      short  train for 300 steps in every training stage (checkpoint/validate at the end,
             warm-up at most a tenth): the budget of the leaderboard (`--budget=short`),
             where every method gets the same steps;
      medium, long  1,000 and 3,000 steps per stage: the budget curve (`BUDGET_STEPS`).
      bf16   bfloat16 compute in every guided-diffusion UNet of the config (parameters,
             optimiser state and losses stay float32): about half the memory traffic on
             GPUs and TPUs; on CPUs XLA emulates bf16 convolutions and it is slower.
    """
    budgets = [b for b in BUDGET_STEPS if b in modifiers]
    if len(budgets) > 1:
        raise ValueError(f"one training budget at a time, not {budgets}")
    if budgets:
        steps = BUDGET_STEPS[budgets[0]]
        # The budget holds for every training stage: config.train and each stage's own
        # recipe in config.stage_train (statistics passes, config.stage_statistics, are
        # data passes, not training, and keep their length).
        recipes = [config.train] + list(config.get("stage_train", {}).values())
        for t in recipes:
            warmup = t.get("warmup_steps", config.train.warmup_steps)
            t.update({"num_steps": steps, "checkpoint_every_steps": steps,
                      "val_every_steps": steps, "warmup_steps": min(warmup, steps // 10)})
    if "bf16" in modifiers:
        unets = [m for m in config.values()
                 if isinstance(m, ml_collections.ConfigDict) and m.get("name") == "unet"]
        if not unets:
            raise ValueError(f"the bf16 modifier needs a UNet model config; method "
                             f"{config.method!r} has none")
        for m in unets:
            m.dtype = "bfloat16"
    return set(modifiers) - COMMON_MODIFIERS


# The small UNets of the cpu and tiny sizes, shared by every method built on the guided-
# diffusion UNet (cpu: about 0.65 s per step of 16 slices at 64x64 on 2 cores, 0.74 M
# parameters); a config applies them with `small_unet(m, size)` and keeps its own other fields.
SMALL_UNETS = {
    "cpu": {"base_channels": 16, "channel_mult": (1, 2, 4, 4), "num_res_blocks": 1,
            "num_head_channels": 32},
    "tiny": {"base_channels": 8, "channel_mult": (1, 2), "num_res_blocks": 1,
             "num_head_channels": 8},
}


def small_unet(m: ml_collections.ConfigDict, size: str) -> None:
    """Sets the widths and depth of the `size` UNet on model config `m` (paper: unchanged)."""
    if size in SMALL_UNETS:
        m.update(SMALL_UNETS[size])


def cpu_training(config: ml_collections.ConfigDict, num_steps: int = 1000) -> None:
    """The CPU training recipe shared by the method configs: few steps, so a high learning
    rate with warm-up and cosine decay, and an EMA of the weights (about 11 minutes for the
    DDPM UNet on 2 cores)."""
    t = config.train
    t.num_steps = num_steps
    t.learning_rate = 1e-3
    t.warmup_steps = 50
    t.lr_schedule = "cosine"
    t.ema_decay = 0.99


def base_config(size: str) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.method = ""
    config.seed = 0

    # Data: where the NIfTI dataset and the prepared shards live, and how slices are made.
    config.data = data_configs.get_config(size)
    d = config.data
    d.dataset_dir = ""            # NIfTI dataset folder (manifest.json); '' = built-in phantom
    d.data_dir = ".cache/shards"  # prepared slice shards (TFDS data dir)
    d.phantom_dir = ".cache/phantom"  # where the phantom is generated (per variant and seed)
    d.phantom_variant = "tiny" if size == "tiny" else "default"  # configs/phantom.py variant
    d.phantom_seed = 0

    # Training loop (uadjax/trainer.py).
    config.train = ml_collections.ConfigDict()
    t = config.train
    t.batch_size = 32             # global batch (split over all devices)
    t.num_steps = 19200           # Behrendt: 1600 epochs x 12 batches of 32
    t.optimizer = "adam"          # 'adam' | 'adamw'; Behrendt's code: Adam (DDPM_2D.py)
    t.learning_rate = 1e-4        # Behrendt's code: configs/datamodule/IXI.yaml lr 0.0001
    t.weight_decay = 0.0          # adamw only
    t.b1 = 0.9
    t.b2 = 0.999
    t.warmup_steps = 0
    t.lr_schedule = "constant"    # 'constant' | 'cosine'
    t.grad_clip = 0.0             # global-norm clip; 0 disables
    t.ema_decay = 0.0             # 0 disables EMA (Behrendt uses none)
    t.log_every_steps = 100
    t.checkpoint_every_steps = 1000
    t.max_checkpoints = 2
    t.val_every_steps = 1000      # healthy-validation loss; 0 disables
    t.val_batches = 8             # batches of healthy validation slices per validation
    # Which checkpoint evaluation and later stages use: 'best_val' (the step of lowest
    # healthy-validation loss among the validations, kept in <stage>/best_checkpoint;
    # Behrendt's configs/callbacks/checkpoint.yaml monitors the validation loss and tests
    # `ckpt_path: best`) or 'latest'. Paper configs: best_val; cpu and tiny: latest (a
    # short budget validates a few times, and the budget curve measures the steps given).
    t.select_checkpoint = "best_val" if size == "paper" else "latest"
    t.tensorboard = True
    t.data_split = "train"        # the split a stage trains on (LDM's calibration: val_healthy)
    t.augment = True              # config.data.augment applies (when it is enabled)
    # A non-finite loss or gradient: 'stop' (raise, naming the step; the last checkpoint is
    # kept) or 'skip' (drop that batch's update, warn, and stop only after
    # max_skipped_steps skipped updates). Either way no non-finite state is applied or saved.
    t.on_non_finite = "stop"
    t.max_skipped_steps = 100

    # Evaluation (uadjax/evaluation.py): Behrendt post-processing and threshold protocol.
    config.eval = ml_collections.ConfigDict()
    e = config.eval
    e.batch_size = 64
    e.erode_iterations = 3        # brain-mask erosion per axial slice (H // 25 at 96 px)
    e.median_size = 5             # 3D median filter; 0 disables
    e.min_component_size = 8      # connected components smaller than this are removed; 0 off
    e.threshold_steps = 10        # greedy threshold search steps on the lesion validation set
    e.fprs = (0.01, 0.05, 0.1)    # label-free thresholds at these healthy false-positive rates
    # ... counted over the eroded brain ('brain') or every voxel, background included ('all':
    # Behrendt's utils_eval.py::_test_end, which logs them; its Dice uses the 'val' search).
    e.fpr_voxels = "brain"
    e.num_figures = 4             # subjects shown in the report per lesion kind
    e.baseline = True             # also evaluate the intensity-threshold baseline
    # Splits scored; the lesion splits give Dice/AUPRC, the healthy ones the label-free
    # thresholds at fixed FPR and the healthy false-positive volume.
    e.splits = ("val_lesion", "test_lesion", "val_healthy", "test_healthy")
    e.seed = 0

    if size == "cpu":
        t.batch_size = 16
        t.log_every_steps = 50
        t.checkpoint_every_steps = 250
        t.val_every_steps = 250
        t.val_batches = 4
        e.batch_size = 32
        e.erode_iterations = 2    # 64 px: H // 25 = 2
    elif size == "tiny":
        t.batch_size = 8
        t.num_steps = 2
        t.log_every_steps = 1
        t.checkpoint_every_steps = 1
        t.val_every_steps = 2
        t.val_batches = 1
        t.tensorboard = False
        e.batch_size = 8
        e.erode_iterations = 1
        e.median_size = 3
        e.num_figures = 1
    return config
