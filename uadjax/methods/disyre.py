"""DISYRE: diffusion-inspired synthetic restoration (Naval Marimont et al., ISBI 2024; v2
"ensembled cold-diffusion restorations", MICCAI 2024).

No Gaussian noise: the "forward process" inserts synthetic anomalies and the network learns to
remove them. Everything below runs batched in JAX inside the jitted train step.

Corruption of a clean patch x [P, P, C] in [0, 1] (`corrupt`):
  1. A shape on the grid of the anomaly box (side `anomaly_box`, centred on a random brain
     pixel; authors: 64 px at 1 mm): a rectangle (rotated with p = 0.5), a disc (sizes
     U(shape_size); authors 10..44 px, rotation +-15 deg) or an irregular shape filling
     24-100 % of the box, mean 74 % (the authors read theirs from shipped NIfTI files,
     preprocessing/mask_generation.py `RandomMask`; we generate shapes with that fill).
  2. Soft edges: Gaussian blur with sigma ~ U(0, blur_sigma_max), applied with probability
     `blur_p` on the box grid, truncated at 4 sigma and reflected at the box border
     (authors: augment_gaussian_blur, sigma U(0, 5) px at 1 mm, p_per_channel 0.7); the
     mask is zero outside the box and, here, outside the brain.
  3. Foreign-patch interpolation x_c = x (1 - alpha m) + alpha m x_fp, alpha ~ U(0, 1), with
     x_fp a box-sized crop of another slice of the batch taken inside its brain bounding
     box and placed in the anomaly box (authors: preprocessing/fpi.py `FPI`, the same crop
     drawn from a cache of 512 earlier patches).
  4. Optional intensity bias (the authors' "DAG" configuration, `intensity_bias`): the image
     is quantised with a 5-centroid codebook; selected classes inside the shape get +- alpha_b;
     severity alpha = max(alpha_texture, alpha_bias).
The severity is mapped to the timestep the network is conditioned on as the authors do:
t = argmin_t |sqrt(alpha_bar_t) - alpha| on a DDPM schedule (T = 100, linear beta 1e-3..0.2),
so small t = strong anomaly. alpha = 0 (nothing changed) gives t = T - 1.

Training: f(x_c, t) predicts the clean patch, MSE over the patch (`loss_fn`), on random P x P
crops of the training slices.

Anomaly score (`score_fn`), per window of a Gaussian-blended sliding window over the slice:
  single_step  (authors' default, v2) AS = mean_t |x - f(x, t)| over the labels
               `test_labels`: by default t = 0, 3, 13, 24 (severities 1.0 .. 0.73, the strong
               anomalies the paper's Table 1 scores best); the authors' notebook spacing
               t = round(arange(T, 0, -T/N)) - 1 (N = 4: 99, 74, 49, 24) labels faint
               anomalies under their own training mapping (docs/findings.md, D3).
  multi_step   (v1 Algorithm 1) cold-diffusion restoration over the same labels ordered from
               the strongest anomaly to the weakest (0, 3, 13, 24 by default), consistent with
               training: with a_i = sqrt(alpha_bar_{t_i}) the fraction of anomaly assumed at step
               i, x_{i+1} = x0_hat + (a_{i+1} / a_i) (x_i - x0_hat) (a_N = 0, the last step
               returns x0_hat), clipped to [0, 1]; AS = mean_i |x_i - x0_hat_i|.
               The authors' code runs t = 99 -> 24 while indexing the flipped schedule, so it
               conditions on "weak anomaly" labels while stepping as if they were strong ones.
Then AS *= (foreground fraction of the window) * foreground ("DISYRE f.w."), averaged over
channels, and the windows are blended (`uadjax.inference.sliding_window`).

Size: about 560 lines: a method is one module (corruption, shapes, restoration, sliding-
window score); splitting it would scatter one method over several files.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uadjax import diffusion
from uadjax.inference.patches import patch_positions
from uadjax.inference.sliding_window import gaussian_importance, sliding_window
from uadjax.inference.sweep import sweep
from uadjax.methods.base import Method, Stage
from uadjax.models import make_model

STAGE = "restoration"
SHAPES = ("square", "disc", "blob")
SCORE_MODES = ("single_step", "multi_step")
FP_NORMALISATIONS = ("none", "minmax")
# Authors' bias codebook (preprocessing/bias.py): intensity classes of [0, 1] brain images.
BIAS_CODEBOOK = (0.00565, 0.38284, 0.61224, 0.76921, 0.93855)


# ------------------------------------------------------------------------------------------
# Severity <-> timestep.

def severity_schedule(dcfg) -> np.ndarray:
    """[T] sqrt(alpha_bar_t) of the linear-beta DDPM schedule that labels severities.

    Decreasing from about 1 (t = 0: the strongest anomaly) to about 0 (t = T - 1).
    """
    betas = diffusion.linear_betas(int(dcfg.num_timesteps), float(dcfg.beta_start),
                                   float(dcfg.beta_end))
    return np.sqrt(np.cumprod(1.0 - betas.astype(np.float64))).astype(np.float32)


def severity_to_t(alpha: jax.Array, sqrt_alpha_bar) -> jax.Array:
    """alpha [...] in [0, 1] -> int32 t = argmin_t |sqrt_alpha_bar[t] - alpha| (ties: smaller t)."""
    table = jnp.asarray(sqrt_alpha_bar)
    return jnp.argmin(jnp.abs(alpha[..., None] - table), axis=-1).astype(jnp.int32)


def test_labels(scfg) -> np.ndarray:
    """[N] int32 severity labels t the score conditions on: `test_timesteps` when set, else
    the authors' `inference_timesteps(num_timesteps, num_test_timesteps)`."""
    explicit = scfg.get("test_timesteps", None)
    if explicit is None:
        return inference_timesteps(int(scfg.num_timesteps), int(scfg.num_test_timesteps))
    labels = np.asarray(explicit, np.int32).reshape(-1)
    if labels.size == 0 or labels.min() < 0 or labels.max() >= int(scfg.num_timesteps):
        raise ValueError(f"disyre.test_timesteps {explicit} must be labels in "
                         f"[0, {int(scfg.num_timesteps) - 1}]")
    return labels


