"""Noise generators for the forward process: Gaussian and multi-octave (legacy) OpenSimplex.

Every generator has the signature `noise_fn(key, shape, t=None) -> array` (extra options bound
with `functools.partial`), draws all its randomness from `key`, and traces under `jax.jit`
with a static `shape`. `t` is the diffusion timestep the noise is drawn for (scalar or `[B]`):
every caller passes it, and only AnoDDPM's `simplex_noise_3d` (a z = t slice of 3D noise)
uses it.

The simplex noise is a vectorised `jnp` port of Kurt Spencer's legacy OpenSimplex (the
algorithm of pip `opensimplex` 0.4.x and of the numba fork used by Behrendt pDDPM / cDDPM and
AnoDDPM). A noise map is defined by a 256-entry permutation table; `simplex_noise` draws the
table from a JAX key (`jax.random.permutation(key, 256)`), and `opensimplex_perm(seed)`
rebuilds the table pip `opensimplex` derives from an integer seed, so reference maps can be
reproduced exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

STRETCH_CONSTANT_2D = -0.211324865405187  # (1 / sqrt(2 + 1) - 1) / 2
SQUISH_CONSTANT_2D = 0.366025403784439  # (sqrt(2 + 1) - 1) / 2
NORM_CONSTANT_2D = 47.0
STRETCH_CONSTANT_3D = -1.0 / 6.0  # (1 / sqrt(3 + 1) - 1) / 3
SQUISH_CONSTANT_3D = 1.0 / 3.0  # (sqrt(3 + 1) - 1) / 3
NORM_CONSTANT_3D = 103.0

# 8 gradients approximating the directions to the vertices of an octagon, (gx, gy) pairs.
# fmt: off
GRADIENTS_2D = np.array([5, 2, 2, 5, -5, 2, -2, 5, 5, -2, 2, -5, -5, -2, -2, -5], np.int32)
# 24 gradients (rhombicuboctahedron vertices, skewed), (gx, gy, gz) triples.
GRADIENTS_3D = np.array(
    [-11, 4, 4, -4, 11, 4, -4, 4, 11, 11, 4, 4, 4, 11, 4, 4, 4, 11,
     -11, -4, 4, -4, -11, 4, -4, -4, 11, 11, -4, 4, 4, -11, 4, 4, -4, 11,
     -11, 4, -4, -4, 11, -4, -4, 4, -11, 11, 4, -4, 4, 11, -4, 4, 4, -11,
     -11, -4, -4, -4, -11, -4, -4, -4, -11, 11, -4, -4, 4, -11, -4, 4, -4, -11],
    np.int32,
)
# fmt: on

# Lattice offsets (relative to the stretched super-cell origin) whose kernel can reach a point
# of that cell (|d|^2 < 2 in squished space); found by exhaustive search over {-3..4}^3.
# fmt: off
_OFFSETS_3D = np.array(
    [(-1, 0, 1), (-1, 1, 0), (-1, 1, 1), (0, -1, 1), (0, 0, 0), (0, 0, 1), (0, 0, 2),
     (0, 1, -1), (0, 1, 0), (0, 1, 1), (0, 1, 2), (0, 2, 0), (0, 2, 1), (1, -1, 0),
     (1, -1, 1), (1, 0, -1), (1, 0, 0), (1, 0, 1), (1, 0, 2), (1, 1, -1), (1, 1, 0),
     (1, 1, 1), (1, 2, 0), (2, 0, 0), (2, 0, 1), (2, 1, 0)],
    np.int32,
)
# fmt: on


def gaussian_noise(key: jax.Array, shape: tuple[int, ...], t=None) -> jax.Array:
    """Standard normal noise.

    Args:
        key: JAX PRNG key.
        shape: output shape, e.g. `(B, H, W, C)`.
        t: ignored (the noise does not depend on the timestep).

    Returns:
        float32 array of `shape`, N(0, 1) entries.
    """
    return jax.random.normal(key, shape, dtype=jnp.float32)


def opensimplex_perm(seed: int) -> np.ndarray:
    """The permutation table pip `opensimplex` (0.4.x) builds for an integer seed (host-side).

    Args:
        seed: any Python int (interpreted as signed 64-bit, as `opensimplex.seed` does).

    Returns:
        `[256]` int32 permutation of 0..255.
    """

    def wrap(v: int) -> int:
        v &= (1 << 64) - 1
        return v - (1 << 64) if v >= (1 << 63) else v

    mul, inc = 6364136223846793005, 1442695040888963407
    s = wrap(seed)
    for _ in range(3):
        s = wrap(s * mul + inc)
    source = list(range(256))
    perm = np.zeros(256, np.int32)
    for i in range(255, -1, -1):
        s = wrap(s * mul + inc)
        r = (s + 31) % (i + 1)  # Python's % is already non-negative here.
        perm[i] = source[r]
        source[r] = source[i]
    return perm


def perm_from_key(key: jax.Array) -> jax.Array:
    """A random `[256]` int32 permutation table drawn from `key` (jit-friendly)."""
    return jax.random.permutation(key, 256).astype(jnp.int32)


def _grad_dot_2d(perm, xsv, ysv, dx, dy):
    """attn^4 * <gradient(xsv, ysv), (dx, dy)> for attn = 2 - dx^2 - dy^2 > 0, else 0."""
    attn = 2.0 - dx * dx - dy * dy
    idx = jnp.bitwise_and(perm[jnp.bitwise_and(perm[jnp.bitwise_and(xsv, 255)] + ysv, 255)], 14)
    grads = jnp.asarray(GRADIENTS_2D, jnp.float32)
    ext = grads[idx] * dx + grads[idx + 1] * dy
    a2 = jnp.square(jnp.maximum(attn, 0.0))
    return jnp.where(attn > 0.0, a2 * a2 * ext, 0.0)


def opensimplex2(x: jax.Array, y: jax.Array, *, perm: jax.Array) -> jax.Array:
    """Legacy OpenSimplex 2D noise at points (x, y), vectorised (branches become selects).

    Args:
        x: float array of x coordinates (any shape).
        y: float array of y coordinates, broadcastable with x.
        perm: `[256]` int permutation table (`perm_from_key` or `opensimplex_perm`).

    Returns:
        float32 array of the broadcast shape, values in about [-1, 1]; equal to pip
        `opensimplex`'s `noise2(x, y)` for the same table (up to float32 rounding).
    """
    perm = jnp.asarray(perm, jnp.int32)
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    x, y = jnp.broadcast_arrays(x, y)
    sq = SQUISH_CONSTANT_2D
    stretch = (x + y) * STRETCH_CONSTANT_2D
    xs, ys = x + stretch, y + stretch
    xsb_f, ysb_f = jnp.floor(xs), jnp.floor(ys)
    squish = (xsb_f + ysb_f) * sq
    xins, yins = xs - xsb_f, ys - ysb_f
    in_sum = xins + yins
    dx0 = x - (xsb_f + squish)
    dy0 = y - (ysb_f + squish)
    xsb, ysb = xsb_f.astype(jnp.int32), ysb_f.astype(jnp.int32)

    # Contributions (1, 0) and (0, 1).
    value = _grad_dot_2d(perm, xsb + 1, ysb, dx0 - 1 - sq, dy0 - sq)
    value = value + _grad_dot_2d(perm, xsb, ysb + 1, dx0 - sq, dy0 - 1 - sq)

    x_gt_y = xins > yins
    lower = in_sum <= 1  # Inside the triangle at (0, 0), else the one at (1, 1).
    zins_lo = 1 - in_sum
    near_lo = (zins_lo > xins) | (zins_lo > yins)
    zins_hi = 2 - in_sum
    near_hi = (zins_hi < xins) | (zins_hi < yins)

    # Extra vertex, lower triangle.
    lo_xsv = jnp.where(near_lo, jnp.where(x_gt_y, xsb + 1, xsb - 1), xsb + 1)
    lo_ysv = jnp.where(near_lo, jnp.where(x_gt_y, ysb - 1, ysb + 1), ysb + 1)
    lo_dx = jnp.where(near_lo, jnp.where(x_gt_y, dx0 - 1, dx0 + 1), dx0 - 1 - 2 * sq)
    lo_dy = jnp.where(near_lo, jnp.where(x_gt_y, dy0 + 1, dy0 - 1), dy0 - 1 - 2 * sq)
    # Extra vertex, upper triangle.
    hi_xsv = jnp.where(near_hi, jnp.where(x_gt_y, xsb + 2, xsb), xsb)
    hi_ysv = jnp.where(near_hi, jnp.where(x_gt_y, ysb, ysb + 2), ysb)
    hi_dx = jnp.where(near_hi, jnp.where(x_gt_y, dx0 - 2 - 2 * sq, dx0 - 2 * sq), dx0)
    hi_dy = jnp.where(near_hi, jnp.where(x_gt_y, dy0 - 2 * sq, dy0 - 2 - 2 * sq), dy0)

    xsv_ext = jnp.where(lower, lo_xsv, hi_xsv)
    ysv_ext = jnp.where(lower, lo_ysv, hi_ysv)
    dx_ext = jnp.where(lower, lo_dx, hi_dx)
    dy_ext = jnp.where(lower, lo_dy, hi_dy)

    # Contribution (0, 0) or (1, 1).
    xsb0 = jnp.where(lower, xsb, xsb + 1)
    ysb0 = jnp.where(lower, ysb, ysb + 1)
    dx0 = jnp.where(lower, dx0, dx0 - 1 - 2 * sq)
    dy0 = jnp.where(lower, dy0, dy0 - 1 - 2 * sq)
    value = value + _grad_dot_2d(perm, xsb0, ysb0, dx0, dy0)
    value = value + _grad_dot_2d(perm, xsv_ext, ysv_ext, dx_ext, dy_ext)
    return value / NORM_CONSTANT_2D


def opensimplex3(x: jax.Array, y: jax.Array, z: jax.Array, *, perm: jax.Array) -> jax.Array:
    """OpenSimplex 3D noise at points (x, y, z), as the full kernel sum over the lattice.

    Every lattice vertex within the kernel radius contributes attn^4 <g, d> with
    attn = 2 - |d|^2 (the legacy constants, gradients and hashing). The legacy code visits only
    6-8 vertices per point and drops a few contributions that are tiny but non-zero, so this
    (continuous) version differs from pip `opensimplex`'s `noise3` by at most ~5e-5; it is
    otherwise the same function.

    Args:
        x: float array of x coordinates (any shape).
        y: float array, broadcastable with x.
        z: float array, broadcastable with x (AnoDDPM: the diffusion timestep / frequency).
        perm: `[256]` int permutation table.

    Returns:
        float32 array of the broadcast shape, values in about [-1, 1].
    """
    perm = jnp.asarray(perm, jnp.int32)
    grad_index = (perm % 24) * 3
    x, y, z = jnp.broadcast_arrays(*(jnp.asarray(v, jnp.float32) for v in (x, y, z)))
    stretch = (x + y + z) * STRETCH_CONSTANT_3D
    xsb = jnp.floor(x + stretch).astype(jnp.int32)
    ysb = jnp.floor(y + stretch).astype(jnp.int32)
    zsb = jnp.floor(z + stretch).astype(jnp.int32)
    grads = jnp.asarray(GRADIENTS_3D, jnp.float32)

    def vertex(value, offset):
        xv, yv, zv = xsb + offset[0], ysb + offset[1], zsb + offset[2]
        squish = (xv + yv + zv).astype(jnp.float32) * SQUISH_CONSTANT_3D
        dx = x - (xv.astype(jnp.float32) + squish)
        dy = y - (yv.astype(jnp.float32) + squish)
        dz = z - (zv.astype(jnp.float32) + squish)
        attn = 2.0 - dx * dx - dy * dy - dz * dz
        h = perm[jnp.bitwise_and(perm[jnp.bitwise_and(xv, 255)] + yv, 255)]
        idx = grad_index[jnp.bitwise_and(h + zv, 255)]
        ext = grads[idx] * dx + grads[idx + 1] * dy + grads[idx + 2] * dz
        a2 = jnp.square(jnp.maximum(attn, 0.0))
        return value + jnp.where(attn > 0.0, a2 * a2 * ext, 0.0), None

    value, _ = jax.lax.scan(vertex, jnp.zeros_like(x), jnp.asarray(_OFFSETS_3D))
    return value / NORM_CONSTANT_3D


def simplex_octaves(
    *,
    perm: jax.Array,
    height: int,
    width: int,
    octaves: int = 6,
    persistence: float = 0.8,
    frequency: float = 64.0,
    z: jax.Array | float | None = None,
) -> jax.Array:
    """One multi-octave simplex map on the pixel grid (Behrendt `rand_2d_octaves`).

    noise[i, j] = sum_k persistence^k * noise(j / f_k, i / f_k), f_k = frequency / 2^k, with
    i, j the row and column pixel indices. Not normalised (std ~0.55 for the defaults).

    Args:
        perm: `[256]` int permutation table.
        height: H.
        width: W.
        octaves: number of octaves.
        persistence: amplitude factor between octaves.
        frequency: the first octave's period in pixels (coordinates are pixel index / f).
        z: None for 2D noise; otherwise a scalar third coordinate (AnoDDPM: the diffusion
            timestep), evaluated as noise3(j / f, i / f, z / f).

    Returns:
        `[H, W]` float32 map.
    """
    rows = jnp.arange(height, dtype=jnp.float32)[:, None]
    cols = jnp.arange(width, dtype=jnp.float32)[None, :]
    # Octave k: amplitude persistence^k, period frequency / 2^k (exact powers of two).
    amps = np.asarray([persistence**k for k in range(octaves)], np.float32)
    freqs = np.asarray([float(frequency) / 2.0**k for k in range(octaves)], np.float32)
    zz = None if z is None else jnp.asarray(z, jnp.float32)

    def octave(out, amp_f):
        amp, f = amp_f
        if zz is None:
            layer = opensimplex2(cols / f, rows / f, perm=perm)
        else:
            layer = opensimplex3(cols / f, rows / f, zz / f, perm=perm)
        return out + amp * layer, None

    # A scan keeps the compiled graph one octave long (compile time matters on CPU).
    out, _ = jax.lax.scan(octave, jnp.zeros((height, width), jnp.float32), (amps, freqs))
    return out


def _simplex_batch(key, shape, *, octaves, persistence, frequency, shared_across_batch, z):
    b, h, w, c = shape
    n_maps = c if shared_across_batch else b * c
    keys = jax.random.split(key, n_maps)

    def one(k):
        return simplex_octaves(
            perm=perm_from_key(k),
            height=h,
            width=w,
            octaves=octaves,
            persistence=persistence,
            frequency=frequency,
            z=z,
        )

    maps = jax.vmap(one)(keys)  # [n_maps, H, W]
    if shared_across_batch:
        return jnp.broadcast_to(jnp.transpose(maps, (1, 2, 0))[None], shape)
    return jnp.transpose(maps.reshape(b, c, h, w), (0, 2, 3, 1))


@functools.partial(
    jax.jit, static_argnames=("shape", "octaves", "persistence", "frequency", "shared_across_batch")
)
def simplex_noise(
    key: jax.Array,
    shape: tuple[int, int, int, int],
    t=None,
    *,
    octaves: int = 6,
    persistence: float = 0.8,
    frequency: float = 64.0,
    shared_across_batch: bool = True,
) -> jax.Array:
    """Multi-octave 2D simplex noise (Behrendt pDDPM / cDDPM defaults), not normalised.

    Args:
        key: JAX PRNG key; each map's permutation table is drawn from it.
        shape: `(B, H, W, C)`, static.
        t: ignored (2D noise does not depend on the timestep).
        octaves: number of octaves (6).
        persistence: amplitude factor per octave (0.8).
        frequency: first octave's period in pixels (64), halved every octave.
        shared_across_batch: True (the reference code): one map per channel, repeated over the
            batch. False: an independent map for every batch item and channel. Channels always
            get independent maps (AnoDDPM draws a new seed per channel).

    Returns:
        `[B, H, W, C]` float32 noise, mean ~0, std ~0.55 (per map 0.4-0.7), values in ~[-2.3, 2.3].
    """
    return _simplex_batch(
        key,
        shape,
        octaves=octaves,
        persistence=persistence,
        frequency=frequency,
        shared_across_batch=shared_across_batch,
        z=None,
    )


@functools.partial(
    jax.jit, static_argnames=("shape", "octaves", "persistence", "frequency", "shared_across_batch")
)
def simplex_noise_3d(
    key: jax.Array,
    shape: tuple[int, int, int, int],
    t: jax.Array | int | None = None,
    *,
    octaves: int = 6,
    persistence: float = 0.8,
    frequency: float = 64.0,
    shared_across_batch: bool = True,
) -> jax.Array:
    """AnoDDPM's simplex noise: a z = t slice of 3D octave noise, noise3(x/f, y/f, t/f).

    AnoDDPM (`simplex.py::rand_3d_fixed_T_octaves`) draws, for each channel, one 3D noise
    field and takes its slice at the diffusion timestep being noised or sampled. A `[B]` t
    gives each batch item the slice at its own t; with `shared_across_batch` the items share
    the field (one permutation table per channel), so equal t give equal maps.

    Args:
        key: JAX PRNG key.
        shape: `(B, H, W, C)`, static.
        t: scalar or `[B]` diffusion timestep, the third coordinate (required).
        octaves: number of octaves (6).
        persistence: amplitude factor per octave (0.8).
        frequency: first octave's period in pixels (64).
        shared_across_batch: as in `simplex_noise` (AnoDDPM repeats one map over the batch).

    Returns:
        `[B, H, W, C]` float32 noise, not normalised (per-map std about 0.48).

    Raises:
        ValueError: without t.
    """
    if t is None:
        raise ValueError("simplex_noise_3d needs the timestep t (the z coordinate of the slice)")
    t = jnp.asarray(t, jnp.float32)
    options = dict(octaves=octaves, persistence=persistence, frequency=frequency)
    if t.ndim == 0:
        return _simplex_batch(key, shape, shared_across_batch=shared_across_batch, z=t,
                              **options)
    b, h, w, c = shape
    if t.shape != (b,):
        raise ValueError(f"t must be a scalar or [B] = [{b}], got shape {t.shape}")
    keys = jax.random.split(key, c if shared_across_batch else b * c)
    perms = jax.vmap(perm_from_key)(keys)  # [n_tables, 256]
    perms = (jnp.broadcast_to(perms[None], (b, c, 256)) if shared_across_batch
             else perms.reshape(b, c, 256))

    def one(perm, z):
        return simplex_octaves(perm=perm, height=h, width=w, z=z, **options)

    maps = jax.vmap(jax.vmap(one, in_axes=(0, None)))(perms, t)  # [B, C, H, W]
    return jnp.transpose(maps, (0, 2, 3, 1))
