"""Samplers: MONAI vectors, DDIM oracle inversion, scanned chains against plain loops."""

import functools
import itertools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uadjax import diffusion as D

DATA = pathlib.Path(__file__).parent / "data" / "monai_schedulers.json"
NAMES = {"linear_beta": "linear", "cosine": "cosine"}


@pytest.fixture(scope="module")
def monai():
    with open(DATA) as f:
        return {c["schedule"]: c for c in json.load(f)["cases"]}


def _nhwc(a):
    return np.transpose(np.asarray(a, np.float32), (0, 2, 3, 1))


def _close(actual, desired, rtol=2e-4):
    """Relative to the array's scale (MONAI's x0 at t = 999 reaches 1e4)."""
    desired = np.asarray(desired)
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * np.abs(desired).max())


@pytest.mark.parametrize("name", NAMES)
def test_ddpm_step_matches_monai(monai, name):
    case = monai[name]
    sch = D.get_schedule(NAMES[name], case["T"])
    for step in case["ddpm_step"]:
        assert step["variance_type"] == "fixed_small"
        x_t, eps = _nhwc(step["sample"]), _nhwc(step["model_output_eps"])
        vn = _nhwc(step["variance_noise"])
        t = jnp.full((2,), step["t"])
        x0 = D.to_x0(sch, prediction=eps, x_t=x_t, t=t, prediction_type="eps")
        _close(x0, _nhwc(step["pred_original_sample"]))
        prev = D.ddpm_step(
            sch, x_t=x_t, t=t, x0_pred=x0, key=jax.random.key(0), noise_fn=lambda k, s, t, vn=vn: vn
        )
        _close(prev, _nhwc(step["prev_sample"]))


@pytest.mark.parametrize("name", NAMES)
def test_ddim_step_matches_monai(monai, name):
    case = monai[name]
    sch = D.get_schedule(NAMES[name], case["T"])
    for step in case["ddim_step"]:
        assert step["eta"] == 0.0
        x_t, eps = _nhwc(step["sample"]), _nhwc(step["model_output_eps"])
        t = jnp.full((2,), step["t"])
        t_prev = step["t"] - case["T"] // step["num_inference_steps"]  # MONAI's previous step
        x0 = D.to_x0(sch, prediction=eps, x_t=x_t, t=t, prediction_type="eps")
        _close(x0, _nhwc(step["pred_original_sample"]))
        prev = D.ddim_step(sch, x_t=x_t, t=t, t_prev=t_prev, x0_pred=x0, eta=0.0)
        _close(prev, _nhwc(step["prev_sample"]))


def test_respaced_timesteps(monai):
    ts = D.respaced_timesteps(1000, 50)
    np.testing.assert_array_equal(ts, monai["cosine"]["ddim_timesteps_50"])
    assert ts.dtype == np.int32 and ts[0] == 999 and ts[-1] == 0 and np.all(np.diff(ts) < 0)
    np.testing.assert_array_equal(D.respaced_timesteps(10, 10), np.arange(9, -1, -1))
    np.testing.assert_array_equal(D.respaced_timesteps(1000, 1), [999])
    with pytest.raises(ValueError):
        D.respaced_timesteps(10, 11)


def test_strided_timesteps_are_mmccds_set():
    """MMCCD's space_timesteps(1000, N): the smallest stride giving N steps, from 0."""
    np.testing.assert_array_equal(D.strided_timesteps(1000, 100), np.arange(990, -1, -10))
    np.testing.assert_array_equal(D.strided_timesteps(1000, 2), [500, 0])
    np.testing.assert_array_equal(D.strided_timesteps(1000, 3), [668, 334, 0])
    np.testing.assert_array_equal(D.strided_timesteps(1000, 1000), np.arange(999, -1, -1))
    assert D.strided_timesteps(1000, 5).dtype == np.int32
    with pytest.raises(ValueError, match="no stride"):
        D.strided_timesteps(1000, 999)