def inference_timesteps(num_timesteps: int, count: int) -> np.ndarray:
    """The authors' 'trailing' spacing, round(arange(T, 0, -T/N)) - 1: [99, 74, 49, 24] (N = 4)."""
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"need 1 <= number of test timesteps <= {num_timesteps}, got {count}")
    return (np.round(np.arange(num_timesteps, 0, -num_timesteps / count)) - 1).astype(np.int32)


# ------------------------------------------------------------------------------------------
# Shapes and soft masks.

def gaussian_blur(images: jax.Array, sigma: jax.Array, max_sigma: float, *,
                  truncate: float = 4.0, mode: str = "reflect") -> jax.Array:
    """Per-image isotropic Gaussian blur, as scipy.ndimage.gaussian_filter(image, s,
    mode=mode, truncate=truncate) (the authors' augment_gaussian_blur calls it with scipy's
    defaults: 'reflect', truncated at 4 sigma).

    images [N, H, W], sigma [N] (pixels, <= max_sigma; 0 leaves the image unchanged) ->
    [N, H, W]. Each image is K_H @ image @ K_W^T with banded matrices: kernel radius
    int(truncate s + 1/2), normalised over its support; 'reflect' folds the taps that fall
    past a border back inside (period 2 L), 'constant' drops them (zero padding).
    """
    if mode not in ("reflect", "constant"):
        raise ValueError(f"gaussian_blur mode must be 'reflect' or 'constant', not {mode!r}")
    reach = int(truncate * float(max_sigma) + 0.5)
    offsets = jnp.arange(-reach, reach + 1, dtype=jnp.int32)

    def kernel_matrix(length, s):
        radius = jnp.floor(truncate * s + 0.5)
        d = offsets.astype(jnp.float32)
        taps = jnp.where(jnp.abs(d) <= radius,
                         jnp.exp(-0.5 * (d / jnp.maximum(s, 1e-6)) ** 2), 0.0)
        taps = jnp.where(s > 0, taps / jnp.sum(taps), (offsets == 0).astype(jnp.float32))
        source = jnp.arange(length)[:, None] + offsets[None, :]          # [L, taps]
        if mode == "reflect":
            folded = jnp.mod(source, 2 * length)
            source = jnp.where(folded >= length, 2 * length - 1 - folded, folded)
            weights = jnp.broadcast_to(taps, source.shape)
        else:
            weights = jnp.where((source >= 0) & (source < length), taps, 0.0)
            source = jnp.clip(source, 0, length - 1)
        return jnp.sum(jax.nn.one_hot(source, length) * weights[..., None], axis=1)

    def one(image, s):
        kh, kw = kernel_matrix(image.shape[0], s), kernel_matrix(image.shape[1], s)
        return kh @ image @ kw.T

    return jax.vmap(one)(images.astype(jnp.float32), sigma.astype(jnp.float32))


