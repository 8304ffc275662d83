"""The AE, VAE and DAE baselines: KL, determinism, coarse noise, scores, configs, and a
one-step end-to-end run of each on the tiny phantom."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import ae as ae_configs
from configs import dae as dae_configs
from configs import vae as vae_configs
from uadjax.methods import ae, dae, get_method, vae
from uadjax.models import make_model

CONFIGS = {"ae": ae_configs, "vae": vae_configs, "dae": dae_configs}
KINDS = {"tumour", "ms", "stroke"}


def _batch(rng, b=3, size=16, channels=1):
    """Random images in [0, 1] and a disc-shaped brain mask."""
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 <= (size * 0.35) ** 2
    return {"image": jnp.asarray(rng.random((b, size, size, channels)), jnp.float32),
            "brain_mask": jnp.asarray(np.broadcast_to(disc, (b, size, size)), jnp.uint8)}


def _tiny_model(name):
    """The tiny config of method `name` and its (untrained) network."""
    config = CONFIGS[name].get_config("tiny")
    stage = get_method(name).stages[0]
    return config, stage.make_model(config, nnx.Rngs(0))


# --------------------------------------------------------------------------- VAE


def _numpy_kl(mu, logvar):
    """KL(N(mu, s^2) || N(0, 1)) = -log s + (s^2 + mu^2) / 2 - 1/2, summed per row."""
    mu, logvar = np.asarray(mu, np.float64), np.asarray(logvar, np.float64)
    s = np.exp(logvar / 2)
    per_dim = -np.log(s) + (s ** 2 + mu ** 2) / 2 - 0.5
    return per_dim.reshape(len(per_dim), -1).sum(axis=1)


@pytest.mark.parametrize("shape", [(4, 7), (2, 3, 3, 5)], ids=["dense", "spatial"])
def test_vae_kl_matches_the_closed_form(shape):
    rng = np.random.default_rng(0)
    mu = rng.normal(0, 1.5, shape).astype(np.float32)
    logvar = rng.normal(0, 1.0, shape).astype(np.float32)
    np.testing.assert_allclose(vae.gaussian_kl(jnp.asarray(mu), jnp.asarray(logvar)),
                               _numpy_kl(mu, logvar), rtol=1e-5)
    assert np.allclose(vae.gaussian_kl(jnp.zeros(shape), jnp.zeros(shape)), 0.0)


class FixedPosterior:
    """Stand-in VAE: a fixed reconstruction, mu and logvar whatever the input."""

    def __init__(self, reconstruction, mu, logvar):
        self.out = {"reconstruction": reconstruction, "mu": mu, "logvar": logvar}

    def __call__(self, x, *, key=None):
        return self.out


def test_vae_loss_is_recon_plus_weighted_mean_kl():
    config = vae_configs.get_config("tiny")
    config.autoencoder.kl_weight = 0.3
    rng = np.random.default_rng(1)
    batch = _batch(rng)
    rec = rng.random(batch["image"].shape).astype(np.float32)
    mu, logvar = rng.normal(size=(3, 16)), rng.normal(size=(3, 16))
    model = FixedPosterior(jnp.asarray(rec), jnp.asarray(mu, jnp.float32),
                           jnp.asarray(logvar, jnp.float32))
    loss, metrics = vae.loss_fn(model, batch, jax.random.key(0), config)
    recon = np.mean(np.abs(rec - np.asarray(batch["image"])))  # tiny config: L1
    kl = np.mean(_numpy_kl(mu, logvar))
    assert float(metrics["recon"]) == pytest.approx(recon, rel=1e-5)
    assert float(metrics["kl"]) == pytest.approx(kl, rel=1e-5)
    assert float(loss) == pytest.approx(recon + 0.3 * kl, rel=1e-5)
    config.autoencoder.kl_weight = -1.0
    with pytest.raises(ValueError, match="kl_weight"):
        vae.loss_fn(model, batch, jax.random.key(0), config)


def test_vae_is_deterministic_at_test_time_and_decodes_mu():
    config, model = _tiny_model("vae")
    image = _batch(np.random.default_rng(2))["image"]
    call = jax.jit(lambda x: model(x))
    first, second = call(image), call(image)
    np.testing.assert_array_equal(first["reconstruction"], second["reconstruction"])
    np.testing.assert_array_equal(first["z"], first["mu"])
    decoded = jax.jit(lambda z: model.decode(z))(first["mu"])
    np.testing.assert_allclose(first["reconstruction"], decoded, atol=1e-6)
    # Training samples z around mu; scoring ignores the key.
    sampled = jax.jit(lambda x, k: model(x, key=k))(image, jax.random.key(0))
    assert not np.allclose(sampled["z"], first["mu"])
    score = jax.jit(lambda x, k: vae.METHOD.score_fn({"autoencoder": model}, {"image": x}, k,
                                                     config)["score"])
    np.testing.assert_array_equal(score(image, jax.random.key(0)), score(image, jax.random.key(1)))


# --------------------------------------------------------------------------- DAE noise


def _bilinear_variance_factor(size, res):
    """Mean over output pixels of sum(w^2) for half-pixel bilinear upsampling res -> size
    with clamped edges: the variance of upsampled unit white noise, per axis."""
    u = np.clip((np.arange(size) + 0.5) * res / size - 0.5, 0, res - 1)
    t = u - np.floor(u)
    return np.mean((1 - t) ** 2 + t ** 2)


@pytest.mark.parametrize("res", [8, 64])
def test_coarse_noise_has_the_configured_std(res):
    std, size = 0.2, 64
    noise = np.asarray(dae.coarse_noise(jax.random.key(res), (128, size, size, 1),
                                        noise_res=res, std=std))
    expected = std * _bilinear_variance_factor(size, res)  # same factor for H and W
    assert abs(noise.mean()) < 0.01
    assert noise.std() == pytest.approx(expected, rel=0.04)
    if res == size:  # no upsampling: the grid itself
        assert noise.std() == pytest.approx(std, rel=0.04)


def _high_frequency_energy(x):
    """Energy of x [B, H, W] at spatial frequencies above 1/4 cycle per pixel."""
    power = np.abs(np.fft.fft2(x, axes=(1, 2))) ** 2
    f = np.abs(np.fft.fftfreq(x.shape[1]))
    return power[:, np.maximum(f[:, None], f[None, :]) > 0.25].sum()


def test_coarse_noise_is_smooth():
    noise = np.asarray(dae.coarse_noise(jax.random.key(0), (16, 64, 64, 1), noise_res=8,
                                        std=0.2))[..., 0]
    white = noise.std() * np.random.default_rng(0).standard_normal(noise.shape)
    assert _high_frequency_energy(noise) < 0.05 * _high_frequency_energy(white)
    # Neighbouring pixels are strongly correlated (white noise: about 0).
    corr = np.corrcoef(noise[:, :, :-1].ravel(), noise[:, :, 1:].ravel())[0, 1]
    assert corr > 0.9


def test_coarse_noise_stays_in_the_brain():
    config = dae_configs.get_config("tiny")
    batch = _batch(np.random.default_rng(3))
    outside = np.asarray(batch["brain_mask"]) == 0
    added = np.asarray(dae.add_coarse_noise(batch["image"], batch["brain_mask"],
                                            jax.random.key(0), config.dae) - batch["image"])
    assert np.all(added[outside] == 0)
    assert np.mean(added[~outside] != 0) > 0.99
    config.dae.noise_in_brain = False
    added = np.asarray(dae.add_coarse_noise(batch["image"], batch["brain_mask"],
                                            jax.random.key(0), config.dae) - batch["image"])
    assert np.mean(added[outside] != 0) > 0.99
    with pytest.raises(ValueError, match="noise_res"):
        dae.coarse_noise(jax.random.key(0), (1, 16, 16, 1), noise_res=32, std=0.2)


def test_dae_loss_is_masked_l2_of_the_clean_image():
    config = dae_configs.get_config("tiny")
    config.dae.noise_in_brain = False  # noise everywhere, loss only inside the brain
    batch = _batch(np.random.default_rng(4))
    key = jax.random.key(5)
    loss, _ = dae.loss_fn(lambda x, t, **_: x, batch, key, config)  # identity network
    noise_key, _ = jax.random.split(key)
    noise = dae.add_coarse_noise(batch["image"], batch["brain_mask"], noise_key, config.dae)
    error = np.asarray(noise - batch["image"]) * np.asarray(batch["brain_mask"])[..., None]
    assert float(loss) == pytest.approx(float(np.mean(error ** 2)), rel=1e-5)


# --------------------------------------------------------------------------- scores


@pytest.mark.parametrize("name", ["ae", "vae", "dae"])
def test_score_is_the_absolute_residual(name):
    config, model = _tiny_model(name)
    batch = _batch(np.random.default_rng(5))
    method = get_method(name)
    out = jax.jit(lambda b: method.score_fn({method.stages[0].name: model}, b,
                                            jax.random.key(0), config))(batch)
    if name == "dae":
        rec = jax.jit(lambda x: model(x, None))(batch["image"])
    else:
        rec = jax.jit(lambda x: model(x)["reconstruction"])(batch["image"])
    np.testing.assert_allclose(out["reconstruction"], rec, atol=1e-6)
    np.testing.assert_allclose(out["score"],
                               np.mean(np.abs(np.asarray(batch["image"]) - rec), axis=-1),
                               atol=1e-6)


def test_ae_loss_is_l1_or_l2_over_the_whole_image():
    config, model = _tiny_model("ae")
    batch = _batch(np.random.default_rng(6))
    err = np.asarray(model(batch["image"])["reconstruction"] - batch["image"])
    assert float(ae.loss_fn(model, batch, None, config)[0]) == pytest.approx(
        np.mean(np.abs(err)), rel=1e-5)
    config.autoencoder.loss = "l2"
    assert float(ae.loss_fn(model, batch, None, config)[0]) == pytest.approx(
        np.mean(err ** 2), rel=1e-5)
    config.autoencoder.loss = "huber"
    with pytest.raises(ValueError, match="loss"):
        ae.loss_fn(model, batch, None, config)


# --------------------------------------------------------------------------- configs


def test_config_variants():
    paper = ae_configs.get_config("paper")
    assert (paper.model.latent, paper.model.latent_dim) == ("dense", 128)
    assert paper.model.channels == (32, 64, 128, 256) and paper.train.learning_rate == 1e-4
    assert ae_configs.get_config("cpu,spatial").model.latent == "spatial"
    assert ae_configs.get_config("tiny,l2,flair").data.modalities == ("flair",)
    assert vae_configs.get_config("paper").autoencoder.kl_weight > 0
    assert vae_configs.get_config("cpu,short").train.num_steps == 300
    d = dae_configs.get_config("paper")
    assert (d.train.batch_size, d.train.learning_rate) == (16, 1e-4)
    assert (d.dae.noise_res, d.dae.noise_std, d.dae.noise_in_brain) == (12, 0.2, True)
    assert not d.model.use_timestep and d.model.cond_dim == 0
    assert dae_configs.get_config("cpu").dae.noise_res == 8
    for module in CONFIGS.values():
        assert module.get_config("cpu").data.image_size == (64, 64)
        with pytest.raises(ValueError, match="modifiers"):
            module.get_config("paper,bogus")


def test_network_and_method_must_agree():
    config = ae_configs.get_config("tiny")
    config.model.variational = True
    with pytest.raises(ValueError, match="variational"):
        ae.METHOD.stages[0].make_model(config, nnx.Rngs(0))
    config = ae_configs.get_config("tiny")
    config.model.image_size = (32, 32)
    with pytest.raises(ValueError, match="image_size"):
        ae.METHOD.stages[0].make_model(config, nnx.Rngs(0))
    config = dae_configs.get_config("tiny")
    config.model.use_timestep = True
    with pytest.raises(ValueError, match="timestep"):
        dae.METHOD.stages[0].make_model(config, nnx.Rngs(0))


def test_autoencoder_options_and_bad_values():
    config = ae_configs.get_config("tiny,spatial")
    model = ae.METHOD.stages[0].make_model(config, nnx.Rngs(0))
    out = jax.jit(lambda x: model(x))(jnp.zeros((2, 16, 16, 1)))
    assert out["reconstruction"].shape == (2, 16, 16, 1) and out["z"].shape == (2, 4, 4, 16)
    fields = {"name": "conv_autoencoder", "image_size": (16, 16), "in_channels": 2,
                  "channels": (4, 8), "latent_dim": 8, "downsample": "avgpool",
                  "activation": "leaky_relu", "convs_per_level": 2}
    model = make_model(fields, seed=0)
    rec = jax.jit(lambda x: model(x)["reconstruction"])(jnp.zeros((2, 16, 16, 2)))
    assert rec.shape == (2, 16, 16, 2)
    with pytest.raises(ValueError, match="activation"):
        make_model({**fields, "activation": "tanh"}, seed=0)
    config = ae_configs.get_config("tiny")
    config.data.image_size = (18, 18)  # not divisible by 2 ** 2 levels
    with pytest.raises(ValueError, match="divisible"):
        ae.METHOD.stages[0].make_model(config, nnx.Rngs(0))


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ae", "vae", "dae"])
def test_one_step_end_to_end(name, tiny_data, tmp_path):
    from uadjax import jobs

    config = CONFIGS[name].get_config("tiny")
    config.data.phantom_dir = tiny_data.phantom_dir
    config.data.data_dir = tiny_data.data_dir
    t = config.train
    t.num_steps = t.checkpoint_every_steps = t.val_every_steps = 1
    workdir = str(tmp_path / "run")
    jobs.run_all(config, workdir, progress=False)
    with open(os.path.join(workdir, "eval", "results.json")) as f:
        results = json.load(f)
    kinds = results["results"][name]["kinds"]
    assert set(kinds) == KINDS
    for kind, entry in kinds.items():
        assert math.isfinite(entry["val"]["per_volume"]["dice"]["mean"]), kind
