"""Latent diffusion AD (Pinaya et al.): codebook update, KL maths, masked resampling,
calibration histogram, frozen stages and a tiny three-stage run."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers_methods import Halver

from configs import ldm as ldm_config
from uadjax import diffusion, jobs, runs, trainer
from uadjax.methods import get_method, ldm
from uadjax.models.vqvae import VQVAE, VectorQuantizer, nearest_code

# ------------------------------------------------------------------------------ codebook


def _quantizer(codebook, **kw):
    q = VectorQuantizer(codebook.shape[0], codebook.shape[1], codebook_update="ema",
                        decay=0.9, epsilon=0.1, rngs=nnx.Rngs(0), **kw)
    q.embedding[...] = jnp.asarray(codebook)
    q.embed_sum[...] = jnp.asarray(codebook)
    return q


def test_ema_codebook_update_matches_hand_computation():
    codebook = np.array([[0.0, 0.0], [1.0, 1.0], [5.0, -5.0]], np.float32)
    z = np.array([[0.1, -0.2], [0.9, 1.2], [1.1, 0.7], [0.2, 0.1]], np.float32)
    q = _quantizer(codebook)
    q.cluster_size[...] = jnp.array([2.0, 1.0, 0.5])
    q.embed_sum[...] = jnp.array([[0.2, 0.2], [1.0, 0.8], [2.5, -2.5]])
    out = q(jnp.asarray(z).reshape(1, 2, 2, 2), update=True)
    # By hand: codes 0, 1, 1, 0; counts n = (2, 2, 0); sums s_0 = (0.3, -0.1), s_1 = (2.0, 1.9).
    np.testing.assert_array_equal(np.asarray(out["codes"]).reshape(-1), [0, 1, 1, 0])
    n_new = 0.9 * np.array([2.0, 1.0, 0.5]) + 0.1 * np.array([2.0, 2.0, 0.0])  # 2, 1.1, .45
    m_new = 0.9 * np.array([[0.2, 0.2], [1.0, 0.8], [2.5, -2.5]]) + 0.1 * np.array(
        [[0.3, -0.1], [2.0, 1.9], [0.0, 0.0]])
    total = n_new.sum()
    smoothed = (n_new + 0.1) / (total + 3 * 0.1) * total
    np.testing.assert_allclose(np.asarray(q.cluster_size[...]), n_new, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(q.embed_sum[...]), m_new, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(q.embedding[...]), m_new / smoothed[:, None],
                               rtol=1e-5)
    # The output used the codebook before the update; commitment = mean ||z - e||^2.
    e_old = codebook[[0, 1, 1, 0]]
    np.testing.assert_allclose(np.asarray(out["z_q"]).reshape(4, 2), e_old, atol=1e-6)
    np.testing.assert_allclose(float(out["commitment"]), np.mean((z - e_old) ** 2), rtol=1e-5)
    # Without update nothing moves.
    before = np.asarray(q.embedding[...]).copy()
    q(jnp.asarray(z).reshape(1, 2, 2, 2))
    np.testing.assert_array_equal(np.asarray(q.embedding[...]), before)


def test_data_init_seeds_the_codebook_then_runs_the_ema():
    z = np.arange(16, dtype=np.float32).reshape(8, 2) / 10.0
    q = _quantizer(np.zeros((4, 2), np.float32), data_init=True)
    q(jnp.asarray(z).reshape(2, 2, 2, 2), update=True)
    np.testing.assert_allclose(np.asarray(q.embedding[...]), z[[0, 2, 4, 6]], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(q.cluster_size[...]), np.ones(4))
    codes = np.asarray(nearest_code(jnp.asarray(z), q.embedding[...]))
    q(jnp.asarray(z).reshape(2, 2, 2, 2), update=True)  # a regular EMA step now
    counts = np.bincount(codes, minlength=4)
    np.testing.assert_allclose(np.asarray(q.cluster_size[...]), 0.9 + 0.1 * counts, rtol=1e-6)


def test_straight_through_gradients():
    x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1))
    for update in ("ema", "loss"):
        model = VQVAE(in_channels=1, channels=(4, 4), num_res_blocks=1, res_channels=4,
                      embedding_dim=2, num_embeddings=8, codebook_update=update,
                      rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params, rest=rest, graphdef=graphdef):
            out = nnx.merge(graphdef, params, rest)(x)
            return jnp.mean(out["reconstruction"]) + out["codebook"] + out["commitment"]

        grads = nnx.to_flat_state(jax.grad(loss)(params))
        names = {"/".join(map(str, p)): np.asarray(g[...]) for p, g in grads}
        # The encoder learns through the quantiser (straight-through estimator).
        assert np.abs(names["down/0/kernel"]).max() > 0
        has_param_codebook = "quantizer/embedding" in names
        assert has_param_codebook == (update == "loss")
        if update == "loss":
            assert np.abs(names["quantizer/embedding"]).max() > 0


# ------------------------------------------------------------------------------ KL maths


@pytest.mark.parametrize("m1,v1,m2,v2", [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -0.2, 0.8),
                                         (1.0, 0.04, 0.7, 0.04), (-2.0, 2.0, 1.0, 0.3)])
def test_normal_kl_matches_quadrature(m1, v1, m2, v2):
    x = np.linspace(m1 - 12 * np.sqrt(v1), m1 + 12 * np.sqrt(v1), 200001)
    logq = -0.5 * np.log(2 * np.pi * v1) - (x - m1) ** 2 / (2 * v1)
    logp = -0.5 * np.log(2 * np.pi * v2) - (x - m2) ** 2 / (2 * v2)
    numeric = np.trapezoid(np.exp(logq) * (logq - logp), x)
    closed = float(diffusion.normal_kl(m1, np.log(v1), m2, np.log(v2)))
    np.testing.assert_allclose(closed, numeric, rtol=1e-5, atol=1e-8)


def test_kl_terms_match_a_monte_carlo_estimate():
    """KL(q(z_{t-1} | z_t, z0) || p(z_{t-1} | z_t)) against the mean of log q - log p over
    samples of q, for a stand-in network (x0 estimate = z_t / 2)."""
    schedule = diffusion.get_schedule("linear", 1000)
    z0 = jax.random.normal(jax.random.key(0), (1, 2, 2, 3))
    noise = jax.random.normal(jax.random.key(1), z0.shape)
    t = jnp.array([20])
    model_fn = Halver()
    closed = np.asarray(diffusion.kl_terms(model_fn, schedule, z0=z0, t=t, noise=noise,
                                     prediction_type="x0"))
    z_t = diffusion.q_sample(schedule, x0=z0, t=t, noise=noise)
    mean_q, var, _ = diffusion.q_posterior(schedule, x0=z0, x_t=z_t, t=t)
    mean_p, _, _ = diffusion.q_posterior(schedule, x0=model_fn(z_t, t), x_t=z_t, t=t)
    n = 400_000
    samples = mean_q + jnp.sqrt(var) * jax.random.normal(jax.random.key(2), (n,) + z0.shape)
    log_ratio = (jnp.square(samples - mean_p) - jnp.square(samples - mean_q)) / (2 * var)
    mc = np.asarray(jnp.mean(log_ratio, axis=0))
    sem = np.asarray(jnp.std(log_ratio, axis=0)) / np.sqrt(n)
    assert closed.max() > 0.5  # a non-trivial KL
    np.testing.assert_array_less(np.abs(closed - mc), 5 * sem + 1e-6)


def test_latent_kl_map_sweep_matches_a_loop():
    schedule = diffusion.get_schedule("linear", 1000)
    z0 = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    timesteps = (10, 50, 200, 400)
    key = jax.random.key(3)
    noise = jax.random.normal(key, z0.shape)
    loop = np.mean([np.asarray(jnp.sum(diffusion.kl_terms(
        Halver(), schedule, z0=z0, t=jnp.full((2,), t), noise=noise), axis=-1))
        for t in timesteps], axis=0)
    for chunk in (None, 1, 3):
        out = jax.jit(lambda z, c=chunk: ldm.latent_kl_map(
            Halver(), schedule, z0=z, timesteps=timesteps, key=key, chunk_size=c))(z0)
        assert out.shape == (2, 4, 4)
        np.testing.assert_allclose(np.asarray(out), loop, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ resampling


def _slow_resample(model_fn, schedule, z0, mask, t_start, key):
    """Python-loop reference of `masked_resample` (DDPM sampler, eps prediction)."""
    k0, k1 = jax.random.split(key)
    b = z0.shape[0]
    x = diffusion.q_sample(schedule, x0=z0, t=jnp.full((b,), t_start),
                           noise=jax.random.normal(k0, z0.shape))
    for i, t in enumerate(range(t_start, -1, -1)):
        tb = jnp.full((b,), t, jnp.int32)
        x0 = diffusion.x0_from_eps(schedule, x_t=x, t=tb, eps=model_fn(x, tb))
        x = diffusion.ddpm_step(schedule, x_t=x, t=tb, x0_pred=x0,
                                key=jax.random.fold_in(k1, i))
        if t - 1 >= 0:
            known = diffusion.q_sample(
                schedule, x0=z0, t=jnp.full((b,), t - 1),
                noise=jax.random.normal(jax.random.fold_in(k0, i + 1), z0.shape))
        else:
            known = z0
        x = jnp.where(mask[..., None], x, known)
    return x


def test_masked_resampling_keeps_unmasked_latents_exactly():
    schedule = diffusion.get_schedule("linear", 1000)
    z0 = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    mask = jax.random.bernoulli(jax.random.key(1), 0.4, (2, 4, 4))
    key = jax.random.key(2)
    model_fn = Halver()  # read as an eps prediction here
    for sampler, steps in (("ddpm", None), ("ddim", 4)):
        out = jax.jit(lambda z, m, s=sampler, n=steps: ldm.masked_resample(
            model_fn, schedule, z0=z, mask=m, t_start=20, key=key, sampler=s,
            num_steps=n))(z0, mask)
        keep = ~np.asarray(mask)
        np.testing.assert_array_equal(np.asarray(out)[keep], np.asarray(z0)[keep])
        assert np.all(np.abs(np.asarray(out - z0))[np.asarray(mask)] > 0)
    # The scanned chain equals a Python loop, step by step.
    fast = ldm.masked_resample(model_fn, schedule, z0=z0, mask=mask, t_start=20, key=key)
    slow = _slow_resample(model_fn, schedule, z0, mask, 20, key)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(slow), rtol=1e-5, atol=1e-6)


def test_full_mask_resampling_is_partial_diffusion():
    schedule = diffusion.get_schedule("linear", 1000)
    z0 = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    key = jax.random.key(5)
    full = ldm.masked_resample(Halver(), schedule, z0=z0, mask=jnp.ones((2, 4, 4), bool),
                               t_start=15, key=key)
    ref = diffusion.partial_diffusion(Halver(), schedule, x0=z0, t_start=15, key=key,
                                      prediction_type="eps")
    np.testing.assert_allclose(np.asarray(full), np.asarray(ref), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ helpers


def test_histogram_quantile_is_within_one_bin():
    values = np.exp(np.random.default_rng(0).normal(-2.0, 1.5, 20000)).astype(np.float32)
    counts = ldm.histogram_add(jnp.zeros(1200), jnp.asarray(values), jnp.ones(values.shape))
    assert float(counts.sum()) == values.size
    bin_width = 12.0 / 1200
    for q in (0.5, 0.9, 0.95, 0.99):
        got = np.log10(float(ldm.histogram_quantile(counts, q)))
        exact = np.log10(np.quantile(values, q))
        assert exact - 1e-6 <= got <= exact + bin_width + 1e-6, q
    # Weights leave positions out; an empty histogram flags nothing.
    masked = ldm.histogram_add(jnp.zeros(10), jnp.ones(4), jnp.array([1.0, 0.0, 1.0, 0.0]))
    assert float(masked.sum()) == 2.0
    assert float(ldm.histogram_quantile(jnp.zeros(10), 0.95)) == np.inf


def test_mask_smoothing_and_latent_brain_mask():
    impulse = jnp.zeros((1, 21, 21)).at[0, 10, 10].set(1.0)
    blurred = np.asarray(ldm.gaussian_blur(impulse, 1.5))
    np.testing.assert_allclose(blurred.sum(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(blurred, blurred[:, ::-1, :], atol=1e-7)
    np.testing.assert_allclose(blurred, np.swapaxes(blurred, 1, 2), atol=1e-7)
    assert blurred[0, 10, 10] == blurred.max() < 1.0
    np.testing.assert_array_equal(np.asarray(ldm.gaussian_blur(impulse, 0.0)), impulse)
    brain = np.zeros((1, 4, 4), np.uint8)
    brain[0, :2, :2] = 1
    brain[0, 2, 2] = 1  # 1 of 4 pixels: not brain at the latent level
    np.testing.assert_array_equal(np.asarray(ldm.latent_brain_mask(jnp.asarray(brain), 2)),
                                  [[[1, 0], [0, 0]]])


def test_freeze_and_copy_values():
    config = ldm_config.get_config("tiny")
    vq = ldm.make_vqvae(config, nnx.Rngs(1))
    model = ldm.make_latent_diffusion(config, nnx.Rngs(2))
    assert not jax.tree.leaves(nnx.state(model.vqvae, nnx.Param))  # frozen: no Params
    assert jax.tree.leaves(nnx.state(model.unet, nnx.Param))       # the UNet trains
    ldm.init_from_vqvae(model, {"vqvae": vq})
    x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 1))
    np.testing.assert_array_equal(np.asarray(model.vqvae.quantize(x)),
                                  np.asarray(vq.quantize(x)))


def test_config_variants():
    paper = ldm_config.get_config("paper")
    assert paper.model.in_channels == paper.vqvae.embedding_dim
    assert (paper.diffusion.num_timesteps, paper.diffusion.prediction) == (1000, "eps")
    assert ldm_config.get_config("cpu,stcodebook").vqvae.codebook_update == "loss"
    assert ldm_config.get_config("cpu,mse").ldm.rec_loss == "mse"
    short = ldm_config.get_config("cpu,short")
    assert short.train.num_steps == short.stage_train.vqvae.num_steps == 300
    # The calibration is a statistics pass: the budget leaves its 20 batches alone.
    cal = trainer.stage_config(short, "calibrate").train
    assert (cal.data_split, cal.augment, cal.num_steps, cal.val_every_steps) == (
        "val_healthy", False, 20, 0)
    assert get_method("ldm").stage("calibrate").is_statistics
    assert trainer.stage_config(short, "vqvae").train.ema_decay == 0.0
    assert [s.name for s in get_method("ldm").active_stages(short)] == [
        "vqvae", "diffusion", "calibrate"]
    with pytest.raises(ValueError, match="modifiers"):
        ldm_config.get_config("cpu,wrong")


# ------------------------------------------------------------------------------ end to end


def test_three_stage_run_end_to_end(tiny_run, tmp_path):
    config = ldm_config.get_config("tiny")
    config.data.phantom_dir = tiny_run.data.phantom_dir
    config.data.data_dir = tiny_run.data.data_dir
    config.train.val_every_steps = 0
    config.eval.baseline = False
    workdir = str(tmp_path / "run")
    results = jobs.run_all(config, workdir, progress=False)
    for kind, entry in results["results"]["ldm"]["kinds"].items():
        assert np.isfinite(entry["val"]["per_volume"]["dice"]["mean"]), kind
    with open(os.path.join(workdir, "eval", "results.json")) as f:
        assert json.load(f)["timing"]["seconds_per_volume"] > 0

    method = get_method("ldm")
    vq = runs.load_stage_models(config, workdir, method.stage("vqvae"))
    dif = runs.load_stage_models(config, workdir, method.stage("diffusion"))
    cal = runs.load_stage_models(config, workdir, method.stage("calibrate"))
    # The VQ-VAE stayed frozen through both later stages; the UNet stayed frozen in the last.
    for module in (dif.vqvae, cal.ldm.vqvae):
        for a, b in zip(jax.tree.leaves(nnx.state(vq)), jax.tree.leaves(nnx.state(module)),
                        strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(nnx.state(dif.unet)), jax.tree.leaves(nnx.state(cal.ldm.unet)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    scale = float(cal.ldm.latent_scale[...])
    assert scale > 0 and scale == float(dif.latent_scale[...])
    # Calibration counted the in-brain latent positions of its healthy validation batches.
    counts = np.asarray(cal.kl_counts[...])
    steps = trainer.stage_config(config, "calibrate").train.num_steps
    assert 0 < counts.sum() <= steps * config.train.batch_size * 4 * 4
    threshold = float(ldm.kl_threshold(cal, config))
    assert np.isfinite(threshold) and threshold > 0