def blob_fill_fractions(key: jax.Array, n: int, scfg) -> jax.Array:
    """[N] share of the anomaly box an irregular shape fills: 1 - (1 - lo) u^k with u
    uniform, lo, hi = `blob_fill` and k set so that the mean is `blob_fill_mean`.

    The authors' shipped 3D shapes, middle slice zoomed by 1/s (s in [0.5, 1]) and cut to
    the box, fill 24-100 % of it with a mean of 74 % (issue 22's measurement): a law with
    that range and mean, and many shapes cut to the whole box by the zoom.
    """
    lo, hi = (float(v) for v in scfg.blob_fill)
    mean = float(scfg.blob_fill_mean)
    if not 0.0 < lo < mean < hi <= 1.0:
        raise ValueError(f"disyre.blob_fill {scfg.blob_fill} must hold blob_fill_mean {mean}")
    # E[1 - (1 - lo) u^k] = 1 - (1 - lo) / (k + 1); capped at hi.
    k = (1.0 - lo) / (1.0 - mean) - 1.0
    u = jax.random.uniform(key, (n,))
    return jnp.minimum(1.0 - (1.0 - lo) * u**k, hi)


def irregular_shapes(key: jax.Array, fill: jax.Array, box: int) -> jax.Array:
    """Irregular compact shapes on the box grid, each filling the share `fill` [N] of it.

    A smooth random field (a 4 x 4 Gaussian grid, cubic-upsampled, unit std) minus a radial
    bowl of depth 3 at the box edge, thresholded at its (1 - fill) quantile: one lumpy shape
    around the box centre (a single component in >= 95 % of draws), whose outline varies
    from round to lobed. Returns [N, box, box] float32 in {0, 1}.
    """
    n = fill.shape[0]
    coarse = jax.random.normal(key, (n, 4, 4))
    field = jax.image.resize(coarse, (n, box, box), "cubic")
    field = field / jnp.maximum(jnp.std(field, axis=(1, 2), keepdims=True), 1e-6)
    centre = (box - 1) / 2.0
    grid = (jnp.arange(box, dtype=jnp.float32) - centre) / max(centre, 1.0)
    field = field - 3.0 * (grid[:, None] ** 2 + grid[None, :] ** 2)
    flat = field.reshape(n, -1)
    threshold = jax.vmap(jnp.quantile)(flat, 1.0 - fill)
    full = fill >= 1.0
    shapes = (flat >= threshold[:, None]) | full[:, None]
    return shapes.reshape(n, box, box).astype(jnp.float32)


