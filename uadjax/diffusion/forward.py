"""Forward process q(x_t | x_0), its posterior, the x0 / eps / v parameterisations and the loss.

Shapes: images are `[B, H, W, C]` (any trailing dims work) and timesteps `t` are `[B]` int
(0-based, `0 <= t < T`). Per-timestep constants are gathered at `t` and broadcast over the
trailing image axes. A scalar `t` is also accepted and applies to the whole batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from uadjax.diffusion.schedules import Schedule

PREDICTION_TYPES = ("x0", "eps", "v")


def extract(values: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """Gathers `values[t]` and appends singleton axes up to rank `ndim`.

    Args:
        values: `[T]` per-timestep constants.
        t: `[B]` (or scalar) int timesteps.
        ndim: rank of the array the result must broadcast against (e.g. 4 for NHWC).

    Returns:
        `[B, 1, ..., 1]` (rank `ndim`) array, or a scalar for a scalar `t`.
    """
    v = jnp.take(values, jnp.asarray(t), axis=0)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def q_sample(schedule: Schedule, *, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Samples x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise (MONAI `add_noise`).

    Args:
        schedule: the diffusion schedule.
        x0: `[B, H, W, C]` clean images (usually in [-1, 1]).
        t: `[B]` int timesteps.
        noise: `[B, H, W, C]` noise (Gaussian, or simplex with std ~0.55).

    Returns:
        `[B, H, W, C]` x_t.
    """
    a = extract(schedule.sqrt_alphas_cumprod, t, x0.ndim)
    s = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
    return a * x0 + s * noise


def q_posterior(
    schedule: Schedule, *, x0: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean and variance of the Gaussian posterior q(x_{t-1} | x_t, x_0).

    Args:
        schedule: the diffusion schedule.
        x0: `[B, H, W, C]` (estimate of) the clean image.
        x_t: `[B, H, W, C]` noisy image at step t.
        t: `[B]` int timesteps.

    Returns:
        `(mean [B, H, W, C], variance [B, 1, 1, 1], log_variance [B, 1, 1, 1])`; the variance is
        0 at t = 0 and `log_variance` is the clipped one (finite at t = 0).
    """
    c1 = extract(schedule.posterior_mean_coef1, t, x_t.ndim)
    c2 = extract(schedule.posterior_mean_coef2, t, x_t.ndim)
    mean = c1 * x0 + c2 * x_t
    var = extract(schedule.posterior_variance, t, x_t.ndim)
    log_var = extract(schedule.posterior_log_variance_clipped, t, x_t.ndim)
    return mean, var, log_var


def x0_from_eps(schedule: Schedule, *, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t). Shapes `[B, H, W, C]`."""
    a = extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim)
    s = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
    return (x_t - s * eps) / a


def eps_from_x0(schedule: Schedule, *, x_t: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
    """eps = (x_t - sqrt(alpha_bar_t) x0) / sqrt(1 - alpha_bar_t). Shapes `[B, H, W, C]`."""
    a = extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim)
    s = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
    return (x_t - a * x0) / s


