"""Reverse-process samplers: DDPM / DDIM steps, scanned chains and the UAD reconstructions.

The network is injected as `model_fn(x_t [B, H, W, C], t [B] int32) -> prediction [B, H, W, C]`
(an x0, eps or v prediction, see `prediction_type`). Noise functions have the signature
`noise_fn(key, shape, t) -> [*shape] float32` (`gaussian_noise`, or `functools.partial(
simplex_noise, ...)`; t [B] is the timestep being noised or sampled, which only AnoDDPM's
`simplex_noise_3d` uses). All functions trace under `jax.jit`; chain lengths are static.
Randomness: step i of a chain uses `jax.random.fold_in(key, i)`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from uadjax.diffusion.forward import extract, q_posterior, q_sample, to_x0
from uadjax.diffusion.noise import gaussian_noise
from uadjax.diffusion.schedules import Schedule

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
NoiseFn = Callable[[jax.Array, tuple, jax.Array], jax.Array]


def clip_x0_fn(x0: jax.Array, clip_x0: float | tuple[float, float] | None) -> jax.Array:
    """Clips an x0 estimate: None -> unchanged, c -> [-c, c], (lo, hi) -> [lo, hi]."""
    if clip_x0 is None:
        return x0
    if isinstance(clip_x0, (tuple, list)):
        lo, hi = clip_x0
    else:
        lo, hi = -clip_x0, clip_x0
    return jnp.clip(x0, lo, hi)


def _batch_t(t, batch: int) -> jax.Array:
    t = jnp.asarray(t, jnp.int32)
    return jnp.broadcast_to(t, (batch,)) if t.ndim == 0 else t


def ddpm_step(
    schedule: Schedule,
    *,
    x_t: jax.Array,
    t: jax.Array,
    x0_pred: jax.Array,
    key: jax.Array,
    noise_fn: NoiseFn = gaussian_noise,
    variance: str = "fixed_small",
    clip_x0: float | tuple[float, float] | None = None,
) -> jax.Array:
    """One ancestral DDPM step x_t -> x_{t-1} from an x0 estimate.

    x_{t-1} = posterior_mean(x0_pred, x_t) + sigma_t * noise, with no noise at t == 0 (MONAI /
    guided-diffusion convention).

    Args:
        schedule: the diffusion schedule.
        x_t: `[B, H, W, C]` current sample.
        t: `[B]` (or scalar) int timesteps, 0 <= t < T.
        x0_pred: `[B, H, W, C]` x0 estimate (see `to_x0`).
        key: PRNG key for the step noise.
        noise_fn: `noise_fn(key, shape, t)`; AnoDDPM uses 3D simplex noise at z = t here.
        variance: 'fixed_small' (sigma^2 = posterior variance; MONAI default) or 'fixed_large'
            (sigma^2 = beta_t; AnoDDPM / guided-diffusion `sigma_small=False`).
        clip_x0: None, c (clip x0_pred to [-c, c]) or (lo, hi), applied before the mean.

    Returns:
        `[B, H, W, C]` x_{t-1}.

    Raises:
        ValueError: for an unknown variance.
    """
    t = _batch_t(t, x_t.shape[0])
    x0_pred = clip_x0_fn(x0_pred, clip_x0)
    mean, post_var, _ = q_posterior(schedule, x0=x0_pred, x_t=x_t, t=t)
    if variance == "fixed_small":
        var = post_var
    elif variance == "fixed_large":
        var = extract(schedule.betas, t, x_t.ndim)
    else:
        raise ValueError(f"unknown variance {variance!r}; expected 'fixed_small' or 'fixed_large'")
    noise = noise_fn(key, x_t.shape, t).astype(x_t.dtype)
    nonzero = (t > 0).astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
    return mean + nonzero * jnp.sqrt(var) * noise


def ddim_step(
    schedule: Schedule,
    *,
    x_t: jax.Array,
    t: jax.Array,
    t_prev: jax.Array,
    x0_pred: jax.Array,
    eta: float = 0.0,
    key: jax.Array | None = None,
    noise_fn: NoiseFn = gaussian_noise,
    clip_x0: float | tuple[float, float] | None = None,
) -> jax.Array:
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, eq. 12).

    eps is recomputed from the (clipped) x0 estimate (guided-diffusion convention), sigma =
    eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev), and
    x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma noise. alpha_bar = 1
    when t_prev < 0 (the final step then returns x0). eta = 1 is ancestral sampling on the
    (possibly respaced) chain.

    Args:
        schedule: the diffusion schedule.
        x_t: `[B, H, W, C]` current sample.
        t: `[B]` (or scalar) int timesteps.
        t_prev: `[B]` (or scalar) int target timesteps, t_prev < t; negative means "x0".
        x0_pred: `[B, H, W, C]` x0 estimate.
        eta: stochasticity in [0, 1]; 0 is deterministic.
        key: PRNG key for the noise; required unless eta is the Python number 0.
        noise_fn: `noise_fn(key, shape, t)`.
        clip_x0: None, c or (lo, hi), applied to x0_pred first.

    Returns:
        `[B, H, W, C]` x_{t_prev}.

    Raises:
        ValueError: if key is None while eta may be non-zero.
    """
    b, nd = x_t.shape[0], x_t.ndim
    t = _batch_t(t, b)
    t_prev = _batch_t(t_prev, b)
    x0_pred = clip_x0_fn(x0_pred, clip_x0)
    shape = (-1,) + (1,) * (nd - 1)
    valid = t_prev >= 0
    t_prev_c = jnp.maximum(t_prev, 0)
    ab_t = extract(schedule.alphas_cumprod, t, nd)
    ab_prev = jnp.where(valid, schedule.alphas_cumprod[t_prev_c], 1.0).reshape(shape)
    # 1 - alpha_bar from the float64-derived sqrt table: no float32 cancellation near t = 0.
    om_t = jnp.square(extract(schedule.sqrt_one_minus_alphas_cumprod, t, nd))
    om_prev = jnp.where(valid, jnp.square(schedule.sqrt_one_minus_alphas_cumprod[t_prev_c]), 0.0)
    om_prev = om_prev.reshape(shape)
    eps = (x_t - jnp.sqrt(ab_t) * x0_pred) / jnp.sqrt(om_t)
    deterministic = isinstance(eta, (int, float)) and eta == 0
    if deterministic:
        return jnp.sqrt(ab_prev) * x0_pred + jnp.sqrt(om_prev) * eps
    if key is None:
        raise ValueError("ddim_step with eta != 0 needs a PRNG key")
    # sigma^2 = eta^2 (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)
    sigma2 = (eta**2) * om_prev / om_t * (om_t - om_prev) / ab_prev
    dir_coef = jnp.sqrt(jnp.maximum(om_prev - sigma2, 0.0))
    noise = noise_fn(key, x_t.shape, t).astype(x_t.dtype)
    return jnp.sqrt(ab_prev) * x0_pred + dir_coef * eps + jnp.sqrt(sigma2) * noise


