"""grain input pipelines over slice records: shuffled, augmented training batches and ordered,
padded evaluation batches.

Training batches (`make_train_iterator`) are dicts of numpy arrays with static shapes:

  image        [B, H, W, M] float32
  brain_mask   [B, H, W]    uint8
  seg          [B, H, W]    uint8
  slice_index  [B]          int32

The string keys (`subject_id`, `kind`) are dropped from training batches. Evaluation
batches (`make_eval_batches`) keep every record key, with `subject_id` and `kind` as
fixed-width bytes arrays (`[B] |S64`), plus `valid [B] bool` (False on padding rows).

Augmentation runs on whole batches (`MapDataset.random_map` after `batch`: all random
numbers drawn at once, then in-place masked numpy ops on the selected slices only), so it
is seeded per batch index: a restored iterator replays the same batches. Every
augmentation changes intensities inside the brain mask only:
  * gamma: (x - lo) / (hi - lo) -> ^g -> back, with lo/hi the slice's brain min/max per
    channel and log g ~ U(log gamma_range);
  * bias field: x * exp(sum_k c_k P_k(u, v)), polynomials of degree <= bias_order on
    [-1, 1]^2, c_k ~ U(-bias_coeff, bias_coeff) (torchio RandomBiasField form);
  * blur: a Gaussian filter with sigma ~ U(blur_sigma) pixels drawn per axis (torchio
    RandomBlur: std in mm, converted with the grid spacing by the config);
  * ghosting (torchio RandomGhosting): in the centred 2D spectrum every n-th line along a
    random in-plane axis is scaled by 1 - s, n ~ U{ghost_count}, s ~ U(ghost_intensity),
    the central line restored (torchio also picks the through-plane axis of a 3D volume,
    which a per-slice augmentation cannot);
  * Gaussian noise: std ~ U(noise_std); the field is a random window (random sign) of a
    fixed bank of normal noise (`noise_bank`), much cheaper than fresh draws.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import grain
import numpy as np
from scipy import ndimage

STRING_WIDTH = 64
TRAIN_KEYS = ("image", "brain_mask", "seg", "slice_index")
STRING_KEYS = ("subject_id", "kind")


@dataclass(frozen=True)
class AugmentConfig:
    """Intensity augmentation settings (`configs/data.py: config.augment`).

    Attributes:
      enabled: master switch.
      gamma_p: probability of a gamma change per slice.
      gamma_range: (low, high) gamma, sampled log-uniformly.
      bias_p: probability of a multiplicative bias field per slice.
      bias_order: maximum polynomial degree of the bias field.
      bias_coeff: coefficients ~ U(-bias_coeff, bias_coeff).
      noise_p: probability of Gaussian noise per slice.
      noise_std: (low, high) noise standard deviation, sampled uniformly.
      blur_p: probability of a Gaussian blur per slice.
      blur_sigma: (low, high) sigma in pixels, sampled uniformly per axis.
      ghost_p: probability of a ghosting artefact per slice.
      ghost_count: (low, high) number of ghosts n, an integer sampled uniformly.
      ghost_intensity: (low, high) artefact strength s, sampled uniformly.
    """

    enabled: bool = True
    gamma_p: float = 0.5
    gamma_range: tuple = (0.7, 1.5)
    bias_p: float = 0.25
    bias_order: int = 3
    bias_coeff: float = 0.3
    noise_p: float = 0.25
    noise_std: tuple = (0.0, 0.03)
    blur_p: float = 0.0
    blur_sigma: tuple = (0.0, 1.0)
    ghost_p: float = 0.0
    ghost_count: tuple = (4, 10)
    ghost_intensity: tuple = (0.5, 1.0)

    @classmethod
    def from_config(cls, config) -> AugmentConfig:
        """From a ConfigDict/dict/AugmentConfig; None or False switch augmentation off."""
        if config is None or config is False:
            return cls(enabled=False)
        if isinstance(config, cls):
            return config
        values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v
                      for k, v in values.items() if k in names})


@functools.lru_cache(maxsize=16)
def _powers(n: int, order: int) -> np.ndarray:
    """[n, order + 1] float32: t^i for t on a regular grid over [-1, 1]."""
    t = np.linspace(-1.0, 1.0, n)
    out = np.stack([t ** i for i in range(order + 1)], axis=1).astype(np.float32)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=8)
def _term_mask(order: int) -> np.ndarray:
    """[P, P] bool: the monomials u^i v^j with 0 < i + j <= order."""
    i, j = np.indices((order + 1, order + 1))
    return (i + j <= order) & (i + j > 0)


NOISE_BANK_SIZE = 16


@functools.lru_cache(maxsize=8)
def noise_bank(height: int, width: int, channels: int) -> np.ndarray:
    """[K, 2H, 2W, M] float32 standard normal noise, fixed (seed 0), read-only.

    A slice's noise is a random [H, W] window of a random bank entry, times a random sign:
    K * (H + 1) * (W + 1) * 2 distinct fields, at the cost of a view instead of H * W * M
    fresh normal draws (the slowest part of the augmentation otherwise).
    """
    bank = np.random.default_rng(0).standard_normal(
        (NOISE_BANK_SIZE, 2 * height, 2 * width, channels), dtype=np.float32)
    bank.setflags(write=False)
    return bank


def bias_log_field(coeffs: np.ndarray, height: int, width: int) -> np.ndarray:
    """Polynomial log bias fields, evaluated separably (two small einsums, no BLAS threads).

    Args:
      coeffs: [B, P, P] coefficients of u^i v^j (P = order + 1; unused terms zero).
      height: H.
      width: W.

    Returns:
      [B, H, W] float32 sum_ij coeffs[b, i, j] u_h^i v_w^j, u and v on [-1, 1].
    """
    order = coeffs.shape[1] - 1
    inner = np.einsum("bij,wj->biw", coeffs, _powers(width, order))
    return np.einsum("hi,biw->bhw", _powers(height, order), inner)


def ghosting(image: np.ndarray, count: int, axis: int, intensity: float) -> np.ndarray:
    """MRI ghosting of one slice [H, W, M] (torchio `Ghosting.add_artifact` in 2D): in the
    centred spectrum of each channel the lines 0, n, 2n, ... along `axis` are scaled by
    1 - intensity and the central line is restored."""
    out = np.empty_like(image)
    for c in range(image.shape[-1]):
        spectrum = np.fft.fftshift(np.fft.fft2(image[..., c]))
        centre = spectrum.shape[axis] // 2
        lines = [slice(None), slice(None)]
        lines[axis] = slice(None, None, count)
        keep = np.take(spectrum, centre, axis=axis).copy()
        spectrum[tuple(lines)] *= 1.0 - intensity
        middle = [slice(None), slice(None)]
        middle[axis] = centre
        spectrum[tuple(middle)] = keep
        out[..., c] = np.real(np.fft.ifft2(np.fft.ifftshift(spectrum)))
    return out


def augment_batch(batch: dict, rng: np.random.Generator, config: AugmentConfig, *,
                  rows: tuple[int, int] | None = None) -> dict:
    """Random intensity augmentation of a batch, inside the brain only.

    All random numbers of the batch are drawn up front; each selected slice is then changed
    in place on its brain pixels only (no work on background pixels or unselected slices).

    Args:
      batch: dict with image [B, H, W, M] float32 and brain_mask [B, H, W] (0/1).
      rng: the numpy generator grain passes to `random_map`.
      config: `AugmentConfig`.
      rows: (offset, G) when `batch` is rows offset..offset+B-1 of a global batch of G
        rows: the numbers are drawn for all G rows and this part uses its own, so every
        process of a multi-host run augments its rows as a single process would.

    Returns:
      The batch with a new `image` (other keys unchanged).
    """
    if not config.enabled:
        return batch
    image = batch["image"].astype(np.float32, copy=True)
    mask = batch["brain_mask"].astype(bool)
    b, h, w, m = image.shape
    offset, b_local = 0, b
    if rows is not None:
        offset, b = rows

    do_gamma = rng.random(b) < config.gamma_p
    do_bias = rng.random(b) < config.bias_p
    do_noise = rng.random(b) < config.noise_p
    log_lo, log_hi = np.log(config.gamma_range)
    gammas = np.exp(rng.uniform(log_lo, log_hi, size=b)).astype(np.float32)
    p = config.bias_order + 1
    coeffs = rng.uniform(-config.bias_coeff, config.bias_coeff, size=(b, p, p))
    coeffs = (coeffs * _term_mask(config.bias_order)).astype(np.float32)
    stds = rng.uniform(*config.noise_std, size=b).astype(np.float32)
    windows = np.stack([rng.integers(0, NOISE_BANK_SIZE, size=b),
                        rng.integers(0, h + 1, size=b), rng.integers(0, w + 1, size=b),
                        rng.choice(np.array([-1.0, 1.0], np.float32), size=b)], axis=1)
    # Blur and ghosting draw after the others, so a config without them keeps its stream.
    do_blur = rng.random(b) < config.blur_p
    sigmas = rng.uniform(*config.blur_sigma, size=(b, 2))
    do_ghost = rng.random(b) < config.ghost_p
    ghosts = np.stack([rng.integers(config.ghost_count[0], config.ghost_count[1] + 1, size=b),
                       rng.integers(0, 2, size=b)], axis=1)
    ghost_strength = rng.uniform(*config.ghost_intensity, size=b)
    if rows is not None:  # this process's rows of the global batch
        part = slice(offset, offset + b_local)
        do_gamma, do_bias, do_noise = do_gamma[part], do_bias[part], do_noise[part]
        gammas, coeffs, stds, windows = gammas[part], coeffs[part], stds[part], windows[part]
        do_blur, sigmas = do_blur[part], sigmas[part]
        do_ghost, ghosts, ghost_strength = do_ghost[part], ghosts[part], ghost_strength[part]

    chosen = np.flatnonzero(do_gamma | do_bias | do_noise | do_blur | do_ghost)
    fields = {}
    if np.any(do_bias):
        bias_idx = np.flatnonzero(do_bias)
        fields = dict(zip(bias_idx.tolist(), np.exp(bias_log_field(coeffs[bias_idx], h, w))))
    for k in chosen.tolist():
        brain = mask[k][..., None]  # [H, W, 1]
        if not brain.any():
            continue
        brain = np.broadcast_to(brain, (h, w, m))
        x = image[k]  # [H, W, M] view, changed in place where `brain` (no gathers).
        if do_gamma[k]:
            lo = np.min(x, axis=(0, 1), where=brain, initial=np.inf)
            hi = np.max(x, axis=(0, 1), where=brain, initial=-np.inf)
            span = np.maximum(hi - lo, np.float32(1e-6))
            unit = (x - lo) / span
            np.clip(unit, 0.0, 1.0, out=unit)
            np.power(unit, gammas[k], out=unit)
            unit *= span
            unit += lo
            np.copyto(x, unit, where=brain)
        if do_bias[k]:
            np.multiply(x, fields[k][..., None], out=x, where=brain)
        if do_blur[k]:
            blurred = ndimage.gaussian_filter(x, sigma=(*sigmas[k], 0.0), mode="reflect")
            np.copyto(x, blurred, where=brain)
        if do_ghost[k]:
            count, axis = (int(v) for v in ghosts[k])
            np.copyto(x, ghosting(x, count, axis, float(ghost_strength[k])), where=brain)
        if do_noise[k]:
            entry, dh, dw, sign = windows[k]
            noise = noise_bank(h, w, m)[int(entry), int(dh):int(dh) + h, int(dw):int(dw) + w]
            np.add(x, noise * np.float32(sign * stds[k]), out=x, where=brain)
    out = dict(batch)
    out["image"] = image
    return out


class _Augment(grain.transforms.RandomMap):
    """`augment_batch` as a grain RandomMap (seeded per element by grain)."""

    def __init__(self, config: AugmentConfig, rows: tuple[int, int] | None = None):
        self._config = config
        self._rows = rows

    def random_map(self, element, rng: np.random.Generator):
        return augment_batch(element, rng, self._config, rows=self._rows)


def stack_train_records(records) -> dict:
    """Stacks slice records into a training batch (numeric keys only, fixed dtypes).

    Args:
      records: B slice records (dicts with the `schema.RECORD_KEYS`).

    Returns:
      image [B, H, W, M] float32, brain_mask [B, H, W] uint8, seg [B, H, W] uint8,
      slice_index [B] int32.
    """
    return {
        "image": np.stack([r["image"] for r in records]).astype(np.float32, copy=False),
        "brain_mask": np.stack([r["brain_mask"] for r in records]).astype(np.uint8, copy=False),
        "seg": np.stack([r["seg"] for r in records]).astype(np.uint8, copy=False),
        "slice_index": np.array([r["slice_index"] for r in records], dtype=np.int32),
    }


def _local_batch(records, step: int, *, global_batch: int, start: int, batch_size: int):
    """Rows start..start+batch_size-1 of global batch `step` of `records`, stacked."""
    first = step * global_batch + start
    return stack_train_records([records[first + j] for j in range(batch_size)])


def make_train_dataset(source, *, batch_size: int, seed: int, augment_config=None,
                       process_index: int = 0, process_count: int = 1,
                       num_epochs: int | None = None) -> grain.MapDataset:
    """The training pipeline as a `grain.MapDataset` of batches (random access, lazy).

    Global batch s is records s*G .. s*G+G-1 of the shuffled, repeated split (G = B x
    process_count); process p reads and augments only its rows p*B .. p*B+B-1. So the
    global batch, and its augmentation, do not depend on how many processes share it: a
    run on N hosts trains on exactly the batches of a run on one, and every process's
    iterator position is the same number (one saved position restores them all).

    Args: as `make_train_iterator`.

    Returns:
      MapDataset whose element i is this process's part of global batch i.
    """
    global_batch = batch_size * process_count
    if len(source) < global_batch:
        raise ValueError(f"{len(source)} training records < global batch size {global_batch} "
                         f"({batch_size} per process x {process_count} processes)")
    records = grain.MapDataset.source(source).seed(seed).shuffle().repeat(num_epochs)
    num_batches = len(records) // global_batch
    start = process_index * batch_size
    ds = grain.MapDataset.range(num_batches).seed(seed).map(functools.partial(
        _local_batch, records, global_batch=global_batch, start=start, batch_size=batch_size))
    augment = AugmentConfig.from_config(augment_config)
    if augment.enabled:
        rows = None if process_count == 1 else (start, global_batch)
        ds = ds.random_map(_Augment(augment, rows))
    return ds


def make_train_iterator(source, *, batch_size: int, seed: int, augment_config,
                        process_index: int = 0, process_count: int = 1,
                        num_epochs: int | None = None, num_threads: int = 4,
                        prefetch: int = 8) -> grain.DatasetIterator:
    """Shuffled, repeated, augmented training batches from a random-access source.

    Pipeline: `MapDataset.source(src).seed(seed).shuffle().repeat(num_epochs)`, cut into
    global batches of B x process_count records of which this process reads its B
    (`make_train_dataset`), `.random_map(augment)`,
    `.to_iter_dataset(ReadOptions(num_threads, prefetch))`.

    Args:
      source: random-access records (`builder.load_split(...)` or any sequence of dicts).
      batch_size: B, per process.
      seed: shuffle and augmentation seed.
      augment_config: `AugmentConfig`, a ConfigDict/dict with its fields, or None (off).
      process_index: this process (e.g. `jax.process_index()`).
      process_count: number of processes; each reads its disjoint rows of every global
        batch.
      num_epochs: None repeats forever.
      num_threads: grain read threads (each builds whole batches).
      prefetch: batches prefetched.

    Returns:
      A grain `DatasetIterator` yielding dicts: image [B, H, W, M] float32, brain_mask
      [B, H, W] uint8, seg [B, H, W] uint8, slice_index [B] int32. Its `get_state()` /
      `set_state(state)` (or `grain.checkpoint.CheckpointSave/CheckpointRestore` inside orbax)
      resume at exactly the next batch.
    """
    ds = make_train_dataset(source, batch_size=batch_size, seed=seed,
                            augment_config=augment_config, process_index=process_index,
                            process_count=process_count, num_epochs=num_epochs)
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(options))


def _as_bytes(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _eval_batch(source, batch_index: int, batch_size: int) -> dict:
    """Records [i*B, min((i+1)*B, N)) stacked and zero-padded to B rows."""
    start = batch_index * batch_size
    stop = min(start + batch_size, len(source))
    records = [source[i] for i in range(start, stop)]
    pad = batch_size - len(records)
    out = {}
    for key in ("image", "brain_mask", "seg"):
        arr = np.stack([np.asarray(r[key]) for r in records])
        out[key] = np.concatenate([arr, np.zeros((pad, *arr.shape[1:]), arr.dtype)])
    out["brain_mask"] = out["brain_mask"].astype(np.uint8)
    out["image"] = out["image"].astype(np.float32)
    out["slice_index"] = np.array([int(r["slice_index"]) for r in records] + [-1] * pad,
                                  dtype=np.int32)
    for key in STRING_KEYS:
        out[key] = np.array([_as_bytes(r[key]) for r in records] + [b""] * pad,
                            dtype=f"S{STRING_WIDTH}")
    out["valid"] = np.arange(batch_size) < len(records)
    return out


def make_eval_batches(source, *, batch_size: int) -> grain.MapDataset:
    """Ordered evaluation batches: every record exactly once, last batch padded.

    Args:
      source: random-access records of an evaluation split (volume after volume).
      batch_size: B (static: the last batch is padded with zeros).

    Returns:
      A `grain.MapDataset` of ceil(N / B) batches (iterate it, or index it). Each batch:
      image [B, H, W, M] float32, brain_mask [B, H, W] uint8, seg [B, H, W] uint8,
      slice_index [B] int32 (-1 on padding), subject_id [B] |S64, kind [B] |S64,
      valid [B] bool.
    """
    num_batches = math.ceil(len(source) / batch_size)
    return grain.MapDataset.range(num_batches).map(
        functools.partial(_eval_batch, source, batch_size=batch_size))
