"""Schedules and the forward process: closed forms, Bayes' rule, conversions, MONAI vectors."""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uadjax import diffusion as D

DATA = pathlib.Path(__file__).parent / "data" / "monai_schedulers.json"


@pytest.fixture(scope="module")
def monai():
    with open(DATA) as f:
        return {c["schedule"]: c for c in json.load(f)["cases"]}


def _nchw_to_nhwc(a):
    return np.transpose(np.asarray(a, np.float32), (0, 2, 3, 1))


def test_linear_betas_formula():
    b = D.linear_betas(1000)
    assert b.shape == (1000,)
    np.testing.assert_allclose(b[0], 1e-4)
    np.testing.assert_allclose(b[-1], 2e-2)
    np.testing.assert_allclose(np.diff(b), (2e-2 - 1e-4) / 999, rtol=1e-9)


def test_cosine_betas_formula():
    T, s = 1000, 0.008

    def f(u):
        return math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2

    expected = [min(1 - f(i + 1) / f(i), 0.999) for i in range(T)]
    np.testing.assert_allclose(D.cosine_betas(T), expected, rtol=1e-10, atol=1e-14)
    assert D.cosine_betas(T)[-1] == pytest.approx(0.999)
    # alpha_bar_t equals f(t + 1) / f(0) wherever the clip is inactive.
    ab = np.cumprod(1 - D.cosine_betas(T))
    np.testing.assert_allclose(ab[:900], [f(i + 1) / f(0) for i in range(900)], rtol=1e-9)


@pytest.mark.parametrize("name", D.SCHEDULE_NAMES)
def test_alpha_bar_monotone_in_unit_interval(name):
    sch = D.get_schedule(name, 1000)
    ab = np.asarray(sch.alphas_cumprod, np.float64)
    assert sch.num_timesteps == 1000
    assert np.all(ab > 0) and np.all(ab < 1)
    assert np.all(np.diff(ab) < 0)
    assert all(v.dtype == jnp.float32 and v.shape == (1000,) for v in sch)


def test_make_schedule_fields_closed_form():
    betas = np.array([0.1, 0.2, 0.3, 0.05])
    sch = D.make_schedule(betas)
    a = 1 - betas
    ab = np.array([a[0], a[0] * a[1], a[0] * a[1] * a[2], np.prod(a)])
    ab_prev = np.array([1.0, ab[0], ab[1], ab[2]])
    np.testing.assert_allclose(sch.alphas_cumprod, ab, rtol=1e-6)
    np.testing.assert_allclose(sch.alphas_cumprod_prev, ab_prev, rtol=1e-6)
    np.testing.assert_allclose(sch.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - ab), rtol=1e-6)
    pv = betas * (1 - ab_prev) / (1 - ab)
    np.testing.assert_allclose(sch.posterior_variance, pv, rtol=1e-6, atol=1e-12)
    assert float(sch.posterior_variance[0]) == 0.0
    np.testing.assert_allclose(
        sch.posterior_log_variance_clipped, np.log([pv[1], *pv[1:]]), rtol=1e-6
    )


def test_schedule_errors():
    with pytest.raises(ValueError):
        D.get_schedule("quadratic", 10)
    with pytest.raises(ValueError):
        D.make_schedule(np.array([0.1, 0.0]))
    with pytest.raises(ValueError):
        D.make_schedule(np.ones((2, 2)) * 0.1)


def test_schedule_is_a_pytree_for_jit():
    sch = D.get_schedule("linear", 50)
    f = jax.jit(lambda s, t: s.alphas_cumprod[t])
    assert float(f(sch, 7)) == pytest.approx(float(sch.alphas_cumprod[7]))
    assert len(jax.tree.leaves(sch)) == 10