def v_from(schedule: Schedule, *, x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """Velocity target v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0 (Salimans & Ho)."""
    a = extract(schedule.sqrt_alphas_cumprod, t, x0.ndim)
    s = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
    return a * eps - s * x0


def x0_from_v(schedule: Schedule, *, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """x0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v. Shapes `[B, H, W, C]`."""
    a = extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim)
    s = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
    return a * x_t - s * v


def eps_from_v(schedule: Schedule, *, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """eps = sqrt(1 - alpha_bar_t) x_t + sqrt(alpha_bar_t) v. Shapes `[B, H, W, C]`."""
    a = extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim)
    s = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
    return s * x_t + a * v


def to_x0(
    schedule: Schedule,
    *,
    prediction: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    prediction_type: str,
) -> jax.Array:
    """Converts a network output to an x0 estimate.

    Args:
        schedule: the diffusion schedule.
        prediction: `[B, H, W, C]` network output.
        x_t: `[B, H, W, C]` the network's input.
        t: `[B]` int timesteps.
        prediction_type: 'x0' (returned as is), 'eps' or 'v'.

    Returns:
        `[B, H, W, C]` x0 estimate (not clipped).

    Raises:
        ValueError: for an unknown prediction type.
    """
    if prediction_type == "x0":
        return prediction
    if prediction_type == "eps":
        return x0_from_eps(schedule, x_t=x_t, t=t, eps=prediction)
    if prediction_type == "v":
        return x0_from_v(schedule, x_t=x_t, t=t, v=prediction)
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected {PREDICTION_TYPES}")


def target_for(
    prediction_type: str,
    x0: jax.Array,
    noise: jax.Array,
    schedule: Schedule | None = None,
    t: jax.Array | None = None,
) -> jax.Array:
    """The regression target of a network trained with `prediction_type`.

    Args:
        prediction_type: 'x0' -> x0, 'eps' -> noise (as drawn: simplex noise is not
            renormalised, AnoDDPM), 'v' -> sqrt(ab_t) noise - sqrt(1 - ab_t) x0.
        x0: `[B, H, W, C]` clean images.
        noise: `[B, H, W, C]` the noise used in `q_sample`.
        schedule: needed for 'v' only.
        t: `[B]` int timesteps, needed for 'v' only.

    Returns:
        `[B, H, W, C]` target.

    Raises:
        ValueError: for an unknown prediction type, or 'v' without schedule and t.
    """
    if prediction_type == "x0":
        return x0
    if prediction_type == "eps":
        return noise
    if prediction_type == "v":
        if schedule is None or t is None:
            raise ValueError("prediction_type 'v' needs schedule and t")
        return v_from(schedule, x0=x0, eps=noise, t=t)
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected {PREDICTION_TYPES}")


def diffusion_loss(
    prediction: jax.Array,
    target: jax.Array,
    *,
    kind: str = "l1",
    mask: jax.Array | None = None,
    mask_reduction: str = "mask",
) -> jax.Array:
    """Mean absolute ('l1') or squared ('l2') error, optionally restricted to a mask.

    Args:
        prediction: `[B, H, W, C]` network output.
        target: `[B, H, W, C]` target (see `target_for`).
        kind: 'l1' (Behrendt pDDPM / cDDPM, `F.l1_loss`) or 'l2' (AnoDDPM, MMCCD, MSE).
        mask: optional `[B, H, W, 1]` (or `[B, H, W, C]`) weights in {0, 1} (or [0, 1]).
        mask_reduction: how a mask is averaged.
            'mask': sum(err * mask) / sum(mask), the mean over masked elements (channels
            counted; 0 when the mask is empty).
            'image': sum(err * mask) / number of elements, i.e. the error outside the mask
            counts as 0 and the mean runs over the whole image. This is Behrendt pDDPM's loss
            (the prediction outside the noised patch is replaced by the clean image, then
            `F.l1_loss` averages over all pixels; a 48x48 patch of 96x96 gets weight 1/4).

    Returns:
        Scalar float32 loss.

    Raises:
        ValueError: for an unknown kind or mask_reduction.
    """
    diff = prediction.astype(jnp.float32) - target.astype(jnp.float32)
    if kind == "l1":
        err = jnp.abs(diff)
    elif kind == "l2":
        err = jnp.square(diff)
    else:
        raise ValueError(f"unknown loss kind {kind!r}; expected 'l1' or 'l2'")
    if mask is None:
        return jnp.mean(err)
    w = jnp.broadcast_to(mask.astype(jnp.float32), err.shape)
    total = jnp.sum(err * w)
    if mask_reduction == "mask":
        denom = jnp.sum(w)
        return jnp.where(denom > 0, total / jnp.where(denom > 0, denom, 1.0), 0.0)
    if mask_reduction == "image":
        return total / err.size
    raise ValueError(f"unknown mask_reduction {mask_reduction!r}; expected 'mask' or 'image'")