def shape_masks(key: jax.Array, n: int, scfg) -> jax.Array:
    """Hard random shapes on the anomaly box grid (the authors' CreateRandomShape).

    A third each (`shapes`): rectangles with sides U(shape_size), rotated by up to
    `rotation_deg` with probability `square_rotation_p` (RandomSquare); discs of diameter
    U(shape_size) (RandomSphere); irregular shapes with the fill of `blob_fill_fractions`
    (RandomMask: the authors' shipped shapes, generated here). Rectangles and discs are
    offset at random inside the box.

    Args:
      key: PRNG key.
      n: number of shapes.
      scfg: the `disyre` config (shapes, shape_size, anomaly_box, rotation_deg,
        square_rotation_p, blob_fill, blob_fill_mean).
    Returns:
      [N, A, A] float32 in {0, 1}, A = anomaly_box.
    """
    box = int(scfg.anomaly_box)
    kinds = [SHAPES.index(s) for s in scfg.shapes]
    keys = jax.random.split(key, 7)
    kind = jnp.asarray(kinds, jnp.int32)[jax.random.randint(keys[0], (n,), 0, len(kinds))]
    lo, hi = float(scfg.shape_size[0]), float(scfg.shape_size[1])
    extent = jax.random.uniform(keys[1], (n, 2), minval=lo, maxval=hi)  # side / diameter
    # The shape stays inside the box: centre offset up to (box - extent) / 2.
    slack = jnp.maximum(float(box) - jnp.max(extent, axis=-1, keepdims=True), 0.0)
    center = (box - 1) / 2.0 + (jax.random.uniform(keys[2], (n, 2)) - 0.5) * slack
    max_angle = math.radians(float(scfg.rotation_deg))
    angle = jax.random.uniform(keys[3], (n,), minval=-max_angle, maxval=max_angle)
    rotate_square = jax.random.bernoulli(keys[4], float(scfg.square_rotation_p), (n,))
    angle = jnp.where((kind == 0) & ~rotate_square, 0.0, angle)
    blobs = irregular_shapes(keys[6], blob_fill_fractions(keys[5], n, scfg), box)
    grid_r, grid_c = jnp.meshgrid(jnp.arange(box, dtype=jnp.float32),
                                  jnp.arange(box, dtype=jnp.float32), indexing="ij")

    def one(k, ext, ctr, ang, blob):
        dr, dc = grid_r - ctr[0], grid_c - ctr[1]
        cos, sin = jnp.cos(ang), jnp.sin(ang)
        u, v = cos * dr + sin * dc, -sin * dr + cos * dc
        square = (jnp.abs(u) <= ext[0] / 2) & (jnp.abs(v) <= ext[1] / 2)
        disc = jnp.sqrt(u * u + v * v) <= ext[0] / 2
        return jnp.select([k == 0, k == 1], [square, disc], blob > 0).astype(jnp.float32)

    return jax.vmap(one)(kind, extent, center, angle, blobs)


