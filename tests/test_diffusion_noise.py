"""Noises: the jnp OpenSimplex port against pip `opensimplex` (0.4.5.x, legacy algorithm)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from opensimplex import OpenSimplex
from opensimplex.internals import _init as opensimplex_init

from uadjax import diffusion as D


@pytest.mark.parametrize("seed", [0, 3, 42, -987654321, 2**63 - 5])
def test_perm_matches_opensimplex_seeding(seed):
    perm = D.opensimplex_perm(seed)
    np.testing.assert_array_equal(perm, opensimplex_init(seed)[0])
    assert sorted(perm.tolist()) == list(range(256))


@pytest.mark.parametrize("seed", [7, 12345])
def test_noise2_matches_opensimplex(seed):
    ref = OpenSimplex(seed)
    x = np.linspace(-9.7, 13.3, 41)
    y = np.linspace(-6.1, 17.9, 37)
    got = D.opensimplex2(x[None, :], y[:, None], perm=D.opensimplex_perm(seed))
    np.testing.assert_allclose(got, ref.noise2array(x, y), atol=1e-5)
    assert np.abs(np.asarray(got)).max() > 0.3  # a non-trivial field


def test_octave_map_matches_opensimplex_octave_loop():
    seed, h, w = 2024, 40, 56
    ref_gen = OpenSimplex(seed)
    ref = np.zeros((h, w))
    amp, f = 1.0, 64.0
    for _ in range(6):  # Behrendt's rand_2d_octaves with x = column, y = row pixel indices
        ref += amp * ref_gen.noise2array(np.arange(w) / f, np.arange(h) / f)
        f /= 2
        amp *= 0.8
    got = jax.jit(functools.partial(D.simplex_octaves, height=h, width=w))(
        perm=D.opensimplex_perm(seed)
    )
    assert got.shape == (h, w) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref, atol=2e-5)


def test_noise3_close_to_opensimplex():
    """Full kernel sum vs the legacy 3D code, which drops a few tiny contributions (<~5e-5)."""
    seed = 99
    ref = OpenSimplex(seed)
    x = np.linspace(-3.3, 5.1, 15)
    y = np.linspace(-2.2, 4.4, 13)
    z = np.array([0.0, 1.7, 250 / 64])
    got = D.opensimplex3(
        x[None, None, :], y[None, :, None], z[:, None, None], perm=D.opensimplex_perm(seed)
    )
    np.testing.assert_allclose(got, ref.noise3array(x, y, z), atol=1e-4)


@pytest.mark.parametrize("hw", [64, 96])
def test_simplex_statistics(hw):
    n = D.simplex_noise(jax.random.key(0), (48, hw, hw, 1), shared_across_batch=False)
    assert n.shape == (48, hw, hw, 1) and n.dtype == jnp.float32
    per_map_std = np.asarray(jnp.std(n, axis=(1, 2, 3)))
    assert 0.45 < per_map_std.mean() < 0.65  # not normalised: ~0.55 (AnoDDPM-style octave noise)
    assert per_map_std.min() > 0.3 and per_map_std.max() < 0.8
    map_means = np.asarray(jnp.mean(n, axis=(1, 2, 3)))  # the low octaves give each map an offset
    assert abs(map_means.mean()) < 3 * map_means.std() / np.sqrt(len(map_means))
    assert float(jnp.max(jnp.abs(n))) < 3.0


def test_simplex_shared_independent_and_deterministic():
    key = jax.random.key(5)
    shape = (4, 32, 32, 2)
    shared = D.simplex_noise(key, shape)
    np.testing.assert_array_equal(shared[0], shared[3])
    assert not np.allclose(shared[..., 0], shared[..., 1])  # channels get their own maps
    own = D.simplex_noise(key, shape, shared_across_batch=False)
    assert not np.allclose(own[0], own[1])
    np.testing.assert_array_equal(D.simplex_noise(key, shape), shared)
    assert not np.allclose(D.simplex_noise(jax.random.key(6), shape), shared)


def test_simplex_is_a_noise_fn_under_jit():
    noise_fn = functools.partial(D.simplex_noise, octaves=4, frequency=32.0)
    f = jax.jit(lambda k: noise_fn(k, (2, 16, 16, 1)))
    a = f(jax.random.key(1))
    np.testing.assert_array_equal(a, noise_fn(jax.random.key(1), (2, 16, 16, 1)))


def test_simplex_3d_varies_smoothly_with_t():
    key = jax.random.key(3)
    shape = (1, 48, 48, 1)
    n0 = np.asarray(D.simplex_noise_3d(key, shape, t=200)).ravel()
    n1 = np.asarray(D.simplex_noise_3d(key, shape, t=201)).ravel()
    far = np.asarray(D.simplex_noise_3d(key, shape, t=600)).ravel()
    assert np.corrcoef(n0, n1)[0, 1] > 0.9
    assert abs(np.corrcoef(n0, far)[0, 1]) < 0.5
    batch = D.simplex_noise_3d(key, (16, 64, 64, 1), t=250, shared_across_batch=False)
    assert 0.35 < float(jnp.std(batch, axis=(1, 2, 3)).mean()) < 0.7
    traced = jax.jit(lambda t: D.simplex_noise_3d(key, shape, t=t))(200)
    np.testing.assert_allclose(traced.ravel(), n0, atol=1e-6)


def test_simplex_3d_per_item_timesteps_equal_a_loop_of_scalar_calls():
    """A [B] t (training: one t per slice) gives item b the z = t_b slice of the same
    fields a scalar call draws; without t the generator refuses."""
    key = jax.random.key(7)
    shape = (3, 16, 16, 2)
    ts = [5, 250, 900]
    for shared in (True, False):
        batch = D.simplex_noise_3d(key, shape, jnp.asarray(ts), shared_across_batch=shared)
        for b, t in enumerate(ts):
            ref = D.simplex_noise_3d(key, shape, t=t, shared_across_batch=shared)[b]
            np.testing.assert_allclose(batch[b], ref, atol=1e-6)
    equal = D.simplex_noise_3d(key, shape, jnp.full((3,), 250))
    np.testing.assert_allclose(equal, D.simplex_noise_3d(key, shape, t=250), atol=1e-6)
    with pytest.raises(ValueError, match="needs the timestep"):
        D.simplex_noise_3d(key, shape)


def test_gaussian_noise():
    n = D.gaussian_noise(jax.random.key(0), (8, 32, 32, 1))
    assert n.dtype == jnp.float32 and n.shape == (8, 32, 32, 1)
    assert abs(float(n.mean())) < 0.05 and abs(float(n.std()) - 1) < 0.05