def test_ddpm_step_noise_and_variances():
    sch = D.get_schedule("linear", 100)
    x_t = jnp.full((2, 3, 3, 1), 0.3)
    x0 = jnp.full((2, 3, 3, 1), -0.2)
    ones = lambda k, s, t: jnp.ones(s)
    t = jnp.array([0, 40])
    mean, var, _ = D.q_posterior(sch, x0=x0, x_t=x_t, t=t)
    small = D.ddpm_step(sch, x_t=x_t, t=t, x0_pred=x0, key=jax.random.key(0), noise_fn=ones)
    large = D.ddpm_step(
        sch, x_t=x_t, t=t, x0_pred=x0, key=jax.random.key(0), noise_fn=ones, variance="fixed_large"
    )
    np.testing.assert_allclose(small[0], x0[0], atol=1e-6)  # t = 0: no noise, x_{-1} = x0
    np.testing.assert_allclose(large[0], x0[0], atol=1e-6)
    np.testing.assert_allclose(small[1] - mean[1], np.sqrt(var[1]) * np.ones((3, 3, 1)), rtol=1e-5)
    np.testing.assert_allclose(large[1] - mean[1], np.sqrt(sch.betas[40]), rtol=1e-5)
    clipped = D.ddpm_step(
        sch, x_t=x_t, t=t, x0_pred=x0 * 10, key=jax.random.key(0), noise_fn=ones, clip_x0=1.0
    )
    np.testing.assert_allclose(clipped[0], -1.0, atol=1e-6)
    with pytest.raises(ValueError):
        D.ddpm_step(sch, x_t=x_t, t=t, x0_pred=x0, key=jax.random.key(0), variance="learned")


@pytest.mark.parametrize("prediction_type", ["x0", "eps", "v"])
def test_ddim_eta0_oracle_inverts_forward_process(prediction_type):
    """An oracle that returns the truth for its own forward map keeps DDIM on the trajectory."""
    sch = D.get_schedule("cosine", 1000)
    k1, k2 = jax.random.split(jax.random.key(0))
    x0 = jax.random.uniform(k1, (2, 8, 8, 1), minval=-1, maxval=1)
    eps = jax.random.normal(k2, (2, 8, 8, 1))

    def oracle(x_t, t):
        del x_t
        return D.target_for(prediction_type, x0, eps, sch, t)

    ts = D.respaced_timesteps(1000, 20)[1:]  # start at t = 946 (x0 recoverable in float32)
    x_T = D.q_sample(sch, x0=x0, t=jnp.full((2,), ts[0]), noise=eps)
    out = D.sample_loop(
        oracle,
        sch,
        x_T=x_T,
        timesteps=ts,
        key=jax.random.key(9),
        sampler="ddim",
        prediction_type=prediction_type,
    )
    np.testing.assert_allclose(out, x0, atol=2e-4)
    # every intermediate state stays on x_t = q_sample(x0, t, eps)
    x = x_T
    for t, t_prev in itertools.pairwise(ts):
        tb = jnp.full((2,), t)
        x0_hat = D.to_x0(
            sch, prediction=oracle(x, tb), x_t=x, t=tb, prediction_type=prediction_type
        )
        x = D.ddim_step(sch, x_t=x, t=tb, t_prev=t_prev, x0_pred=x0_hat, eta=0.0)
        np.testing.assert_allclose(
            x, D.q_sample(sch, x0=x0, t=jnp.full((2,), t_prev), noise=eps), atol=2e-4
        )
    # deterministic: the key does not matter
    again = D.sample_loop(
        oracle,
        sch,
        x_T=x_T,
        timesteps=ts,
        key=jax.random.key(1),
        sampler="ddim",
        prediction_type=prediction_type,
    )
    np.testing.assert_array_equal(out, again)


def _toy_model(x_t, t):
    return 0.8 * jnp.tanh(x_t) - 1e-3 * t[:, None, None, None].astype(jnp.float32)


@pytest.mark.parametrize(
    "sampler,eta,noise_fn",
    [
        ("ddpm", 0.0, D.gaussian_noise),
        ("ddpm", 0.0, functools.partial(D.simplex_noise, octaves=3, frequency=8.0)),
        ("ddim", 0.0, D.gaussian_noise),
        ("ddim", 0.7, D.gaussian_noise),
    ],
)
def test_sample_loop_matches_python_loop(sampler, eta, noise_fn):
    sch = D.get_schedule("linear", 1000)
    ts = np.arange(7, -1, -1) if sampler == "ddpm" else D.respaced_timesteps(1000, 6)
    key = jax.random.key(4)
    x_T = jax.random.normal(jax.random.key(5), (2, 8, 8, 1))
    run = jax.jit(
        lambda x, k: D.sample_loop(
            _toy_model,
            sch,
            x_T=x,
            timesteps=ts,
            key=k,
            sampler=sampler,
            eta=eta,
            prediction_type="eps",
            clip_x0=1.0,
            noise_fn=noise_fn,
            variance="fixed_large",
        )
    )
    out = run(x_T, key)
    x = x_T
    for i, t in enumerate(ts):
        tb = jnp.full((2,), t, jnp.int32)
        x0 = D.to_x0(sch, prediction=_toy_model(x, tb), x_t=x, t=tb, prediction_type="eps")
        k = jax.random.fold_in(key, i)
        if sampler == "ddpm":
            x = D.ddpm_step(
                sch,
                x_t=x,
                t=tb,
                x0_pred=x0,
                key=k,
                noise_fn=noise_fn,
                variance="fixed_large",
                clip_x0=1.0,
            )
        else:
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            x = D.ddim_step(
                sch,
                x_t=x,
                t=tb,
                t_prev=t_prev,
                x0_pred=x0,
                eta=eta,
                key=k,
                noise_fn=noise_fn,
                clip_x0=1.0,
            )
    np.testing.assert_allclose(out, x, rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(np.asarray(out)))


