"""Noise schedules: beta arrays and the derived per-timestep constants.

Every constant is computed in float64 with NumPy and stored as a float32 `jnp` array, so a
`Schedule` is a pytree that can be closed over by, or passed into, jitted code. Timesteps are
0-based: `t = 0` is the first (least noisy) step and `t = T - 1` the last.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Schedule(NamedTuple):
    """Per-timestep constants of a discrete Gaussian diffusion (all `[T]` float32).

    Attributes:
        betas: beta_t in (0, 1).
        alphas: 1 - beta_t.
        alphas_cumprod: alpha_bar_t = prod_{s <= t} alpha_s, decreasing in (0, 1).
        alphas_cumprod_prev: alpha_bar_{t-1}, with alpha_bar_{-1} = 1.
        sqrt_alphas_cumprod: sqrt(alpha_bar_t).
        sqrt_one_minus_alphas_cumprod: sqrt(1 - alpha_bar_t).
        posterior_variance: variance of q(x_{t-1} | x_t, x_0),
            beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t); 0 at t = 0.
        posterior_log_variance_clipped: log of the posterior variance with the t = 0 entry
            replaced by the t = 1 entry (guided-diffusion convention, finite everywhere).
        posterior_mean_coef1: coefficient of x_0 in the posterior mean,
            beta_t sqrt(alpha_bar_{t-1}) / (1 - alpha_bar_t).
        posterior_mean_coef2: coefficient of x_t in the posterior mean,
            (1 - alpha_bar_{t-1}) sqrt(alpha_t) / (1 - alpha_bar_t).
    """

    betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array

    @property
    def num_timesteps(self) -> int:
        """T, the number of diffusion steps (a static Python int)."""
        return self.betas.shape[0]


def linear_betas(num_timesteps: int = 1000, start: float = 1e-4, end: float = 2e-2) -> np.ndarray:
    """Linear beta schedule of Ho et al. (2020), as in MONAI's `linear_beta`.

    Args:
        num_timesteps: T.
        start: beta_0.
        end: beta_{T-1}.

    Returns:
        `[T]` float64 array `linspace(start, end, T)`. No rescaling by 1000 / T is applied
        (guided-diffusion's `get_named_beta_schedule('linear', T)` rescales; pass
        `start=1e-4 * 1000 / T, end=2e-2 * 1000 / T` to reproduce it).
    """
    return np.linspace(start, end, num_timesteps, dtype=np.float64)


def cosine_betas(
    num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999
) -> np.ndarray:
    """Cosine schedule of Nichol and Dhariwal (2021).

    alpha_bar(u) = cos(((u / T) + s) / (1 + s) * pi / 2)^2 on u = 0..T, normalised by
    alpha_bar(0); beta_t = min(1 - alpha_bar(t + 1) / alpha_bar(t), max_beta).

    Args:
        num_timesteps: T.
        s: small offset that keeps beta_0 away from 0.
        max_beta: upper clip of beta_t (avoids a singular last step).

    Returns:
        `[T]` float64 array of betas in (0, max_beta].
    """
    u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    alpha_bar = np.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2
    alpha_bar = alpha_bar / alpha_bar[0]
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return np.clip(betas, 0.0, max_beta)


def make_schedule(betas) -> Schedule:
    """Derives every schedule constant from a beta array.

    Args:
        betas: `[T]` array-like of betas in (0, 1), any float dtype (cast to float64 first).

    Returns:
        A `Schedule` of `[T]` float32 arrays.

    Raises:
        ValueError: if betas is not 1-D or has values outside (0, 1].
    """
    b = np.asarray(betas, dtype=np.float64)
    if b.ndim != 1 or b.size == 0:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {b.shape}")
    if np.any(b <= 0.0) or np.any(b > 1.0):
        raise ValueError("betas must lie in (0, 1]")
    alphas = 1.0 - b
    ac = np.cumprod(alphas)
    ac_prev = np.concatenate([[1.0], ac[:-1]])
    post_var = b * (1.0 - ac_prev) / (1.0 - ac)
    log_var_src = np.concatenate([post_var[1:2], post_var[1:]]) if b.size > 1 else post_var
    with np.errstate(divide="ignore"):
        post_log_var = np.log(log_var_src)
    consts = {
        "betas": b,
        "alphas": alphas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_log_var,
        "posterior_mean_coef1": b * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    }
    return Schedule(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in consts.items()})


SCHEDULE_NAMES = ("linear", "cosine")


def get_schedule(name: str, num_timesteps: int = 1000) -> Schedule:
    """Builds a schedule by its config name.

    Args:
        name: 'linear' (betas 1e-4 .. 2e-2, MONAI / AnoDDPM / MMCCD at T = 1000) or 'cosine'
            (Nichol and Dhariwal, s = 0.008, max_beta = 0.999; Behrendt pDDPM / cDDPM).
        num_timesteps: T.

    Returns:
        The `Schedule`.

    Raises:
        ValueError: for an unknown name.
    """
    if name == "linear":
        return make_schedule(linear_betas(num_timesteps))
    if name == "cosine":
        return make_schedule(cosine_betas(num_timesteps))
    raise ValueError(f"unknown schedule {name!r}; expected one of {SCHEDULE_NAMES}")
