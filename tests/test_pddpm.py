"""pDDPM: patch geometry, patch-restricted training, the patch sweep against a loop, a tiny run."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers_methods import Halver, perturbed, random_batch, run_tiny_end_to_end

from configs import pddpm as pddpm_configs
from uadjax import diffusion
from uadjax.inference import patches
from uadjax.methods import get_method, pddpm, shared
from uadjax.models import make_model


class Recorder(Halver):
    """Halver that keeps the last input it saw."""

    def __call__(self, x_t, t, *args, **kwargs):
        self.x_t, self.t = x_t, t
        return super().__call__(x_t, t)


def _one_level(config):
    """The tiny config with a one-level UNet (no down-sampling; the middle attention still
    sees the whole image): the methods' logic, not the network, is under test here, and XLA
    compiles it in about a quarter of the time."""
    config.model.channel_mult = (1,)
    return config


def _random_unet(config, seed=0):
    """The tiny UNet with every parameter perturbed."""
    return perturbed(make_model(config.model, seed=seed), seed)


# ------------------------------------------------------------------------------------------
# Geometry.

@pytest.mark.parametrize("image_size,size,stride", [
    (96, 48, 48), (96, 48, 24), (64, 32, 32), (16, 8, 3), ((16, 12), 8, 5), (10, 10, 1)])
def test_patches_cover_every_pixel(image_size, size, stride):
    positions = patches.patch_positions(image_size, size, stride)
    masks = pddpm.patch_masks(image_size, size, stride)
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    assert masks.shape == (len(positions), height, width)
    assert (masks.sum(0) >= 1).all()
    assert (masks.reshape(len(masks), -1).sum(1) == size * size).all()
    # The last patch is flush with the bottom-right border.
    assert positions[:, 0].max() == height - size and positions[:, 1].max() == width - size


def test_paper_grid_and_overlap_positions():
    grid = patches.patch_positions(96, 48, 48)
    assert grid.tolist() == [[0, 0], [0, 48], [48, 0], [48, 48]]
    np.testing.assert_array_equal(pddpm.patch_masks(96, 48, 48).sum(0), 1.0)
    overlap = patches.patch_positions(96, 48, 24)
    assert sorted({int(r) for r in overlap[:, 0]}) == [0, 24, 48]
    # A stride that does not divide: 0, 3, 6 and the border position 8.
    uneven = patches.patch_positions(16, 8, 3)
    assert sorted({int(r) for r in uneven[:, 0]}) == [0, 3, 6, 8] and len(uneven) == 16


@pytest.mark.parametrize("size,stride,match", [
    (17, 8, "larger than the image"), (0, 1, "size"), (8, 0, "stride"), (8, 9, "stride")])
def test_bad_geometry_raises(size, stride, match):
    with pytest.raises(ValueError, match=match):
        patches.patch_positions(16, size, stride)


def test_random_training_boxes_stay_inside():
    config = pddpm_configs.get_config("tiny,overlap")
    corners = shared.sample_boxes(jax.random.key(0), 500, (16, 16), config.patch)
    assert corners.min() >= 0 and corners.max() <= 16 - config.patch.size
    assert len({tuple(c) for c in np.asarray(corners)}) > 20
    config.patch.train_positions = "everywhere"
    with pytest.raises(ValueError, match="train_positions"):
        shared.sample_boxes(jax.random.key(0), 2, (16, 16), config.patch)


# ------------------------------------------------------------------------------------------
# Training.

def _training_config():
    config = pddpm_configs.get_config("tiny")
    config.diffusion.train_t_range = (500, 500)  # noised pixels surely differ from x0
    return config


def test_training_noises_exactly_one_grid_box():
    config = _training_config()
    batch = random_batch(np.random.default_rng(0), b=8)
    x0 = np.asarray(batch["image"] * 2 - 1)
    model = Recorder()
    pddpm.loss_fn(model, batch, jax.random.key(1), config)
    changed = np.asarray(model.x_t)[..., 0] != x0[..., 0]  # [B, H, W]
    grid = pddpm.patch_masks(16, config.patch.size, config.patch.stride) > 0
    for image_changed in changed:
        # Outside the box x_t is x0 exactly, inside every pixel is noised.
        assert any((image_changed == box).all() for box in grid)


def test_loss_ignores_predictions_outside_the_box():
    config = _training_config()
    batch = random_batch(np.random.default_rng(1), b=4)
    key = jax.random.key(2)
    x0 = batch["image"] * 2 - 1

    class GarbageOutside:
        def __call__(self, x_t, t, *args, **kwargs):
            return jnp.where(x_t == x0, 123.0, x_t * 0.5)

    reference, _ = pddpm.loss_fn(Halver(), batch, key, config)
    garbage, _ = pddpm.loss_fn(GarbageOutside(), batch, key, config)
    assert float(garbage) == pytest.approx(float(reference), rel=1e-6)
    assert float(reference) > 0
    # 'image' averages over the whole image: the patch mean times the patch / image area.
    config.patch.loss_reduction = "patch"
    patch_mean, _ = pddpm.loss_fn(Halver(), batch, key, config)
    assert float(reference) == pytest.approx(float(patch_mean) * (8 * 8) / (16 * 16), rel=1e-5)
    config.patch.loss_reduction = "pixel"
    with pytest.raises(ValueError, match="loss_reduction"):
        pddpm.loss_fn(Halver(), batch, key, config)


# ------------------------------------------------------------------------------------------
# Score: the vmapped (t, position) sweep against a slow loop.

def _loop_reconstruction(model, x0, key, config):
    """One network call per (t, position), stitched by hand; x0 [B, H, W, C] in [-1, 1]."""
    dcfg, pcfg = config.diffusion, config.patch
    schedule = shared.schedule_of(config)
    noise_fn = shared.noise_fn_of(dcfg)
    call = nnx.jit(lambda m, x, t: m(x, t))
    masks = pddpm.patch_masks(x0.shape[1:3], pcfg.size, pcfg.stride)
    keys = jax.random.split(key, len(dcfg.test_timesteps))
    recs = []
    for t_value, k in zip(dcfg.test_timesteps, keys):
        t = jnp.full((x0.shape[0],), t_value, jnp.int32)
        noise = noise_fn(k, x0.shape, t)
        x_t_full = diffusion.q_sample(schedule, x0=x0, t=t, noise=noise)
        total = np.zeros(x0.shape, np.float32)
        for mask in masks:
            m = mask[None, :, :, None]
            pred = np.asarray(call(model, m * x_t_full + (1 - m) * x0, t))
            total += pred * m
        recs.append(total / masks.sum(0)[None, :, :, None])
    return np.mean(recs, axis=0)


@pytest.fixture(scope="module")
def tiny_unet():
    return _random_unet(_one_level(pddpm_configs.get_config("tiny")))


@pytest.mark.parametrize("variant,stride,chunk", [
    ("tiny", None, None),     # the paper's 2x2 grid, one t
    ("tiny,ens,overlap", 5, 4),  # 3 t x 9 overlapping positions (rows 0, 5, 8), in chunks
])
def test_patch_sweep_matches_a_loop(tiny_unet, variant, stride, chunk):
    config = pddpm_configs.get_config(variant)
    if stride is not None:
        config.patch.stride = stride  # includes a last position flush with the border
    batch = random_batch(np.random.default_rng(4), b=2)
    key = jax.random.key(5)

    def score(cfg):
        return jax.jit(lambda b, k: pddpm.score_fn({"diffusion": tiny_unet}, b, k, cfg))(
            batch, key)

    out = score(config)
    expected = (_loop_reconstruction(tiny_unet, batch["image"] * 2 - 1, key, config) + 1) / 2
    assert np.abs(expected - np.asarray(batch["image"])).max() > 1e-2  # not a trivial model
    np.testing.assert_allclose(out["reconstruction"], expected, atol=1e-5)
    np.testing.assert_allclose(out["score"], np.abs(batch["image"] - expected)[..., 0],
                               atol=1e-5)
    if chunk is not None:
        # Evaluating the variants in chunks (lax.map, a ragged last chunk) changes nothing.
        chunked = copy.deepcopy(config)
        chunked.diffusion.sweep_chunk = chunk
        np.testing.assert_allclose(score(chunked)["reconstruction"], out["reconstruction"],
                                   atol=1e-6)


def test_l2_residual():
    config = pddpm_configs.get_config("tiny")
    config.diffusion.residual = "l2"
    batch = random_batch(np.random.default_rng(6))
    out = pddpm.score_fn({"diffusion": Halver()}, batch, jax.random.key(0), config)
    np.testing.assert_allclose(out["score"],
                               ((batch["image"] - out["reconstruction"]) ** 2)[..., 0],
                               atol=1e-6)


# ------------------------------------------------------------------------------------------
# Config and end to end.

def test_config_variants():
    assert get_method("pddpm") is pddpm.METHOD
    paper = pddpm_configs.get_config("paper")
    assert (paper.patch.size, paper.patch.stride, paper.patch.train_positions) == (48, 48, "grid")
    assert paper.patch.loss_reduction == "image"
    assert paper.diffusion.test_timesteps == (499,) and paper.diffusion.noise == "simplex"
    assert (paper.train.learning_rate, paper.train.num_steps, paper.train.batch_size) == (
        1e-4, 19200, 32)
    assert paper.model.base_channels == 128
    cpu = pddpm_configs.get_config("cpu,ens")
    assert cpu.patch.size == 32 and cpu.data.image_size == (64, 64)
    assert cpu.diffusion.test_timesteps == (249, 499, 749)
    assert cpu.diffusion.train_t_range == (200, 900)
    assert pddpm_configs.get_config("cpu").diffusion.test_timesteps == (749,)
    overlap = pddpm_configs.get_config("paper,overlap").patch
    assert (overlap.stride, overlap.train_positions) == (24, "random")
    tiny = pddpm_configs.get_config("tiny,short")
    assert tiny.patch.size * 2 == tiny.data.image_size[0]
    with pytest.raises(ValueError, match="modifiers"):
        pddpm_configs.get_config("paper,bogus")


def test_tiny_end_to_end(tiny_data, tmp_path):
    config = _one_level(pddpm_configs.get_config("tiny"))
    run_tiny_end_to_end(config, tiny_data, tmp_path / "run")
