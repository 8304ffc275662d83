"""MMCCD: modality cycles with masked conditional diffusion (Liang et al., MICCAI MMMI 2023).

x is the source modality (the one scored, e.g. FLAIR), y the target modality (e.g. T2); both
are channels of `batch['image']`, named by `config.mmccd.source` / `.target` and found in
`config.data.modalities`. Only x is read at test time.

Stages:
  'forward'   f: x -> y. 'diffusion' (MMCCD): a conditional DDPM predicting y0 (x0
              objective, MSE, linear schedule, T = 1000); its input is [y_t, cond]
              concatenated on channels, cond = (1 - m) x + m eps' with m a random band mask
              (1 in the band: horizontal or vertical, `band_width` px, start on a stride of
              `train_stride`) and eps' ~ N(0, I), i.e. x is kept outside the band and replaced
              by noise inside it. 'unet' (the Cyclic-UNet baseline): a plain UNet, f(x) ~ y,
              MSE, no masking, no diffusion.
  'backward'  g: y -> x, a plain UNet (no timestep) trained with MSE on real healthy pairs.
Score ('diffusion'): for each band mask m_r of the static set (`band_masks`: every start on
  `test_stride`, both directions; 128 masks at the paper's 128 px), DDIM-sample y from one
  initial noise y_T shared by all masks (authors' code) with the masked condition (fresh
  condition noise at every step: authors' code; `cond_noise='mask'`: once per mask, the
  paper's Alg. 2), then x_hat_r = g(y_r); the anomaly map is Eq. 10,
      E = sum_r m_r (x_hat_r - x)^2 / sum_r m_r,
  the squared cyclic error averaged over the masks whose band covered each pixel (the
  in-painted pixels; outside its band a mask's translation is just conditioned on x).
  All masks x slices are one `sweep` (vmap, chunked to `max_batch` network inputs per call by
  `jax.lax.map`), with the DDIM chain a `lax.scan` inside it.
Score ('unet'): E = (x - g(f(x)))^2.
Normalisation of E (`mmccd.normalise`): 'none' (default: raw squared error in image units,
  comparable across slices and volumes, so the validation-selected threshold transfers
  without looking at the test set), 'image' (min-max per slice inside the brain mask). The
  paper min-max normalises jointly over the whole test set (transductive); that is one
  positive affine map shared by all maps, so it changes neither AUPRC nor the oracle-threshold
  Dice that the evaluation also reports; `dataset_minmax` applies it to stacked maps offline.
Reconstruction output [B, H, W, M]: the source channel holds x_hat and the target channel
  y_bar (band-weighted means over masks, as E), other channels the input.
Images: `image * input_scale + input_shift` is the network range (cpu/tiny: [0, 1] ->
  [-1, 1]; paper: the MMCCD [-3, 3] normalisation, unchanged).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uadjax import diffusion
from uadjax.inference.sweep import sweep
from uadjax.methods.base import Method, Stage
from uadjax.models import make_model

FORWARD_KINDS = ("diffusion", "unet")
DIRECTIONS = ("horizontal", "vertical")
NORMALISATIONS = ("none", "image")
COND_NOISES = ("step", "mask")


# ------------------------------------------------------------------------------------------
# Modalities and value range.

def modality_indices(config) -> tuple[int, int]:
    """(source, target) channel indices of `config.mmccd.source/target` in the data order."""
    mods = tuple(config.data.modalities)
    c = config.mmccd
    for name in (c.source, c.target):
        if name not in mods:
            raise ValueError(f"mmccd modality {name!r} is not loaded: data.modalities = {mods}")
    if c.source == c.target:
        raise ValueError(f"mmccd source and target are both {c.source!r}")
    return mods.index(c.source), mods.index(c.target)


def split_pair(image, config):
    """image [B, H, W, M] -> (x, y) [B, H, W, 1] each, in the network range."""
    src, tgt = modality_indices(config)
    c = config.mmccd
    x = image[..., src:src + 1] * c.input_scale + c.input_shift
    y = image[..., tgt:tgt + 1] * c.input_scale + c.input_shift
    return x, y


def from_model(values, config):
    """Network range -> image units."""
    return (values - config.mmccd.input_shift) / config.mmccd.input_scale


# ------------------------------------------------------------------------------------------
# Band masks.

def _hw(image_size) -> tuple[int, int]:
    if isinstance(image_size, (int, np.integer)):
        return int(image_size), int(image_size)
    h, w = image_size
    return int(h), int(w)


def _check_band(image_size, width: int, stride: int) -> tuple[int, int]:
    h, w = _hw(image_size)
    if width < 1 or width > min(h, w):
        raise ValueError(f"band width must be in [1, {min(h, w)}], got {width}")
    if stride < 1:
        raise ValueError(f"band stride must be >= 1, got {stride}")
    return h, w


def band_starts(length: int, stride: int) -> np.ndarray:
    """Band start offsets 0, stride, ... < length (bands near the border are truncated)."""
    return np.arange(0, length, stride, dtype=np.int32)


def band_masks(image_size, width: int, stride: int,
               directions=DIRECTIONS) -> np.ndarray:
    """The static test-time mask set: [R, H, W] float32, 1 inside the band (masked).

    Horizontal bands (rows s .. s + width - 1, all columns) for s in `band_starts(H, stride)`,
    then vertical ones (columns) for s in `band_starts(W, stride)`. Paper: 128 px, width 16,
    stride 2 -> 64 + 64 = 128 masks; each pixel is covered by 8 bands per direction.

    Raises:
      ValueError: bad width / stride / direction, or stride > width (pixels left uncovered).
    """
    h, w = _check_band(image_size, width, stride)
    if stride > width:
        raise ValueError(f"band stride {stride} > width {width} leaves pixels no band covers")
    out = []
    for direction in directions:
        if direction == "horizontal":
            rows = np.arange(h)
            for s in band_starts(h, stride):
                band = (rows >= s) & (rows < s + width)
                out.append(np.broadcast_to(band[:, None], (h, w)))
        elif direction == "vertical":
            cols = np.arange(w)
            for s in band_starts(w, stride):
                band = (cols >= s) & (cols < s + width)
                out.append(np.broadcast_to(band[None, :], (h, w)))
        else:
            raise ValueError(f"unknown band direction {direction!r}; use {DIRECTIONS}")
    return np.stack(out).astype(np.float32)


def band_subset(image_size, stride: int, coarse_stride: int,
                directions=DIRECTIONS) -> np.ndarray:
    """Rows of `band_masks(image_size, w, stride, directions)` that are the mask set at
    `coarse_stride` (a multiple of `stride`): `band_masks(., w, coarse_stride, .)` equals
    `band_masks(., w, stride, .)[band_subset(...)]`, in the same order."""
    if coarse_stride % stride:
        raise ValueError(f"stride {coarse_stride} is not a multiple of {stride}")
    h, w = _hw(image_size)
    rows, offset = [], 0
    for direction in directions:
        starts = band_starts(h if direction == "horizontal" else w, stride)
        rows += [offset + i for i, s in enumerate(starts) if s % coarse_stride == 0]
        offset += len(starts)
    return np.asarray(rows, np.int32)


def band_coverage(image_size, width: int, stride: int, directions=DIRECTIONS) -> np.ndarray:
    """[H, W] int32: how many test masks in-paint each pixel (width / stride per direction
    away from the top and left borders, fewer within width - stride of them)."""
    return band_masks(image_size, width, stride, directions).sum(0).astype(np.int32)


def random_band_masks(key, batch_size: int, image_size, width: int, stride: int):
    """Training masks, one per image (jit-able): [B, H, W] float32, 1 inside the band.

    Direction horizontal / vertical with p = 1/2, start uniform on `band_starts(., stride)`
    (authors: 2 * U{0..63} at 128 px).
    """
    h, w = _check_band(image_size, width, stride)
    k_dir, k_row, k_col = jax.random.split(key, 3)
    horizontal = jax.random.bernoulli(k_dir, 0.5, (batch_size,))
    row0 = jax.random.randint(k_row, (batch_size,), 0, len(band_starts(h, stride))) * stride
    col0 = jax.random.randint(k_col, (batch_size,), 0, len(band_starts(w, stride))) * stride
    rows, cols = jnp.arange(h), jnp.arange(w)
    in_rows = (rows[None] >= row0[:, None]) & (rows[None] < row0[:, None] + width)  # [B, H]
    in_cols = (cols[None] >= col0[:, None]) & (cols[None] < col0[:, None] + width)  # [B, W]
    band = jnp.where(horizontal[:, None, None],
                     jnp.broadcast_to(in_rows[:, :, None], (batch_size, h, w)),
                     jnp.broadcast_to(in_cols[:, None, :], (batch_size, h, w)))
    return band.astype(jnp.float32)


def masked_condition(x, mask, noise):
    """Eq. 8: (1 - m) x + m eps.

    x, noise [B, H, W, 1]; mask [B, H, W] or [H, W] (1 = masked) -> [B, H, W, 1].
    """
    m = mask[..., None]
    return (1.0 - m) * x + m * noise


# ------------------------------------------------------------------------------------------
# Networks and losses.

def make_schedule(config):
    c = config.diffusion
    return diffusion.get_schedule(c.schedule, c.num_timesteps)


def make_forward(config, rngs: nnx.Rngs) -> nnx.Module:
    return make_model(config.model_f, rngs=rngs)


def make_backward(config, rngs: nnx.Rngs) -> nnx.Module:
    return make_model(config.model_g, rngs=rngs)


def _forward_kind(config) -> str:
    kind = config.mmccd.forward
    if kind not in FORWARD_KINDS:
        raise ValueError(f"unknown mmccd.forward {kind!r}; use one of {FORWARD_KINDS}")
    return kind


def _mse(prediction, target):
    return diffusion.diffusion_loss(prediction, target, kind="l2")


def forward_loss_fn(model, batch, key, config):
    """f on healthy pairs -> (loss, metrics).

    'diffusion': t ~ U{0..T-1}, y_t = q_sample(y, t, eps), MSE(f([y_t, cond], t), y) with a
    random band mask per image; 'unet': MSE(f(x), y).
    """
    x, y = split_pair(batch["image"], config)
    k_t, k_eps, k_mask, k_cond, k_drop = jax.random.split(key, 5)
    rngs = nnx.Rngs(dropout=k_drop)
    if _forward_kind(config) == "unet":
        return _mse(model(x, None, deterministic=False, rngs=rngs), y), {}
    c = config.mmccd
    schedule = make_schedule(config)
    batch_size, h, w, _ = x.shape
    t = jax.random.randint(k_t, (batch_size,), 0, config.diffusion.num_timesteps)
    y_t = diffusion.q_sample(schedule, x0=y, t=t, noise=jax.random.normal(k_eps, y.shape))
    mask = random_band_masks(k_mask, batch_size, (h, w), c.band_width, c.train_stride)
    cond = masked_condition(x, mask, jax.random.normal(k_cond, x.shape))
    prediction = model(jnp.concatenate([y_t, cond], axis=-1), t, deterministic=False,
                       rngs=rngs)
    return _mse(prediction, y), {}


def backward_loss_fn(model, batch, key, config):
    """g on real healthy pairs: MSE(g(y), x) -> (loss, metrics)."""
    x, y = split_pair(batch["image"], config)
    return _mse(model(y, None, deterministic=False, rngs=nnx.Rngs(dropout=key)), x), {}


# ------------------------------------------------------------------------------------------
# Test time.

def sample_timesteps(config) -> np.ndarray:
    """The DDIM chain: `ddim_steps` timesteps at the authors' stride, down to 0.

    The authors replaced guided-diffusion's `space_timesteps` (models/respace.py) by the
    smallest stride i that gives `ddim_steps` timesteps: {0, 10, ..., 990} for 100 of 1000
    (guided-diffusion's own respacing would give round(linspace(0, 999, 100))). The chain
    starts from pure noise at its largest timestep (990, not 999), as theirs."""
    return diffusion.strided_timesteps(config.diffusion.num_timesteps, config.mmccd.ddim_steps)


def translate_masked(f, x, mask, y_T, key, config):
    """One mask: DDIM-sample y from the masked condition of x.

    Args:
      f: the forward network, f([y_t, cond] [B, H, W, 2], t [B]) -> y0 estimate.
      x: [B, H, W, 1] source in the network range.
      mask: [H, W] (or [B, H, W]) band, 1 = masked.
      y_T: [B, H, W, 1] initial noise.
      key: PRNG key of this mask (condition noise, DDIM noise when eta > 0).
    Returns:
      [B, H, W, 1] y_bar.
    """
    c = config.mmccd
    if c.cond_noise not in COND_NOISES:
        raise ValueError(f"unknown mmccd.cond_noise {c.cond_noise!r}; use {COND_NOISES}")
    k_cond, k_ddim = jax.random.split(key)

    def model_fn(y_t, t):
        k = jax.random.fold_in(k_cond, t[0]) if c.cond_noise == "step" else k_cond
        cond = masked_condition(x, mask, jax.random.normal(k, x.shape))
        return f(jnp.concatenate([y_t, cond], axis=-1), t)

    return diffusion.sample_loop(
        model_fn, make_schedule(config), x_T=y_T, timesteps=sample_timesteps(config),
        key=k_ddim, sampler="ddim", eta=float(c.ddim_eta), prediction_type="x0",
        clip_x0=None)  # authors: clip_denoised=False


def sweep_chunk(config, batch_size: int) -> int | None:
    """Masks per vmapped chunk: `max_batch` network inputs (masks x slices) per call."""
    max_batch = config.mmccd.get("max_batch", None)
    return None if not max_batch else max(1, int(max_batch) // int(batch_size))


def mask_sweep(f, g, x, key, config):
    """Every test mask of x [B, H, W, 1] (network range) as one chunked vmapped sweep.

    Returns a dict of [R, B, H, W] arrays, each zero outside its band:
      'err'   m_r (x_hat_r - x)^2 in image units,
      'x_hat' m_r x_hat_r,  'y_bar' m_r y_r  (network range).
    Row r uses mask r of `band_masks` and key `jax.random.split(key_masks, R)[r]`, where
    key_T, key_masks = split(key) and y_T = N(0, I) from key_T is shared by all masks.
    """
    c = config.mmccd
    masks = band_masks(x.shape[1:3], c.band_width, c.test_stride, tuple(c.directions))
    k_T, k_masks = jax.random.split(key)
    y_T = jax.random.normal(k_T, x.shape)
    x_img = from_model(x, config)[..., 0]

    def one_mask(variant):
        mask, k = variant
        y_bar = translate_masked(f, x, mask, y_T, k, config)
        x_hat = g(y_bar, None)
        err = jnp.square(from_model(x_hat, config)[..., 0] - x_img)
        return {"err": mask * err, "x_hat": mask * x_hat[..., 0], "y_bar": mask * y_bar[..., 0]}

    keys = jax.random.split(k_masks, masks.shape[0])
    return sweep(one_mask, (jnp.asarray(masks), keys),
                 chunk_size=sweep_chunk(config, x.shape[0])), masks


def normalise_map(error, brain_mask, kind: str):
    """error [B, H, W] -> normalised [B, H, W]: 'none' unchanged; 'image' min-max per slice
    over its brain pixels (0 outside the brain, and where the brain's error is constant)."""
    if kind == "none":
        return error
    if kind != "image":
        raise ValueError(f"unknown mmccd.normalise {kind!r}; use one of {NORMALISATIONS}")
    brain = brain_mask > 0
    lo = jnp.min(jnp.where(brain, error, jnp.inf), axis=(1, 2), keepdims=True)
    hi = jnp.max(jnp.where(brain, error, -jnp.inf), axis=(1, 2), keepdims=True)
    span = hi - lo
    ok = brain & (span > 0)
    return jnp.where(ok, (error - lo) / jnp.where(ok, span, 1.0), 0.0)


def dataset_minmax(maps: np.ndarray) -> np.ndarray:
    """The paper's normalisation: min-max over a whole (test) set of stacked maps [N, ...].

    Transductive (it reads the test set). Offline helper, not part of the score: with one
    positive affine map for all maps, AUPRC and any best-threshold Dice are unchanged.
    """
    maps = np.asarray(maps, np.float32)
    lo, hi = float(maps.min()), float(maps.max())
    return np.zeros_like(maps) if hi <= lo else (maps - lo) / (hi - lo)


def network_evaluations(config) -> dict[str, float]:
    """f and g passes per slice: masks x DDIM steps of f and one g per mask (one of each for
    the Cyclic UNet)."""
    if _forward_kind(config) == "unet":
        return {"f": 1, "g": 1}
    c = config.mmccd
    masks = len(band_masks(tuple(config.data.image_size), c.band_width, c.test_stride,
                           tuple(c.directions)))
    return {"f": masks * int(c.ddim_steps), "g": masks}


def score_fn(models, batch, key, config):
    """-> {'score': [B, H, W], 'reconstruction': [B, H, W, M]} (see the module docstring).

    batch['image'] [B, H, W, M]; only the source channel is read.
    """
    image = batch["image"]
    f, g = models["forward"], models["backward"]
    src, tgt = modality_indices(config)
    x, _ = split_pair(image, config)
    if _forward_kind(config) == "unet":
        y_bar = f(x, None)
        x_hat = g(y_bar, None)
        error = jnp.square(from_model(x_hat, config) - image[..., src:src + 1])[..., 0]
        x_hat, y_bar = x_hat[..., 0], y_bar[..., 0]
    else:
        out, masks = mask_sweep(f, g, x, key, config)
        coverage = jnp.asarray(masks.sum(0))  # [H, W], >= 1 everywhere (checked by band_masks)
        error, x_hat, y_bar = (jnp.sum(out[k], axis=0) / coverage
                               for k in ("err", "x_hat", "y_bar"))
    score = normalise_map(error, batch["brain_mask"], config.mmccd.normalise)
    rec = image.at[..., src].set(from_model(x_hat, config))
    rec = rec.at[..., tgt].set(from_model(y_bar, config))
    return {"score": score, "reconstruction": rec}


METHOD = Method(
    name="mmccd",
    stages=(
        Stage(name="forward", make_model=make_forward, loss_fn=forward_loss_fn),
        Stage(name="backward", make_model=make_backward, loss_fn=backward_loss_fn),
    ),
    score_fn=score_fn,
    network_evaluations=network_evaluations,
)