def respaced_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """Evenly spaced timesteps from T - 1 down to 0, rounded (MONAI 1.6 DDIM, guided-diffusion).

    Args:
        num_timesteps: T.
        num_steps: number of sampling steps, 1 <= num_steps <= T.

    Returns:
        `[num_steps]` int32 array, strictly descending, first T - 1, last 0 (a single step
        gives `[T - 1]`). For num_steps = T it is T - 1, ..., 0.
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
    return np.round(np.linspace(num_timesteps - 1, 0, num_steps)).astype(np.int32)


def strided_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """Every i-th timestep from 0, i the smallest stride giving `num_steps` of them: the set
    of MMCCD's modified guided-diffusion `space_timesteps(T, N)` (models/respace.py), e.g.
    {0, 10, ..., 990} for T = 1000, N = 100 (where `respaced_timesteps` gives
    round(linspace(999, 0, 100))).

    Returns:
      `[num_steps]` int32, descending, last 0.

    Raises:
      ValueError: no stride gives exactly `num_steps` timesteps (the authors' function then
        returns None).
    """
    for stride in range(1, num_timesteps + 1):
        if len(range(0, num_timesteps, stride)) == num_steps:
            return np.arange(0, num_timesteps, stride, dtype=np.int32)[::-1].copy()
    raise ValueError(f"no stride of {num_timesteps} timesteps gives exactly {num_steps} "
                     "(the counts ceil(T / i) for integer strides i)")


def _check_ddpm_timesteps(timesteps) -> None:
    if isinstance(timesteps, (np.ndarray, list, tuple)):
        ts = np.asarray(timesteps)
        if ts.size > 1 and not np.all(np.diff(ts) == -1):
            raise ValueError(
                "sampler='ddpm' needs consecutive timesteps t, t-1, ..., use sampler='ddim' "
                "with eta=1 for ancestral sampling on a respaced chain"
            )


def sample_loop(
    model_fn: ModelFn,
    schedule: Schedule,
    *,
    x_T: jax.Array,
    timesteps,
    key: jax.Array,
    sampler: str = "ddpm",
    eta: float = 0.0,
    prediction_type: str = "x0",
    clip_x0: float | tuple[float, float] | None = None,
    noise_fn: NoiseFn = gaussian_noise,
    variance: str = "fixed_small",
    after_step: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """Runs the reverse chain over `timesteps` with a `lax.scan` (one compiled body).

    Step i goes from t = timesteps[i] to t_prev = timesteps[i + 1] (-1 after the last) and
    uses the key `jax.random.fold_in(key, i)`. `after_step(x, i, t_prev) -> x`, when given,
    edits each step's result inside the scan (e.g. LDM's masked resampling puts the known
    positions back).

    Args:
        model_fn: `model_fn(x_t [B, H, W, C], t [B] int32) -> prediction [B, H, W, C]`.
        schedule: the diffusion schedule.
        x_T: `[B, H, W, C]` starting sample at timesteps[0].
        timesteps: `[N]` int descending timesteps (static length), e.g.
            `np.arange(T)[::-1]` or `respaced_timesteps(T, N)`. 'ddpm' needs consecutive
            steps (t, t - 1, ..., checked when given as NumPy / list).
        key: PRNG key.
        sampler: 'ddpm' (`ddpm_step`) or 'ddim' (`ddim_step`).
        eta: DDIM stochasticity (ignored by 'ddpm').
        prediction_type: what model_fn predicts: 'x0', 'eps' or 'v'.
        clip_x0: None, c or (lo, hi) clip of the x0 estimate at each step.
        noise_fn: `noise_fn(key, shape, t)` for the step noise.
        variance: DDPM variance, 'fixed_small' or 'fixed_large'.

    Returns:
        `[B, H, W, C]` the final sample (x_0 when timesteps ends at 0).

    Raises:
        ValueError: for an unknown sampler, or non-consecutive DDPM timesteps.
    """
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"unknown sampler {sampler!r}; expected 'ddpm' or 'ddim'")
    if sampler == "ddpm":
        _check_ddpm_timesteps(timesteps)
    ts = jnp.asarray(timesteps, jnp.int32)
    n = ts.shape[0]
    ts_prev = jnp.concatenate([ts[1:], jnp.full((1,), -1, jnp.int32)])
    batch = x_T.shape[0]

    def body(x, inputs):
        i, t, t_prev = inputs
        tb = jnp.full((batch,), t, jnp.int32)
        pred = model_fn(x, tb)
        x0 = to_x0(schedule, prediction=pred, x_t=x, t=tb, prediction_type=prediction_type)
        k = jax.random.fold_in(key, i)
        if sampler == "ddpm":
            x = ddpm_step(
                schedule,
                x_t=x,
                t=tb,
                x0_pred=x0,
                key=k,
                noise_fn=noise_fn,
                variance=variance,
                clip_x0=clip_x0,
            )
        else:
            x = ddim_step(
                schedule,
                x_t=x,
                t=tb,
                t_prev=jnp.full((batch,), t_prev, jnp.int32),
                x0_pred=x0,
                eta=eta,
                key=k,
                noise_fn=noise_fn,
                clip_x0=clip_x0,
            )
        if after_step is not None:
            x = after_step(x, i, t_prev)
        return x, None

    x, _ = jax.lax.scan(body, x_T, (jnp.arange(n, dtype=jnp.int32), ts, ts_prev))
    return x


def reconstruct_single_step(
    model_fn: ModelFn,
    schedule: Schedule,
    *,
    x0: jax.Array,
    t: jax.Array | int,
    noise: jax.Array,
    prediction_type: str = "x0",
) -> jax.Array:
    """Behrendt pDDPM / cDDPM test-time reconstruction: noise x0 to t, one network call.

    Args:
        model_fn: `model_fn(x_t, t) -> prediction`.
        schedule: the diffusion schedule.
        x0: `[B, H, W, C]` input images (in the network's range, e.g. [-1, 1]).
        t: `[B]` or scalar int, 0-based (Behrendt's t_test = 500 is t = 499).
        noise: `[B, H, W, C]` noise (simplex in Behrendt, one map shared by the batch).
        prediction_type: 'x0' (Behrendt), 'eps' or 'v'.

    Returns:
        `[B, H, W, C]` x0 estimate (not clipped).
    """
    tb = _batch_t(t, x0.shape[0])
    x_t = q_sample(schedule, x0=x0, t=tb, noise=noise)
    pred = model_fn(x_t, tb)
    return to_x0(schedule, prediction=pred, x_t=x_t, t=tb, prediction_type=prediction_type)


def partial_diffusion(
    model_fn: ModelFn,
    schedule: Schedule,
    *,
    x0: jax.Array,
    t_start: int,
    key: jax.Array,
    noise_fn: NoiseFn = gaussian_noise,
    sampler: str = "ddpm",
    prediction_type: str = "eps",
    clip_x0: float | tuple[float, float] | None = None,
    variance: str = "fixed_small",
    eta: float = 0.0,
    num_steps: int | None = None,
) -> jax.Array:
    """AnoDDPM partial diffusion: noise x0 to t_start, then run the reverse chain to 0.

    x_{t_start} = q_sample(x0, t_start, noise_fn(k0, shape, t_start)) with
    k0, k1 = split(key); the chain then uses `sample_loop(..., key=k1)`. AnoDDPM's
    lambda = 250 is t_start = 249, with noise_fn = simplex_noise_3d, prediction_type = 'eps',
    clip_x0 = 1 and variance = 'fixed_large' (`configs/ddpm.py:...,anoddpm`).

    Args:
        model_fn: `model_fn(x_t, t) -> prediction`.
        schedule: the diffusion schedule.
        x0: `[B, H, W, C]` input images.
        t_start: static int, 0 <= t_start < T, the 0-based timestep to noise to.
        key: PRNG key.
        noise_fn: `noise_fn(key, shape, t)`, used for the initial noise and every step.
        sampler: 'ddpm' (all t_start + 1 steps) or 'ddim'.
        prediction_type: 'x0', 'eps' or 'v'.
        clip_x0: None, c or (lo, hi).
        variance: DDPM variance, 'fixed_small' or 'fixed_large'.
        eta: DDIM stochasticity.
        num_steps: DDIM only: number of steps, evenly spaced from t_start to 0 (default all).

    Returns:
        `[B, H, W, C]` reconstruction x0_hat.
    """
    t_start = int(t_start)
    if not 0 <= t_start < schedule.num_timesteps:
        raise ValueError(f"t_start must be in [0, {schedule.num_timesteps}), got {t_start}")
    if sampler == "ddim" and num_steps is not None:
        timesteps = respaced_timesteps(t_start + 1, num_steps)
    else:
        timesteps = np.arange(t_start, -1, -1, dtype=np.int32)
    k0, k1 = jax.random.split(key)
    tb = jnp.full((x0.shape[0],), t_start, jnp.int32)
    x_t = q_sample(schedule, x0=x0, t=tb, noise=noise_fn(k0, x0.shape, tb).astype(x0.dtype))
    return sample_loop(
        model_fn,
        schedule,
        x_T=x_t,
        timesteps=timesteps,
        key=k1,
        sampler=sampler,
        eta=eta,
        prediction_type=prediction_type,
        clip_x0=clip_x0,
        noise_fn=noise_fn,
        variance=variance,
    )