def sample_box_centers(key: jax.Array, brain: jax.Array, box: int) -> tuple[jax.Array, jax.Array]:
    """A random brain pixel per image at least box/2 from the border (authors' GetRandomLocation).

    brain [N, P, P] -> (centres [N, 2] int32, found [N] bool: False when no such pixel).
    """
    n, height, width = brain.shape
    half = box // 2

    def inner(length):  # [length] bool: positions >= half from both ends (all if none are)
        pos = jnp.arange(length)
        return (pos >= half) & (pos < length - half) if length > 2 * half else pos >= 0

    inner_r, inner_c = inner(height), inner(width)
    allowed = (brain > 0) & inner_r[None, :, None] & inner_c[None, None, :]
    logits = jnp.where(allowed.reshape(n, -1), 0.0, -jnp.inf)
    found = jnp.any(allowed.reshape(n, -1), axis=-1)
    flat = jax.random.categorical(key, jnp.where(found[:, None], logits, 0.0), axis=-1)
    centers = jnp.stack([flat // width, flat % width], axis=-1).astype(jnp.int32)
    return centers, found


def box_corners(centers: jax.Array, box: int, hw: tuple[int, int]) -> jax.Array:
    """[N, 2] int32 top-left corner of each anomaly box [c - box // 2, c + box // 2), moved
    inside the H x W grid where it would cross a border."""
    limit = jnp.maximum(jnp.asarray(hw, jnp.int32) - box, 0)
    return jnp.clip(centers.astype(jnp.int32) - box // 2, 0, limit)


def paste_boxes(boxes: jax.Array, corners: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """Places box-sized arrays [N, A, A, ...] at `corners` [N, 2] on zero grids
    [N, H, W, ...] (what falls outside the grid is dropped)."""
    box = boxes.shape[1]
    rows, cols = jnp.arange(hw[0]), jnp.arange(hw[1])

    def one(content, corner):
        r, c = rows - corner[0], cols - corner[1]
        inside = ((r >= 0) & (r < box))[:, None] & ((c >= 0) & (c < box))[None, :]
        picked = content[jnp.clip(r, 0, box - 1)][:, jnp.clip(c, 0, box - 1)]
        shape = inside.shape + (1,) * (content.ndim - 2)
        return jnp.where(inside.reshape(shape), picked, 0.0)

    return jax.vmap(one)(boxes, corners)


def soft_anomaly_masks(key: jax.Array, brain: jax.Array, scfg) -> tuple[jax.Array, jax.Array]:
    """Random soft masks m in [0, 1], zero outside the anomaly box and the brain.

    The shape is drawn and blurred on the box grid (sigma ~ U(0, blur_sigma_max) with
    probability `blur_p`, truncated at 4 sigma, reflected at the box border, as the
    authors' augment_gaussian_blur), then placed in the box around a brain pixel.

    brain [N, P, P] -> (m [N, P, P] float32, all zero where the patch has no brain;
    corners [N, 2] int32 of the boxes).
    """
    n = brain.shape[0]
    box = int(scfg.anomaly_box)
    k_center, k_shape, k_blur, k_sigma = jax.random.split(key, 4)
    centers, found = sample_box_centers(k_center, brain, box)
    corners = box_corners(centers, box, brain.shape[1:])
    hard = shape_masks(k_shape, n, scfg)
    sigma = jax.random.uniform(k_sigma, (n,), maxval=float(scfg.blur_sigma_max))
    sigma = jnp.where(jax.random.bernoulli(k_blur, float(scfg.blur_p), (n,)), sigma, 0.0)
    soft = jnp.clip(gaussian_blur(hard, sigma, float(scfg.blur_sigma_max)), 0.0, 1.0)
    m = paste_boxes(soft, corners, brain.shape[1:])
    return m * (brain > 0) * found[:, None, None], corners


# ------------------------------------------------------------------------------------------
# Corruption.

def foreign_patches(key: jax.Array, x: jax.Array, brain: jax.Array, corners: jax.Array,
                    box: int) -> jax.Array:
    """Foreign patches as the authors' FPI: a box x box crop of another image of the batch,
    at a random position inside that image's brain bounding box (CropForeground +
    RandomCropTransform), placed in this image's anomaly box.

    x [B, P, P, C]; brain [B, P, P]; corners [B, 2] int32 (`box_corners`) ->
    [B, P, P, C], zero outside the boxes. The source is a random other image when B > 1.
    """
    b, height, width, c = x.shape
    k_src, k_row, k_col = jax.random.split(key, 3)
    step = jax.random.randint(k_src, (b,), 1, max(b, 2)) if b > 1 else jnp.zeros((1,), jnp.int32)
    source = (jnp.arange(b) + step) % b
    src, src_brain = x[source], brain[source] > 0

    def origin(key, occupied, length):  # [B] start of the crop inside the bounding box
        first = jnp.argmax(occupied, axis=-1)
        last = length - 1 - jnp.argmax(occupied[:, ::-1], axis=-1)
        last = jnp.where(jnp.any(occupied, axis=-1), last, length - 1)
        high = jnp.maximum(first, last - box + 1)
        start = jax.random.randint(key, (b,), first, high + 1)
        return jnp.clip(start, 0, max(length - box, 0))

    rows = origin(k_row, jnp.any(src_brain, axis=2), height)
    cols = origin(k_col, jnp.any(src_brain, axis=1), width)
    size = (min(box, height), min(box, width), c)
    crops = jax.vmap(lambda img, r, col: jax.lax.dynamic_slice(img, (r, col, 0), size))(
        src, rows, cols)
    return paste_boxes(crops, corners, (height, width))


def minmax_to_region(fp: jax.Array, x: jax.Array, m: jax.Array) -> jax.Array:
    """Authors' normalize_fp='minmax': the foreign patch's range inside the shape (m > 0) is
    mapped onto the target image's range there, then clipped to [0, 1].

    fp, x [B, P, P, C]; m [B, P, P] -> [B, P, P, C].
    """
    inside = (m > 0)[..., None]
    big = jnp.float32(1e9)

    def lo_hi(a):
        lo = jnp.min(jnp.where(inside, a, big), axis=(1, 2), keepdims=True)
        hi = jnp.max(jnp.where(inside, a, -big), axis=(1, 2), keepdims=True)
        return lo, hi

    (f_lo, f_hi), (x_lo, x_hi) = lo_hi(fp), lo_hi(x)
    scaled = (fp - f_lo) / jnp.maximum(f_hi - f_lo, 1e-6) * (x_hi - x_lo) + x_lo
    any_inside = jnp.any(inside, axis=(1, 2), keepdims=True)
    return jnp.where(any_inside, jnp.clip(scaled, 0.0, 1.0), fp)


def intensity_bias(key: jax.Array, x: jax.Array, m: jax.Array, scfg):
    """Authors' DAG intensity bias (preprocessing/bias.py), per image and channel.

    Pixels are assigned to the nearest codebook intensity; class k is selected with
    probability n_k / (sum n + count_offset) (n_k = its pixels inside the shape; if none is
    selected, all are); the selected classes, blurred (sigma 1), get +- alpha_b inside m.

    x [B, P, P, C] in [0, 1]; m [B, P, P] -> (biased x [B, P, P, C], alpha_bias [B]).
    """
    b, height, width, c = x.shape
    codebook = jnp.asarray(scfg.bias_codebook, jnp.float32)
    k_sel, k_amp, k_sign = jax.random.split(key, 3)
    classes = jnp.argmin(jnp.abs(x[..., None] - codebook), axis=-1)       # [B, P, P, C]
    one_hot = jax.nn.one_hot(classes, codebook.shape[0])                   # [B, P, P, C, K]
    counts = jnp.sum(one_hot * (m > 0)[..., None, None], axis=(1, 2))      # [B, C, K]
    prob = counts / (jnp.sum(counts, axis=-1, keepdims=True) + float(scfg.bias_count_offset))
    selected = jax.random.uniform(k_sel, prob.shape) < prob
    selected = jnp.where(jnp.any(selected, axis=-1, keepdims=True), selected, True)
    indicator = jnp.sum(one_hot * selected[:, None, None].astype(jnp.float32), axis=-1)
    flat = jnp.moveaxis(indicator, -1, 1).reshape(b * c, height, width)
    sigma = jnp.full((b * c,), float(scfg.bias_blur_sigma))
    blurred = gaussian_blur(flat, sigma, float(scfg.bias_blur_sigma))
    bias_mask = jnp.moveaxis(blurred.reshape(b, c, height, width), 1, -1)
    amplitude = jax.random.uniform(k_amp, (b, 1, 1, 1))
    sign = jnp.where(jax.random.bernoulli(k_sign, 0.5, (b, 1, 1, 1)), 1.0, -1.0)
    weight = m[..., None] * bias_mask
    biased = jnp.clip(x * (1.0 - weight) + (x + sign * amplitude) * weight, 0.0, 1.0)
    alpha_bias = jnp.max(jnp.abs(biased - x), axis=(1, 2, 3))
    return biased, alpha_bias


def interpolate(x: jax.Array, fp: jax.Array, m: jax.Array, alpha: jax.Array) -> jax.Array:
    """Foreign-patch interpolation x (1 - alpha m) + alpha m fp.

    x, fp [B, P, P, C]; m [B, P, P]; alpha [B] -> [B, P, P, C].
    """
    w = alpha[:, None, None, None] * m[..., None]
    return x * (1.0 - w) + w * fp


def corrupt(key: jax.Array, x: jax.Array, brain: jax.Array, scfg):
    """Synthetic anomalies on clean patches.

    Args:
      key: PRNG key.
      x: [B, P, P, C] clean patches in [0, 1].
      brain: [B, P, P] brain mask (anomalies only inside).
      scfg: the `disyre` config.
    Returns:
      (x_c [B, P, P, C], alpha [B] severity in [0, 1] (0 where nothing changed), m [B, P, P]).
    """
    k_mask, k_fp, k_alpha, k_bias, k_apply = jax.random.split(key, 5)
    m, corners = soft_anomaly_masks(k_mask, brain, scfg)
    m = m * jax.random.bernoulli(k_apply, float(scfg.p_anomaly), (x.shape[0],))[:, None, None]
    fp = foreign_patches(k_fp, x, brain, corners, int(scfg.anomaly_box))
    if scfg.normalize_fp == "minmax":
        fp = minmax_to_region(fp, x, m)
    elif scfg.normalize_fp != "none":
        raise ValueError(f"unknown disyre.normalize_fp {scfg.normalize_fp!r}; "
                         f"use one of {FP_NORMALISATIONS}")
    alpha = jax.random.uniform(k_alpha, (x.shape[0],))
    x_c = interpolate(x, fp, m, alpha)
    if scfg.intensity_bias:
        x_c, alpha_bias = intensity_bias(k_bias, x_c, m, scfg)
        alpha = jnp.maximum(alpha, alpha_bias)
    changed = jnp.any(x_c != x, axis=(1, 2, 3))
    return x_c, jnp.where(changed, alpha, 0.0), m


# ------------------------------------------------------------------------------------------
# Training.

def random_crops(key: jax.Array, batch: dict, size: int) -> tuple[jax.Array, jax.Array]:
    """Uniform random size x size crops (inside the image) of image [B, H, W, C] and
    brain_mask [B, H, W] -> ([B, P, P, C], [B, P, P])."""
    image, brain = batch["image"], batch["brain_mask"]
    b, height, width, c = image.shape
    if size > min(height, width):
        raise ValueError(f"disyre.patch_size {size} is larger than the {height}x{width} slices")
    k_r, k_c = jax.random.split(key)
    rows = jax.random.randint(k_r, (b,), 0, height - size + 1)
    cols = jax.random.randint(k_c, (b,), 0, width - size + 1)

    def crop(img, msk, r, col):
        return (jax.lax.dynamic_slice(img, (r, col, 0), (size, size, c)),
                jax.lax.dynamic_slice(msk, (r, col), (size, size)))

    return jax.vmap(crop)(image, brain.astype(jnp.float32), rows, cols)


def make_restorer(config, rngs: nnx.Rngs) -> nnx.Module:
    """The `config.model` UNet f(x_c, t) -> clean image; it must take a timestep."""
    if not config.model.get("use_timestep", True):
        raise ValueError("DISYRE conditions the network on t: set config.model.use_timestep = True")
    return make_model(config.model, rngs=rngs)


def loss_fn(model, batch, key, config):
    """MSE between f(corrupt(x), t(alpha)) and x on random patches -> (loss, metrics)."""
    scfg = config.disyre
    k_crop, k_corrupt, k_drop = jax.random.split(key, 3)
    x, brain = random_crops(k_crop, batch, int(scfg.patch_size))
    x_c, alpha, _ = corrupt(k_corrupt, x, brain, scfg)
    t = severity_to_t(alpha, severity_schedule(scfg))
    restored = model(x_c, t, deterministic=False, rngs=nnx.Rngs(dropout=k_drop))
    loss = jnp.mean(jnp.square(restored - x))
    return loss, {"mean_severity": jnp.mean(alpha)}


# ------------------------------------------------------------------------------------------
# Anomaly score.

def restore_single_step(model, x: jax.Array, timesteps) -> tuple[jax.Array, jax.Array]:
    """Ensemble of one-step restorations.

    x [B, P, P, C]; timesteps [N] -> (AS [B, P, P, C] = mean_t |x - f(x, t)|,
    mean restoration [B, P, P, C]). The N labels run as one vmapped sweep.
    """
    def one(t):
        return model(x, jnp.full((x.shape[0],), t, jnp.int32))

    restored = sweep(one, jnp.asarray(timesteps, jnp.int32))        # [N, B, P, P, C]
    return jnp.mean(jnp.abs(x[None] - restored), axis=0), jnp.mean(restored, axis=0)


def restore_multi_step(model, x: jax.Array, timesteps, sqrt_alpha_bar):
    """Cold-diffusion restoration over labels ordered from the strongest anomaly to the weakest.

    x [B, P, P, C]; timesteps [N] (ascending t = decreasing severity) ->
    (AS [B, P, P, C] = mean_i |x_i - x0_hat_i|, restored x [B, P, P, C]).
    """
    ts = np.sort(np.asarray(timesteps))
    a = np.asarray(sqrt_alpha_bar)[ts]
    ratios = np.append(a[1:] / a[:-1], 0.0).astype(np.float32)    # a_{i+1} / a_i; 0 at the end

    def step(carry, inputs):
        x_i, acc = carry
        t, ratio = inputs
        x0_hat = model(x_i, jnp.full((x_i.shape[0],), t, jnp.int32))
        acc = acc + jnp.abs(x_i - x0_hat)
        x_next = jnp.clip(x0_hat + ratio * (x_i - x0_hat), 0.0, 1.0)
        return (x_next, acc), None

    (restored, acc), _ = jax.lax.scan(step, (x, jnp.zeros_like(x)),
                                      (jnp.asarray(ts, jnp.int32), jnp.asarray(ratios)))
    return acc / len(ts), restored


def window_score(model, window: dict, config) -> dict:
    """Score of one window: {'image' [B, P, P, C], 'foreground' [B, P, P]} ->
    {'score' [B, P, P], 'reconstruction' [B, P, P, C]}."""
    scfg = config.disyre
    x, fg = window["image"], window["foreground"]
    timesteps = test_labels(scfg)
    if scfg.score_mode == "single_step":
        residual, rec = restore_single_step(model, x, timesteps)
    elif scfg.score_mode == "multi_step":
        residual, rec = restore_multi_step(model, x, timesteps, severity_schedule(scfg))
    else:
        raise ValueError(f"unknown disyre.score_mode {scfg.score_mode!r}; use one of {SCORE_MODES}")
    score = jnp.mean(residual, axis=-1)
    if scfg.foreground_weighting:
        score = score * jnp.mean(fg, axis=(1, 2))[:, None, None] * fg
    return {"score": score, "reconstruction": rec}


def foreground(batch: dict, kind: str) -> jax.Array:
    """[B, H, W] float32 foreground: 'brain_mask' or 'nonzero' (authors: x > 0, any channel)."""
    if kind == "brain_mask":
        return (batch["brain_mask"] > 0).astype(jnp.float32)
    if kind == "nonzero":
        return jnp.any(batch["image"] > 0, axis=-1).astype(jnp.float32)
    raise ValueError(f"unknown disyre.foreground {kind!r}; use 'brain_mask' or 'nonzero'")


def score_fn(models, batch, key, config):
    """Sliding-window DISYRE score of whole slices -> {'score' [B, H, W],
    'reconstruction' [B, H, W, C]} (deterministic: `key` is unused)."""
    scfg = config.disyre
    size = int(scfg.patch_size)
    inputs = {"image": batch["image"], "foreground": foreground(batch, scfg.foreground)}
    weights = gaussian_importance(size, float(scfg.window_sigma_scale))
    return sliding_window(lambda w: window_score(models[STAGE], w, config), inputs,
                          window=size, step=int(scfg.window_step), weights=weights,
                          chunk_size=scfg.get("window_chunk", None))


def network_evaluations(config) -> dict[str, float]:
    """Windows x test labels restorer passes per slice (on P x P windows, not whole slices)."""
    scfg = config.disyre
    size = int(scfg.patch_size)
    h, w = config.data.image_size
    windows = patch_positions((max(h, size), max(w, size)), size, int(scfg.window_step))
    return {"restorer (window)": windows.shape[0] * len(test_labels(scfg))}


METHOD = Method(
    name="disyre",
    stages=(Stage(name=STAGE, make_model=make_restorer, loss_fn=loss_fn),),
    score_fn=score_fn,
    network_evaluations=network_evaluations,
)
