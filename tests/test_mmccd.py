"""MMCCD: band masks, masked conditioning, the mask sweep against a loop, Eq. 10 in closed
form, configs, and a short training run after which g(f(x)) returns x on healthy slices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers_methods import perturbed

from configs import mmccd as mmccd_configs
from uadjax import diffusion, jobs, train_state, trainer
from uadjax.data import builder, schema
from uadjax.methods import get_method, mmccd
from uadjax.models import make_model


def _random_unet(model_config, seed):
    """A UNet with every parameter perturbed."""
    return perturbed(make_model(model_config, seed=seed), seed)


def _pair_batch(rng, b=2, size=16):
    """Two channels in [0, 1] (source, target) and an all-brain mask."""
    return {"image": jnp.asarray(rng.random((b, size, size, 2)), jnp.float32),
            "brain_mask": jnp.ones((b, size, size), jnp.uint8)}


# ------------------------------------------------------------------------------------------
# Masks.

@pytest.mark.parametrize("size,width,stride,directions,num", [
    (128, 16, 2, ("horizontal", "vertical"), 128),   # the paper's 64 positions x 2
    (64, 8, 8, ("horizontal",), 8),                   # one direction at the cpu size
    (64, 8, 8, ("horizontal", "vertical"), 16),       # the cpu config
    (64, 8, 1, ("horizontal", "vertical"), 128),
    (16, 2, 2, ("horizontal", "vertical"), 16),       # tiny
    (20, 6, 4, ("vertical",), 5),                     # a stride that does not divide
])
def test_band_masks_cover_every_pixel(size, width, stride, directions, num):
    masks = mmccd.band_masks(size, width, stride, directions)
    assert masks.shape == (num, size, size)
    assert set(np.unique(masks)) <= {0.0, 1.0}
    assert (masks.sum(0) >= 1).all()
    for m in masks:  # each is one band: full rows or full columns, at most `width` of them
        rows, cols = m.any(1), m.any(0)
        assert m.sum() == rows.sum() * cols.sum()
        assert rows.all() or cols.all()
        assert min(rows.sum(), cols.sum()) <= width


def test_paper_mask_set():
    masks = mmccd.band_masks(128, 16, 2)
    cover = masks.sum(0)
    # Interior pixels: 8 horizontal + 8 vertical bands; bands starting after 112 are truncated.
    assert cover[20:100, 20:100].min() == cover[20:100, 20:100].max() == 16
    assert cover[0, 0] == 2 and cover.max() == 16
    assert masks[63].sum() == 2 * 128 and masks[0].sum() == 16 * 128  # start 126: 2 rows
    with pytest.raises(ValueError, match="uncovered|covers"):
        mmccd.band_masks(64, 8, 9)
    with pytest.raises(ValueError, match="direction"):
        mmccd.band_masks(64, 8, 8, ("diagonal",))
    with pytest.raises(ValueError, match="width"):
        mmccd.band_masks(16, 17, 1)


@pytest.mark.parametrize("size,width,coverage", [(64, 8, 1), (64, 8, 2), (64, 8, 4),
                                                 (128, 16, 8), (16, 2, 1)])
def test_band_coverage_is_width_over_stride_per_direction(size, width, coverage):
    """M1: at stride width / c every pixel away from the top / left borders is in-painted by
    c bands per direction (2 c in all); the first rows and columns by fewer, never none."""
    stride = width // coverage
    cover = mmccd.band_coverage(size, width, stride)
    np.testing.assert_array_equal(cover, mmccd.band_masks(size, width, stride).sum(0))
    inner = cover[width - stride:, width - stride:]
    assert inner.min() == inner.max() == 2 * coverage
    assert cover.min() >= 2 and cover[0, 0] == 2
    # one direction: c per pixel
    assert mmccd.band_coverage(size, width, stride, ("vertical",))[:, width - stride:].min() \
        == coverage


@pytest.mark.parametrize("directions", [("horizontal", "vertical"), ("vertical",)])
def test_band_subset_is_the_coarser_mask_set(directions):
    """The cost-accuracy benchmark scores the finest stride once and reads the coarser mask
    sets out of it: the subset must be exactly the coarser set, in its order."""
    fine = mmccd.band_masks(64, 8, 2, directions)
    for coarse in (2, 4, 8):
        rows = mmccd.band_subset(64, 2, coarse, directions)
        np.testing.assert_array_equal(fine[rows], mmccd.band_masks(64, 8, coarse, directions))
    with pytest.raises(ValueError, match="multiple"):
        mmccd.band_subset(64, 4, 6)


def test_random_training_masks_are_bands_on_the_stride():
    masks = np.asarray(mmccd.random_band_masks(jax.random.key(0), 400, 64, 8, 2))
    horizontal = 0
    starts = set()
    for m in masks:
        rows, cols = m.any(1), m.any(0)
        if cols.all() and not rows.all():
            horizontal += 1
            idx = np.flatnonzero(rows)
        else:
            assert rows.all() and not cols.all()
            idx = np.flatnonzero(cols)
        assert idx[0] % 2 == 0 and len(idx) == min(8, 64 - idx[0])
        assert (np.diff(idx) == 1).all()
        starts.add(int(idx[0]))
    assert 140 < horizontal < 260
    assert len(starts) > 25 and max(starts) <= 62


# ------------------------------------------------------------------------------------------
# Training losses.

class Recorder:
    """Stand-in network returning zeros and keeping its input."""

    def __call__(self, inputs, t, *args, **kwargs):
        self.inputs, self.t = inputs, t
        return jnp.zeros(inputs.shape[:3] + (1,), inputs.dtype)


def test_forward_loss_conditions_on_x_with_a_noised_band():
    config = mmccd_configs.get_config("tiny")
    batch = _pair_batch(np.random.default_rng(0), b=8)
    model = Recorder()
    loss, _ = mmccd.forward_loss_fn(model, batch, jax.random.key(1), config)
    x, y = (np.asarray(batch["image"][..., i]) * 2 - 1 for i in (0, 1))
    cond = np.asarray(model.inputs[..., 1])
    assert model.inputs.shape == (8, 16, 16, 2) and model.t.shape == (8,)
    for b in range(8):
        kept = cond[b] == x[b]
        band = ~kept
        # Outside one band x is kept exactly; the band (2 px wide at 16 px) holds noise.
        rows, cols = band.any(1), band.any(0)
        assert band.sum() == rows.sum() * cols.sum() and (rows.all() or cols.all())
        assert min(rows.sum(), cols.sum()) <= config.mmccd.band_width
    # x0 objective with MSE: a zero prediction costs mean(y^2).
    assert float(loss) == pytest.approx(float(np.mean(y ** 2)), rel=1e-5)


def test_backward_and_cyclic_losses_translate_between_the_channels():
    batch = _pair_batch(np.random.default_rng(1))
    x, y = (np.asarray(batch["image"][..., i:i + 1]) * 2 - 1 for i in (0, 1))
    for spec, loss_fn, source, target in [
            ("tiny", mmccd.backward_loss_fn, y, x),
            ("tiny,cyclic", mmccd.forward_loss_fn, x, y)]:
        model = Recorder()
        loss, _ = loss_fn(model, batch, jax.random.key(0), mmccd_configs.get_config(spec))
        np.testing.assert_array_equal(model.inputs, source)
        assert float(loss) == pytest.approx(float(np.mean(target ** 2)), rel=1e-5)


# ------------------------------------------------------------------------------------------
# Score.

def _loop_score(f, g, image, key, config):
    """Eq. 10 by hand: a Python loop over masks and DDIM steps; image [B, H, W, 2] in [0, 1]."""
    c = config.mmccd
    schedule = mmccd.make_schedule(config)
    x = image[..., :1] * 2 - 1
    masks = mmccd.band_masks(x.shape[1:3], c.band_width, c.test_stride, tuple(c.directions))
    k_T, k_masks = jax.random.split(key)
    y_T = jax.random.normal(k_T, x.shape)
    timesteps = diffusion.strided_timesteps(config.diffusion.num_timesteps, c.ddim_steps)
    call_f = nnx.jit(lambda m, a, t: m(a, t))
    call_g = nnx.jit(lambda m, a: m(a, None))
    total = np.zeros(x.shape[:3], np.float32)
    for mask, k in zip(masks, jax.random.split(k_masks, len(masks))):
        k_cond, _ = jax.random.split(k)
        y = y_T
        for i, t_value in enumerate(timesteps):
            k_step = jax.random.fold_in(k_cond, int(t_value)) if c.cond_noise == "step" else k_cond
            noise = jax.random.normal(k_step, x.shape)
            cond = (1 - mask[None, :, :, None]) * x + mask[None, :, :, None] * noise
            t = jnp.full((x.shape[0],), t_value, jnp.int32)
            x0 = call_f(f, jnp.concatenate([y, cond], -1), t)
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            y = diffusion.ddim_step(schedule, x_t=y, t=t, t_prev=jnp.full_like(t, t_prev),
                                    x0_pred=x0, eta=0.0)
        x_hat = (np.asarray(call_g(g, y))[..., 0] + 1) / 2
        total += mask * (x_hat - np.asarray(image[..., 0])) ** 2
    return total / masks.sum(0)


@pytest.fixture(scope="module")
def tiny_networks():
    config = mmccd_configs.get_config("tiny")
    return (_random_unet(config.model_f, 0), _random_unet(config.model_g, 1))


@pytest.mark.parametrize("cond_noise,max_batch,directions", [
    ("step", None, ("horizontal", "vertical")),   # all 16 masks x 2 slices at once
    ("mask", 6, ("vertical",)),                   # 8 masks in chunks of 3: a ragged last one
])
def test_mask_sweep_matches_a_loop(tiny_networks, cond_noise, max_batch, directions):
    f, g = tiny_networks
    config = mmccd_configs.get_config("tiny")
    config.mmccd.cond_noise = cond_noise
    config.mmccd.max_batch = max_batch
    config.mmccd.directions = directions
    batch = _pair_batch(np.random.default_rng(2))
    key = jax.random.key(3)
    out = jax.jit(lambda b, k: mmccd.score_fn({"forward": f, "backward": g}, b, k, config))(
        batch, key)
    expected = _loop_score(f, g, batch["image"], key, config)
    assert expected.std() > 1e-3  # not a constant map
    np.testing.assert_allclose(out["score"], expected, rtol=1e-4, atol=1e-5)


def test_eq10_closed_form_and_source_only():
    """f -> 0 and g -> c: every mask's x_hat is c, so E = (c_img - x)^2 whatever the
    coverage; the target channel is never read."""
    config = mmccd_configs.get_config("tiny")

    def f(inputs, t):
        return jnp.zeros(inputs.shape[:3] + (1,))

    def g(y, t):
        return jnp.full(y.shape, 0.2)  # 0.6 in [0, 1] units

    batch = _pair_batch(np.random.default_rng(4), b=3)
    out = mmccd.score_fn({"forward": f, "backward": g}, batch, jax.random.key(0), config)
    image = np.asarray(batch["image"])
    np.testing.assert_allclose(out["score"], (0.6 - image[..., 0]) ** 2, atol=1e-6)
    np.testing.assert_allclose(out["reconstruction"][..., 0], 0.6, atol=1e-6)
    np.testing.assert_allclose(out["reconstruction"][..., 1], 0.5, atol=1e-6)  # y = 0
    other = dict(batch, image=batch["image"].at[..., 1].set(0.0))
    np.testing.assert_array_equal(
        mmccd.score_fn({"forward": f, "backward": g}, other, jax.random.key(0), config)["score"],
        out["score"])
    # Cyclic UNet: E = (x - g(f(x)))^2 with f(x) = x / 2 and g(y) = 2 y.
    cyclic = mmccd_configs.get_config("tiny,cyclic")
    out = mmccd.score_fn({"forward": lambda x, t: x / 2, "backward": lambda y, t: 2 * y + 0.1},
                         batch, jax.random.key(0), cyclic)
    np.testing.assert_allclose(out["score"], np.full(image.shape[:3], 0.05 ** 2), atol=1e-6)


def test_normalisations():
    error = jnp.asarray(np.random.default_rng(5).random((2, 8, 8)), jnp.float32)
    brain = np.zeros((2, 8, 8), np.uint8)
    brain[0, 2:6, 2:6] = 1
    out = np.asarray(mmccd.normalise_map(error, jnp.asarray(brain), "image"))
    inside = out[0][brain[0] > 0]
    assert inside.min() == 0.0 and inside.max() == pytest.approx(1.0)
    e0 = np.asarray(error[0])[brain[0] > 0]
    np.testing.assert_allclose(inside, (e0 - e0.min()) / (e0.max() - e0.min()), rtol=1e-6)
    assert (out[0][brain[0] == 0] == 0).all() and (out[1] == 0).all()  # empty brain -> 0
    np.testing.assert_array_equal(mmccd.normalise_map(error, brain, "none"), error)
    with pytest.raises(ValueError, match="normalise"):
        mmccd.normalise_map(error, brain, "volume")
    maps = np.array([[1.0, 3.0], [2.0, 5.0]])
    np.testing.assert_allclose(mmccd.dataset_minmax(maps), (maps - 1) / 4)


# ------------------------------------------------------------------------------------------
# Configs.

def test_config_variants():
    assert get_method("mmccd") is mmccd.METHOD
    paper = mmccd_configs.get_config("paper")
    c = paper.mmccd
    assert paper.data.image_size == (128, 128) and paper.data.modalities == ("flair", "t2")
    assert paper.data.normalisation == "mmccd" and (c.input_scale, c.input_shift) == (1.0, 0.0)
    assert (c.band_width, c.train_stride, c.test_stride, c.ddim_steps, c.ddim_eta) == (
        16, 2, 2, 100, 0.0)
    assert len(mmccd.band_masks(128, c.band_width, c.test_stride, c.directions)) == 128
    assert paper.diffusion.schedule == "linear" and paper.diffusion.num_timesteps == 1000
    assert paper.model_f.in_channels == 2 and paper.model_f.use_timestep
    assert paper.model_g.in_channels == 1 and not paper.model_g.use_timestep
    assert paper.model_f.channel_mult == (1, 1, 2, 3, 4)
    assert paper.model_f.attention_resolutions == (4, 8, 16)
    assert (paper.train.num_steps, paper.train.learning_rate, paper.train.batch_size) == (
        100_000, 1e-4, 32)
    cpu = mmccd_configs.get_config("cpu,short")
    assert cpu.data.image_size == (64, 64) and cpu.mmccd.band_width == 8
    assert cpu.train.num_steps == 300
    # M1: the CPU protocol keeps both directions, each pixel in-painted once per direction.
    assert tuple(cpu.mmccd.directions) == ("horizontal", "vertical")
    assert len(mmccd.band_masks(64, 8, cpu.mmccd.test_stride, cpu.mmccd.directions)) == 16
    cover = mmccd.band_coverage(64, 8, cpu.mmccd.test_stride, cpu.mmccd.directions)
    assert cover.min() == cover.max() == 2
    assert mmccd.network_evaluations(cpu) == {"f": 32, "g": 16}
    cyclic = mmccd_configs.get_config("cpu,cyclic")
    assert cyclic.mmccd.forward == "unet" and cyclic.model_f.in_channels == 1
    assert not cyclic.model_f.use_timestep
    # The paper's six pairs, and the single-word sources.
    for src, tgt in [("flair", "t2"), ("flair", "t1"), ("t2", "flair"), ("t2", "t1"),
                     ("t1", "t2"), ("t1", "flair")]:
        config = mmccd_configs.get_config(f"tiny,{src}-{tgt}")
        assert config.data.modalities == (src, tgt)
        assert mmccd.modality_indices(config) == (0, 1)
    assert mmccd_configs.get_config("cpu,t1").data.modalities == ("t1", "t2")
    assert mmccd_configs.get_config("cpu,t2").data.modalities == ("t2", "flair")
    for bad, match in [("cpu,t1-t1", "both"), ("cpu,t1,t2-pd", "more than one"),
                       ("cpu,bogus", "modifiers")]:
        with pytest.raises(ValueError, match=match):
            mmccd_configs.get_config(bad)
    config = mmccd_configs.get_config("tiny")
    config.data.modalities = ("t2",)
    with pytest.raises(ValueError, match="not loaded"):
        mmccd.modality_indices(config)


# ------------------------------------------------------------------------------------------
# A short training run: g(f(x)) returns x on healthy slices.

def _train(stage, config, batches, steps):
    tx = train_state.make_optimizer(config.train)
    graphdef, state = trainer.init_state(stage, config, tx, seed=0)
    step = jax.jit(trainer.make_train_step(stage, graphdef, tx, config,
                                         base_key=jax.random.key(0)))
    untrained = trainer.merge(graphdef, state["params"], state["rest"])
    for i in range(steps):
        state, _ = step(state, batches[i % len(batches)])
    return untrained, trainer.merge(graphdef, state["params"], state["rest"])


def test_short_training_closes_the_cycle(tiny_data):
    config = mmccd_configs.get_config("tiny")
    config.data.phantom_dir = tiny_data.phantom_dir
    config.data.data_dir = tiny_data.data_dir
    config.train.learning_rate = 3e-3
    jobs.ensure_shards(config, progress=False)
    source = builder.load_split(config.data.data_dir, config.data, schema.TRAIN)
    records = [source[i] for i in range(len(source))]
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(6):
        idx = rng.choice(len(records), 16, replace=len(records) < 16)
        batches.append({k: jnp.asarray(np.stack([records[i][k] for i in idx]))
                        for k in ("image", "brain_mask")})
    test = batches[0]  # healthy training slices
    brain = np.asarray(test["brain_mask"]) > 0
    x = np.asarray(test["image"][..., 0])[brain]
    best_constant = float(np.var(x))  # the error of x_hat = mean(x), the best constant map

    def cyclic_error(cfg, forward, backward):
        out = mmccd.score_fn({"forward": forward, "backward": backward}, test,
                             jax.random.key(1), cfg)
        return float(np.mean(np.asarray(out["score"])[brain]))

    method = get_method("mmccd")
    # MMCCD: the diffusion f learns slowly (at most t, y_t holds little of y, so f must
    # in-paint and translate from the masked x alone), so 200 steps get it only part of the way
    # (jax 0.10.2, phantom generator 2: cycle error 0.078 untrained -> 0.064; best constant
    # 0.071).
    (f0, f1), (g0, g1) = (_train(s, config, batches, 200) for s in method.stages)
    untrained = cyclic_error(config, f0, g0)  # zero-initialised last convs: x_hat = 0.5
    trained = cyclic_error(config, f1, g1)
    print("cycle error: untrained", untrained, "best constant", best_constant, "MMCCD", trained)
    assert untrained > best_constant > 0.01
    assert trained < 0.95 * untrained, (trained, untrained, best_constant)
    # The Cyclic UNet (f a plain UNet) with the same g: 60 steps suffice (phantom generator
    # 2, whose single-subject anatomy has more detail than the template average: 0.040
    # against 0.078 untrained and a best constant of 0.071).
    cyclic = mmccd_configs.get_config("tiny,cyclic")
    cyclic.train.learning_rate = 3e-3
    _, f_cyclic = _train(method.stage("forward"), cyclic, batches, 60)
    trained = cyclic_error(cyclic, f_cyclic, g1)
    print("Cyclic UNet", trained)
    assert trained < 0.6 * untrained and trained < 0.65 * best_constant, (
        trained, untrained, best_constant)