def test_ddim_eta1_on_consecutive_steps_is_ddpm():
    sch = D.get_schedule("cosine", 1000)
    x_t = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
    x0 = jax.random.uniform(jax.random.key(1), (2, 4, 4, 1), minval=-1, maxval=1)
    t = jnp.array([1, 700])
    key = jax.random.key(2)
    a = D.ddim_step(sch, x_t=x_t, t=t, t_prev=t - 1, x0_pred=x0, eta=1.0, key=key)
    b = D.ddpm_step(sch, x_t=x_t, t=t, x0_pred=x0, key=key)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_sampler_argument_errors():
    sch = D.get_schedule("linear", 100)
    x = jnp.zeros((1, 4, 4, 1))
    with pytest.raises(ValueError):
        D.sample_loop(
            _toy_model,
            sch,
            x_T=x,
            timesteps=np.array([50, 25, 0]),
            key=jax.random.key(0),
            sampler="ddpm",
        )
    with pytest.raises(ValueError):
        D.sample_loop(
            _toy_model,
            sch,
            x_T=x,
            timesteps=np.array([1, 0]),
            key=jax.random.key(0),
            sampler="euler",
        )
    with pytest.raises(ValueError):
        D.ddim_step(sch, x_t=x, t=5, t_prev=4, x0_pred=x, eta=0.5)


def test_reconstruct_single_step():
    sch = D.get_schedule("cosine", 1000)
    x0 = jax.random.uniform(jax.random.key(0), (3, 8, 8, 1), minval=-1, maxval=1)
    noise = D.simplex_noise(jax.random.key(1), (3, 8, 8, 1), frequency=8.0)
    seen = {}

    def model(x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        return jnp.zeros_like(x_t) + 0.25

    rec = jax.jit(lambda x, n: D.reconstruct_single_step(model, sch, x0=x, t=499, noise=n))(
        x0, noise
    )
    np.testing.assert_allclose(rec, 0.25)
    np.testing.assert_array_equal(seen["t"].shape, (3,))
    # eps oracle gives back x0 exactly
    eps_oracle = lambda x_t, t: noise
    rec = D.reconstruct_single_step(
        eps_oracle, sch, x0=x0, t=jnp.array([10, 499, 900]), noise=noise, prediction_type="eps"
    )
    np.testing.assert_allclose(rec, x0, atol=1e-4)


def test_partial_diffusion_plumbing():
    sch = D.get_schedule("linear", 1000)
    x0 = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1), minval=-1, maxval=1)
    key = jax.random.key(3)
    noise_fn = functools.partial(D.simplex_noise, octaves=3, frequency=8.0)
    kw = {"prediction_type": "eps", "clip_x0": 1.0, "variance": "fixed_large", "noise_fn": noise_fn}
    out = jax.jit(lambda x, k: D.partial_diffusion(_toy_model, sch, x0=x, t_start=5, key=k, **kw))(
        x0, key
    )
    k0, k1 = jax.random.split(key)
    x_t = D.q_sample(sch, x0=x0, t=jnp.full((2,), 5), noise=noise_fn(k0, x0.shape))
    ref = D.sample_loop(_toy_model, sch, x_T=x_t, timesteps=np.arange(5, -1, -1), key=k1, **kw)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(out).max()) <= 1.0 + 1e-6  # last step returns the clipped x0
    # x0 oracle: the chain returns x0 whatever the noise
    oracle = lambda x_t, t: x0
    for sampler in ("ddpm", "ddim"):
        rec = D.partial_diffusion(
            oracle,
            sch,
            x0=x0,
            t_start=249,
            key=key,
            sampler=sampler,
            prediction_type="x0",
            num_steps=10 if sampler == "ddim" else None,
        )
        np.testing.assert_allclose(rec, x0, atol=1e-5)
    with pytest.raises(ValueError):
        D.partial_diffusion(oracle, sch, x0=x0, t_start=1000, key=key)
