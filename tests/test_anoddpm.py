"""AnoDDPM as its authors run it (Julian-Wyatt/AnoDDPM, GaussianDiffusion.py): the z = t
slice of 3D simplex noise in training and in every sampling step, and the fixed-large reverse
variance append(posterior_variance[1], betas[1:]), each against a slow NumPy loop written from
the closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ddpm as ddpm_configs
from uadjax import diffusion
from uadjax.methods import shared

T_START = 6  # a short chain; the rule is the same at the paper's 249


def _config(**diffusion_overrides):
    config = ddpm_configs.get_config("tiny,anoddpm")
    config.diffusion.partial_t_start = T_START
    for key, value in diffusion_overrides.items():
        config.diffusion[key] = value
    return config


def _toy_eps(x_t, t):
    """A deterministic stand-in for the network: eps_hat(x_t, t)."""
    return 0.6 * jnp.tanh(x_t) + 1e-3 * t[:, None, None, None].astype(jnp.float32)


def _authors_chain(x0, key, config, variance_rule):
    """The reverse chain in float64 NumPy from the closed forms of a linear schedule, with the
    variance the authors' code uses at step t (`variance_rule(betas, posterior_variance)`
    -> [T]); the noise maps are the generator's own (tested in test_diffusion_noise.py),
    drawn with the keys `partial_diffusion` documents."""
    dcfg = config.diffusion
    betas = np.linspace(1e-4, 2e-2, dcfg.num_timesteps)
    alphas = 1.0 - betas
    ab = np.cumprod(alphas)
    ab_prev = np.append(1.0, ab[:-1])
    posterior_variance = betas * (1.0 - ab_prev) / (1.0 - ab)
    model_var = variance_rule(betas, posterior_variance)
    coef_x0 = betas * np.sqrt(ab_prev) / (1.0 - ab)
    coef_xt = (1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - ab)

    def noise(k, t):
        tb = jnp.full((x0.shape[0],), t, jnp.int32)
        return np.asarray(diffusion.simplex_noise_3d(
            k, x0.shape, tb, octaves=dcfg.simplex_octaves,
            persistence=dcfg.simplex_persistence, frequency=dcfg.simplex_frequency,
            shared_across_batch=dcfg.simplex_shared), np.float64)

    k0, k1 = jax.random.split(key)
    x = np.sqrt(ab[T_START]) * x0 + np.sqrt(1.0 - ab[T_START]) * noise(k0, T_START)
    for i, t in enumerate(range(T_START, -1, -1)):
        eps = np.asarray(_toy_eps(jnp.asarray(x, jnp.float32),
                                  jnp.full((x0.shape[0],), t, jnp.int32)), np.float64)
        x0_hat = np.clip((x - np.sqrt(1.0 - ab[t]) * eps) / np.sqrt(ab[t]), -1.0, 1.0)
        mean = coef_x0[t] * x0_hat + coef_xt[t] * x
        x = mean + (np.sqrt(model_var[t]) * noise(jax.random.fold_in(k1, i), t) if t > 0
                    else 0.0)
    return x


def test_anoddpm_reconstruction_uses_the_fixed_large_variance_and_3d_noise():
    config = _config()
    x0 = np.asarray(jax.random.uniform(jax.random.key(0), (2, 16, 16, 1), minval=-1,
                                       maxval=1), np.float64)
    key = jax.random.key(5)
    ours = np.asarray(jax.jit(lambda x, k: shared.reconstruct(_toy_eps, x, k, config))(
        jnp.asarray(x0, jnp.float32), key))
    authors = _authors_chain(x0, key, config,
                             lambda betas, post: np.append(post[1], betas[1:]))
    np.testing.assert_allclose(ours, authors, atol=2e-4)
    # The rule matters here: the posterior variance gives another chain.
    small = _authors_chain(x0, key, config, lambda betas, post: post)
    assert np.abs(small - authors).max() > 2e-3  # 10x the tolerance above
    plain = np.asarray(shared.reconstruct(_toy_eps, jnp.asarray(x0, jnp.float32), key,
                                          _config(partial_variance="fixed_small")))
    np.testing.assert_allclose(plain, small, atol=2e-4)


def test_anoddpm_trains_on_the_z_equals_t_slice_of_3d_simplex_noise():
    """With a network that predicts 0, the L2 eps loss is the mean square of the noise it was
    trained against: the 3D maps at each slice's own t (keys as `denoising_loss` splits them)."""
    config = _config()
    dcfg = config.diffusion
    image = np.asarray(jax.random.uniform(jax.random.key(1), (3, 16, 16, 1)), np.float32)
    key = jax.random.key(9)
    loss, _ = shared.denoising_loss(lambda x_t, t, rngs: jnp.zeros_like(x_t),
                                    {"image": jnp.asarray(image)}, key, config)
    k_t, k_noise, _ = jax.random.split(key, 3)
    t = shared.sample_train_t(k_t, 3, dcfg)
    assert len(set(np.asarray(t).tolist())) == 3  # three different slices of the field
    noise = diffusion.simplex_noise_3d(
        k_noise, image.shape, t, octaves=dcfg.simplex_octaves,
        persistence=dcfg.simplex_persistence, frequency=dcfg.simplex_frequency,
        shared_across_batch=dcfg.simplex_shared)
    assert float(loss) == pytest.approx(float(jnp.mean(jnp.square(noise))), rel=1e-6)
    two_d = diffusion.simplex_noise(
        k_noise, image.shape, octaves=dcfg.simplex_octaves,
        persistence=dcfg.simplex_persistence, frequency=dcfg.simplex_frequency)
    assert float(loss) != pytest.approx(float(jnp.mean(jnp.square(two_d))), rel=1e-3)


def test_the_gaussian_anoddpm_row_keeps_gaussian_noise():
    config = ddpm_configs.get_config("tiny,anoddpm,gaussian")
    assert config.diffusion.noise == "gaussian"
    assert config.diffusion.partial_variance == "fixed_large"


def test_the_anoddpm_network_and_recipe_modifier():
    """args28.json + diffusion_training.py: 6 levels, attention at ds 8/16/32 (the UNet's
    default, since the args' "16,8" is never passed), AdamW 1e-4, clip 1, EMA 0.9999."""
    config = ddpm_configs.get_config("paper,anoddpm,anoddpm_net")
    m, t = config.model, config.train
    assert (m.channel_mult, m.num_res_blocks, m.attention_resolutions, m.num_heads) == (
        (1, 1, 2, 2, 4, 4), 2, (8, 16, 32), 2)
    assert (t.optimizer, t.learning_rate, t.weight_decay, t.grad_clip, t.ema_decay) == (
        "adamw", 1e-4, 0.0, 1.0, 0.9999)
    assert ddpm_configs.get_config("paper,anoddpm").train.optimizer == "adam"
    for arg in ("cpu,anoddpm,anoddpm_net", "paper,anoddpm_net"):
        with pytest.raises(ValueError, match="anoddpm_net"):
            ddpm_configs.get_config(arg)
