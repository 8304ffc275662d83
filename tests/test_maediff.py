"""MAEDiff: hierarchical geometry, the MAE encoder sees only visible tokens, patch training,
the sliding sweep against a loop, coverage-weighted averaging, configs, a tiny run."""

import copy

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from helpers_methods import Halver, perturbed, random_batch, run_tiny_end_to_end

from configs import maediff as maediff_configs
from uadjax import diffusion
from uadjax.methods import get_method, maediff, shared
from uadjax.models import maediff as mae_models
from uadjax.models import make_model


def _one_level(config):
    """The tiny config with a one-level UNet (its encoder output is the full 16 x 16 map, so
    a 4 px cell is 4 x 4 features): the method's logic is under test, and it compiles fast."""
    config.model.channel_mult = (1,)
    return config


def _visible_by_loop(corner, image_hw, p, r):
    """Raster indices of the r x r cells outside the p x p patch at `corner`, by hand."""
    out = []
    for i in range(image_hw[0] // r):
        for j in range(image_hw[1] // r):
            inside = corner[0] <= i * r < corner[0] + p and corner[1] <= j * r < corner[1] + p
            if not inside:
                out.append(i * (image_hw[1] // r) + j)
    return out


# ------------------------------------------------------------------------------------------
# Geometry.

def test_partition_of_each_size():
    paper = maediff_configs.get_config("paper")
    corners = maediff.sliding_corners((96, 96), paper.patch)
    assert sorted({int(r) for r in corners[:, 0]}) == [0, 16, 32, 48] and len(corners) == 16
    assert maediff.num_visible((96, 96), paper.patch) == 144 - 36
    cpu = maediff_configs.get_config("cpu")
    assert maediff.sliding_corners((64, 64), cpu.patch).tolist() == [
        [r, c] for r in (0, 16, 32) for c in (0, 16, 32)]
    assert maediff.num_visible((64, 64), cpu.patch) == 64 - 16
    # A step that does not divide H - p: 0, 8 and the border position 12 (all multiples of r).
    odd = copy.deepcopy(cpu.patch)
    odd.size, odd.stride, odd.sub_size = 12, 8, 4
    corners = maediff.sliding_corners((24, 24), odd)
    assert sorted({int(r) for r in corners[:, 0]}) == [0, 8, 12]


@pytest.mark.parametrize("field,value", [("size", 30), ("stride", 12), ("sub_size", 7)])
def test_misaligned_partition_raises(field, value):
    pcfg = maediff_configs.get_config("cpu").patch
    setattr(pcfg, field, value)
    with pytest.raises(ValueError, match="multiple"):
        maediff.sliding_corners((64, 64), pcfg)


def test_visible_tokens_match_a_loop():
    pcfg = maediff_configs.get_config("cpu").patch
    corners = np.array([[0, 0], [16, 32], [32, 8], [24, 24]], np.int32)  # r-aligned, any
    visible = np.asarray(jax.jit(lambda c: maediff.visible_tokens(c, (64, 64), pcfg))(corners))
    assert visible.shape == (4, 48)
    for corner, row in zip(corners, visible):
        assert row.tolist() == _visible_by_loop(corner, (64, 64), 32, 8)


def test_training_corners_are_aligned_sliding_positions():
    pcfg = maediff_configs.get_config("tiny").patch
    corners = np.asarray(maediff.sample_corners(jax.random.key(0), 300, (16, 16), pcfg))
    sliding = {tuple(c) for c in maediff.sliding_corners((16, 16), pcfg)}
    assert {tuple(c) for c in corners} == sliding  # every position drawn, nothing else
    pcfg.train_positions = "random"
    pcfg.stride = 8
    corners = np.asarray(maediff.sample_corners(jax.random.key(1), 300, (16, 16), pcfg))
    assert (corners % 4 == 0).all() and corners.min() >= 0 and corners.max() <= 8
    assert len({tuple(c) for c in corners}) == 9  # rows/cols 0, 4, 8 although s = 8


# ------------------------------------------------------------------------------------------
# The MAE module.

@pytest.fixture(scope="module")
def mae_module():
    module = mae_models.MAEModule(8, 2, dim=16, encoder_depth=2, decoder_dim=8,
                                  decoder_depth=1, num_heads=2, mlp_ratio=2.0,
                                  dtype=jnp.float32, rngs=nnx.Rngs(0))
    return perturbed(module, seed=1)


def _feature_case():
    """Features [2, 8, 8, 8] cut into 2 x 2 cells (a 4 x 4 token grid) and, per image, a
    2 x 2-token patch (tokens 5, 6, 9, 10 and 10, 11, 14, 15 masked)."""
    h = jnp.asarray(np.random.default_rng(2).standard_normal((2, 8, 8, 8)), jnp.float32)
    pcfg = maediff_configs.get_config("tiny").patch  # p 8, r 4 in pixels; 2 x 2 tokens
    corners = np.array([[4, 4], [8, 8]], np.int32)
    visible = maediff.visible_tokens(corners, (16, 16), pcfg)
    # The same patches on the 8 x 8 feature map: 4 x 4 features each.
    feature_mask = np.zeros((2, 8, 8, 1), np.float32)
    feature_mask[0, 2:6, 2:6] = 1
    feature_mask[1, 4:8, 4:8] = 1
    return h, visible, feature_mask


def test_mae_encoder_sees_only_visible_tokens(mae_module, monkeypatch):
    h, visible, feature_mask = _feature_case()
    assert visible.shape == (2, 12)
    changed = h + 5.0 * feature_mask * jnp.asarray(
        np.random.default_rng(3).standard_normal(h.shape), jnp.float32)
    encoded = mae_module.encode(h, visible)
    assert encoded.shape == (2, 12, 16)
    # New content in the masked (noised) tokens leaves the encoder output exactly unchanged,
    np.testing.assert_array_equal(mae_module.encode(changed, visible), encoded)
    # while the decoder, which sees the entire feature map, does change.
    out, out_changed = mae_module(h, visible), mae_module(changed, visible)
    assert out.shape == h.shape
    unmasked = 1.0 - feature_mask
    assert float(jnp.abs((out_changed - changed - (out - h)) * unmasked).max()) > 1e-3

    # Every encoder block runs on exactly the Nv visible tokens, the decoder on all N.
    shapes = []
    call = mae_models.TransformerBlock.__call__

    def recording_call(self, x):
        shapes.append(tuple(x.shape))
        return call(self, x)

    monkeypatch.setattr(mae_models.TransformerBlock, "__call__", recording_call)
    mae_module(h, visible)
    assert shapes == [(2, 12, 16), (2, 12, 16), (2, 16, 8)]


def test_mae_encoder_matches_a_per_image_loop(mae_module):
    h, visible, _ = _feature_case()
    encoded = np.asarray(mae_module.encode(h, visible))
    tokens = np.asarray(mae_models.patchify(h, 2))  # [2, 16, 32]
    pos = mae_models.sincos_pos_embed_2d(16, 4, 4)
    for b, vis in enumerate(np.asarray(visible)):
        x = mae_module.embed(jnp.asarray(tokens[b, vis][None])) + pos[vis]
        for block in mae_module.encoder:
            x = block(x)
        np.testing.assert_allclose(encoded[b], mae_module.encoder_norm(x)[0], atol=1e-5)


def test_patchify_roundtrip_and_position_embedding():
    h = jnp.arange(2 * 6 * 4 * 3, dtype=jnp.float32).reshape(2, 6, 4, 3)
    tokens = mae_models.patchify(h, 2)
    assert tokens.shape == (2, 6, 12)
    np.testing.assert_array_equal(tokens[0, 1], np.asarray(h[0, 0:2, 2:4]).reshape(-1))
    np.testing.assert_array_equal(mae_models.unpatchify(tokens, 2, 3, 2), h)
    pos = mae_models.sincos_pos_embed_2d(8, 3, 2)
    # token (row 1, col 0): rows part [sin(1 * w), cos(1 * w)], cols part [sin 0, cos 0].
    w = 1.0 / 10000.0 ** (np.arange(2) / 2.0)
    np.testing.assert_allclose(pos[2], np.concatenate([np.sin(w), np.cos(w), [0, 0, 1, 1]]),
                               atol=1e-6)


def test_network_starts_as_its_unet_and_the_plain_unet_path_is_unchanged():
    config = _one_level(maediff_configs.get_config("tiny"))
    model = make_model(config.model, seed=0)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 16, 16, 1)), jnp.float32)
    t = jnp.array([10, 700])
    visible = maediff.visible_tokens(np.array([[0, 4], [8, 8]]), (16, 16), config.patch)
    both = nnx.jit(lambda m: (m(x, t, visible), m.unet(x, t)))
    model.unet.conv_out = perturbed(model.unet.conv_out)  # a non-constant output
    # The MAE head is zero-initialised: the module adds nothing at initialisation.
    with_mae, plain = both(model)
    assert float(jnp.abs(plain).max()) > 1e-3
    np.testing.assert_allclose(with_mae, plain, atol=1e-6)
    with_mae, plain = both(perturbed(model))
    assert float(jnp.abs(with_mae - plain).max()) > 1e-3
    two_levels = maediff_configs.get_config("tiny").model.to_dict()  # down-sampling by 2
    with pytest.raises(ValueError, match="multiple"):
        make_model(two_levels | {"token_size": 3}, seed=0)


# ------------------------------------------------------------------------------------------
# Training.

class Recorder(Halver):
    """Halver that keeps the last input it saw."""

    def __call__(self, x_t, t, visible, *args, **kwargs):
        self.x_t, self.visible = x_t, visible
        return super().__call__(x_t, t)


def test_training_noises_one_patch_and_passes_its_visible_cells():
    config = maediff_configs.get_config("tiny")
    config.diffusion.train_t_range = (500, 500)  # noised pixels surely differ from x0
    batch = random_batch(np.random.default_rng(0), b=8)
    x0 = np.asarray(batch["image"] * 2 - 1)[..., 0]
    model = Recorder()
    loss, _ = maediff.loss_fn(model, batch, jax.random.key(1), config)
    assert float(loss) > 0
    changed = np.asarray(model.x_t)[..., 0] != x0  # [B, H, W]
    corners = maediff.sliding_corners((16, 16), config.patch)
    for image_changed, visible in zip(changed, np.asarray(model.visible)):
        # Exactly one sliding patch is noised, the visible cells are the rest.
        hits = [c for c in corners if image_changed[c[0]:c[0] + 8, c[1]:c[1] + 8].all()
                and image_changed.sum() == 64]
        assert len(hits) == 1
        assert visible.tolist() == _visible_by_loop(hits[0], (16, 16), 8, 4)


def test_loss_counts_only_the_patch():
    config = maediff_configs.get_config("tiny")
    batch = random_batch(np.random.default_rng(1), b=4)
    key = jax.random.key(2)
    x0 = batch["image"] * 2 - 1

    class GarbageOutside:
        def __call__(self, x_t, t, visible, *args, **kwargs):
            return jnp.where(x_t == x0, 123.0, x_t * 0.5)

    reference, _ = maediff.loss_fn(Halver(), batch, key, config)
    garbage, _ = maediff.loss_fn(GarbageOutside(), batch, key, config)
    assert float(garbage) == pytest.approx(float(reference), rel=1e-6)
    config.patch.loss_reduction = "patch"
    patch_mean, _ = maediff.loss_fn(Halver(), batch, key, config)
    assert float(reference) == pytest.approx(float(patch_mean) * 64 / 256, rel=1e-5)
    config.patch.loss_reduction = "pixel"
    with pytest.raises(ValueError, match="loss_reduction"):
        maediff.loss_fn(Halver(), batch, key, config)


# ------------------------------------------------------------------------------------------
# Score: the sliding sweep against a loop, and the overlap weights.

def _loop_reconstruction(model, x0, key, config):
    """One network call per (t, position) in Python, overlaps averaged by hand."""
    dcfg, pcfg = config.diffusion, config.patch
    schedule = shared.schedule_of(config)
    noise_fn = shared.noise_fn_of(dcfg)
    call = nnx.jit(lambda m, x, t, v: m(x, t, v))
    b, height, width, _ = x0.shape
    rows = list(range(0, height - pcfg.size + 1, pcfg.stride))
    cols = list(range(0, width - pcfg.size + 1, pcfg.stride))
    recs = []
    for t_value, k in zip(dcfg.test_timesteps, jax.random.split(key, len(dcfg.test_timesteps))):
        t = jnp.full((b,), t_value, jnp.int32)
        noise = noise_fn(k, x0.shape, t)
        x_t_full = np.asarray(diffusion.q_sample(schedule, x0=x0, t=t, noise=noise))
        total = np.zeros(x0.shape, np.float32)
        count = np.zeros(x0.shape, np.float32)
        for r0 in rows:
            for c0 in cols:
                x_t = np.array(x0)
                x_t[:, r0:r0 + pcfg.size, c0:c0 + pcfg.size] = \
                    x_t_full[:, r0:r0 + pcfg.size, c0:c0 + pcfg.size]
                visible = np.array([_visible_by_loop((r0, c0), (height, width), pcfg.size,
                                                     pcfg.sub_size)] * b, np.int32)
                pred = np.asarray(call(model, jnp.asarray(x_t), t, jnp.asarray(visible)))
                total[:, r0:r0 + pcfg.size, c0:c0 + pcfg.size] += \
                    pred[:, r0:r0 + pcfg.size, c0:c0 + pcfg.size]
                count[:, r0:r0 + pcfg.size, c0:c0 + pcfg.size] += 1
        recs.append(total / count)
    return np.mean(recs, axis=0)


@pytest.fixture(scope="module")
def tiny_network():
    return perturbed(make_model(_one_level(maediff_configs.get_config("tiny")).model, seed=0))


@pytest.mark.parametrize("variant,chunk", [
    ("tiny", None),      # 3 x 3 sliding positions, one t, all at once
    ("tiny,ens", 4),     # 3 t x 9 positions, in chunks of 4 (a ragged last chunk)
])
def test_sliding_sweep_matches_a_loop(tiny_network, variant, chunk):
    config = _one_level(maediff_configs.get_config(variant))
    batch = random_batch(np.random.default_rng(4), b=2)
    key = jax.random.key(5)

    def score(cfg):
        return jax.jit(lambda b, k: maediff.score_fn({"diffusion": tiny_network}, b, k, cfg))(
            batch, key)

    out = score(config)
    expected = (_loop_reconstruction(tiny_network, batch["image"] * 2 - 1, key, config) + 1) / 2
    assert np.abs(expected - np.asarray(batch["image"])).max() > 1e-2  # not a trivial model
    np.testing.assert_allclose(out["reconstruction"], expected, atol=1e-5)
    np.testing.assert_allclose(out["score"], np.abs(batch["image"] - expected)[..., 0],
                               atol=1e-5)
    if chunk is not None:
        chunked = copy.deepcopy(config)
        chunked.diffusion.sweep_chunk = chunk
        np.testing.assert_allclose(score(chunked)["reconstruction"], out["reconstruction"],
                                   atol=1e-6)


def test_overlapping_reconstructions_are_averaged_by_coverage():
    """16 px, p 8, s 4: positions at rows/cols {0, 4, 8}. Along one axis pixels 0-3 are
    covered by the patch at 0 only, 4-7 by those at 0 and 4, 8-11 by 4 and 8, 12-15 by 8 only;
    a pixel's value must be the plain mean of the constants of the patches covering it."""
    config = maediff_configs.get_config("tiny")
    corners = [tuple(c) for c in maediff.sliding_corners((16, 16), config.patch)]
    constants = {c: float(k + 1) ** 2 for k, c in enumerate(corners)}  # distinct per position

    class ConstantPerPosition:
        """Predicts x0 = a constant that identifies the patch from its visible cells."""

        def __call__(self, x_t, t, visible, *args, **kwargs):
            table = jnp.zeros((16 * 16,))
            for c, value in constants.items():
                key = int(np.sum(_visible_by_loop(c, (16, 16), 8, 4)))
                table = table.at[key].set(value)
            value = table[jnp.sum(visible, axis=-1)]  # [B]
            return jnp.broadcast_to(value[:, None, None, None], x_t.shape)

    x0 = jnp.zeros((1, 16, 16, 1))
    rec = np.asarray(maediff.reconstruct(ConstantPerPosition(), x0, jax.random.key(0),
                                         config))[0, ..., 0]
    covering = {0: [0], 1: [0, 4], 2: [4, 8], 3: [8]}  # pixel // 4 -> covering starts
    for i in range(16):
        for j in range(16):
            values = [constants[(a, b)] for a in covering[i // 4] for b in covering[j // 4]]
            assert rec[i, j] == pytest.approx(np.mean(values), rel=1e-6), (i, j)
    # e.g. the centre pixel (5, 5) averages 4 patches, the corner (0, 0) only one.
    assert rec[0, 0] == pytest.approx(constants[(0, 0)])
    assert rec[5, 5] == pytest.approx(np.mean([constants[c] for c in
                                               [(0, 0), (0, 4), (4, 0), (4, 4)]]))


# ------------------------------------------------------------------------------------------
# Config and end to end.

def test_config_variants():
    assert get_method("maediff") is maediff.METHOD
    paper = maediff_configs.get_config("paper")
    p = paper.patch
    assert (p.size, p.stride, p.sub_size, p.train_positions) == (48, 16, 8, "grid")
    assert paper.model.name == "maediff_unet" and paper.model.token_size == 8
    assert paper.model.base_channels == 128 and paper.data.image_size == (96, 96)
    assert paper.diffusion.test_timesteps == (499,) and paper.diffusion.noise == "simplex"
    assert (paper.train.learning_rate, paper.train.num_steps) == (1e-4, 19200)
    cpu = maediff_configs.get_config("cpu,short")
    assert (cpu.patch.size, cpu.patch.stride, cpu.patch.sub_size) == (32, 16, 8)
    assert cpu.diffusion.test_timesteps == (749,) and cpu.train.num_steps == 300
    # r is one field: overriding the patch's sub-level size changes the network's tokens.
    cpu.patch.sub_size = 16
    assert cpu.model.token_size == 16
    assert maediff_configs.get_config("tiny,ens").diffusion.test_timesteps == (249, 499, 749)
    grid = maediff_configs.get_config("paper,grid").patch
    assert grid.stride == grid.size == 48
    with pytest.raises(ValueError, match="modifiers"):
        maediff_configs.get_config("paper,bogus")
    tiny = maediff_configs.get_config("tiny")
    # A model section decoupled from patch.sub_size whose tokens no longer match the cells.
    tiny.model = ml_collections.ConfigDict(tiny.model.to_dict())
    tiny.model.token_size = 8
    with pytest.raises(ValueError, match="token_size"):
        maediff.loss_fn(Halver(), random_batch(np.random.default_rng(0)), jax.random.key(0),
                        tiny)


def test_tiny_end_to_end(tiny_data, tmp_path):
    config = _one_level(maediff_configs.get_config("tiny"))
    run_tiny_end_to_end(config, tiny_data, tmp_path / "run")