@pytest.mark.parametrize("name", ["linear_beta", "cosine"])
def test_schedule_matches_monai(monai, name):
    case = monai[name]
    sch = D.get_schedule("linear" if name == "linear_beta" else "cosine", case["T"])
    # MONAI derives the cosine betas in float32: small betas carry ~1e-7 absolute error there.
    np.testing.assert_allclose(sch.betas, case["betas"], rtol=1e-4, atol=3e-7)
    np.testing.assert_allclose(sch.alphas_cumprod, case["alphas_cumprod"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["linear_beta", "cosine"])
def test_q_sample_matches_monai_add_noise(monai, name):
    case = monai[name]
    sch = D.get_schedule("linear" if name == "linear_beta" else "cosine", case["T"])
    an = case["add_noise"]
    x_t = D.q_sample(
        sch, x0=_nchw_to_nhwc(an["x0"]), t=jnp.asarray(an["t"]), noise=_nchw_to_nhwc(an["noise"])
    )
    np.testing.assert_allclose(x_t, _nchw_to_nhwc(an["x_t"]), rtol=1e-5, atol=1e-5)


def test_q_posterior_is_bayes_rule():
    """q(x_{t-1} | x_t, x0) ~ q(x_t | x_{t-1}) q(x_{t-1} | x0): product of two Gaussians."""
    sch = D.get_schedule("cosine", 1000)
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(4, 3, 3, 1)).astype(np.float32)
    x_t = rng.normal(size=(4, 3, 3, 1)).astype(np.float32)
    t = np.array([1, 10, 500, 998])
    betas = D.cosine_betas(1000)
    ab = np.cumprod(1 - betas)
    mean, var, log_var = D.q_posterior(sch, x0=x0, x_t=x_t, t=jnp.asarray(t))
    for i, ti in enumerate(t):
        a, b, ab_prev = 1 - betas[ti], betas[ti], ab[ti - 1]
        # Prior N(sqrt(ab_prev) x0, 1 - ab_prev); likelihood in x_{t-1}: N(x_t / sqrt(a), b / a).
        prec = 1 / (1 - ab_prev) + a / b
        m = (np.sqrt(ab_prev) * x0[i] / (1 - ab_prev) + np.sqrt(a) * x_t[i] / b) / prec
        np.testing.assert_allclose(mean[i], m, rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(var[i].ravel(), 1 / prec, rtol=1e-4)
        np.testing.assert_allclose(log_var[i].ravel(), np.log(1 / prec), rtol=1e-4, atol=1e-5)
    assert var.shape == (4, 1, 1, 1)


def test_parameterisation_round_trips():
    sch = D.get_schedule("linear", 1000)
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(rng.uniform(-1, 1, (3, 5, 5, 2)), jnp.float32)
    eps = jnp.asarray(rng.normal(size=(3, 5, 5, 2)), jnp.float32)
    t = jnp.array([0, 300, 900])
    x_t = D.q_sample(sch, x0=x0, t=t, noise=eps)
    v = D.v_from(sch, x0=x0, eps=eps, t=t)
    tol = {"rtol": 1e-4, "atol": 2e-4}
    np.testing.assert_allclose(D.x0_from_eps(sch, x_t=x_t, t=t, eps=eps), x0, **tol)
    np.testing.assert_allclose(D.eps_from_x0(sch, x_t=x_t, t=t, x0=x0)[1:], eps[1:], **tol)
    np.testing.assert_allclose(D.x0_from_v(sch, x_t=x_t, t=t, v=v), x0, **tol)
    np.testing.assert_allclose(D.eps_from_v(sch, x_t=x_t, t=t, v=v), eps, **tol)
    for kind, pred in (("x0", x0), ("eps", eps), ("v", v)):
        np.testing.assert_allclose(
            D.to_x0(sch, prediction=pred, x_t=x_t, t=t, prediction_type=kind), x0, **tol
        )
        np.testing.assert_allclose(D.target_for(kind, x0, eps, sch, t), pred, **tol)
    with pytest.raises(ValueError):
        D.to_x0(sch, prediction=x0, x_t=x_t, t=t, prediction_type="score")
    with pytest.raises(ValueError):
        D.target_for("v", x0, eps)


def test_scalar_t_broadcasts():
    sch = D.get_schedule("linear", 100)
    x0 = jnp.ones((2, 3, 3, 1))
    n = jnp.zeros((2, 3, 3, 1))
    np.testing.assert_allclose(
        D.q_sample(sch, x0=x0, t=5, noise=n), D.q_sample(sch, x0=x0, t=jnp.array([5, 5]), noise=n)
    )


def test_diffusion_loss_variants():
    pred = jnp.zeros((2, 2, 2, 1))
    target = jnp.arange(8.0).reshape(2, 2, 2, 1)
    assert float(D.diffusion_loss(pred, target, kind="l1")) == pytest.approx(3.5)
    assert float(D.diffusion_loss(pred, target, kind="l2")) == pytest.approx(140 / 8)
    mask = jnp.zeros((2, 2, 2, 1)).at[0, 0, 0, 0].set(1).at[1, 1, 1, 0].set(1)
    # masked mean over the two selected pixels (values 0 and 7)
    assert float(D.diffusion_loss(pred, target, mask=mask)) == pytest.approx(3.5)
    # whole-image mean of the masked error (pDDPM): 7 / 8
    assert float(D.diffusion_loss(pred, target, mask=mask, mask_reduction="image")) == (
        pytest.approx(7 / 8)
    )
    assert float(D.diffusion_loss(pred, target, mask=jnp.zeros_like(mask))) == 0.0
    with pytest.raises(ValueError):
        D.diffusion_loss(pred, target, kind="huber")
    g = jax.jit(jax.grad(lambda p: D.diffusion_loss(p, target, kind="l2", mask=mask)))(pred)
    assert np.count_nonzero(np.asarray(g)) == 1  # pixel (0, 0, 0) has zero error


def test_the_regeneration_script_writes_what_these_tests_read(monai):
    """benchmarks/make_monai_testvectors.py (needs the `bench` extra to run) lays out each
    case as the shipped file does, at the same timesteps, shapes and settings."""
    from benchmarks import make_monai_testvectors as make

    assert set(monai) == set(make.SCHEDULES)
    for name, shipped in monai.items():
        rebuilt = make.case(name, **{k: shipped[k] for k in ("betas", "alphas_cumprod")},
                            add_noise=shipped["add_noise"], ddpm_steps=shipped["ddpm_step"],
                            ddim_steps=shipped["ddim_step"],
                            ddim_timesteps=shipped["ddim_timesteps_50"])
        assert rebuilt == shipped
        assert tuple(shipped["add_noise"]["t"]) == make.ADD_NOISE_T
        assert tuple(s["t"] for s in shipped["ddpm_step"]) == make.DDPM_T
        assert tuple(s["t"] for s in shipped["ddim_step"]) == make.DDIM_T
        assert np.asarray(shipped["ddpm_step"][0]["sample"]).shape == make.SHAPE
        assert len(shipped["ddim_timesteps_50"]) == make.DDIM_STEPS
        assert {s["variance_type"] for s in shipped["ddpm_step"]} == {"fixed_small"}
