"""DISYRE: the corruption, the severity-to-t map, the restorations, the sliding window
against a plain loop, configs and a tiny end-to-end run."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from flax import nnx
from helpers_methods import perturbed, random_batch, run_tiny_end_to_end

from configs import disyre as disyre_configs
from uadjax.inference import sliding_window as sw
from uadjax.methods import disyre, get_method
from uadjax.models import make_model


def _disc_brain(n, size, radius_fraction=0.4):
    yy, xx = np.mgrid[:size, :size]
    centre = (size - 1) / 2
    disc = ((yy - centre) ** 2 + (xx - centre) ** 2) <= (radius_fraction * size) ** 2
    return jnp.asarray(np.repeat(disc[None].astype(np.float32), n, 0))


# ------------------------------------------------------------------------------------------
# Severity schedule and timesteps.

def test_severity_schedule_closed_form():
    dcfg = disyre_configs.get_config("paper").disyre
    table = disyre.severity_schedule(dcfg)
    betas = np.linspace(1e-3, 0.2, 100, dtype=np.float64)
    np.testing.assert_allclose(table, np.sqrt(np.cumprod(1 - betas)), rtol=1e-6)
    assert table.shape == (100,) and np.all(np.diff(table) < 0)
    np.testing.assert_allclose(table[[0, -1]], [0.9995, 0.0045155], atol=1e-6)


def test_severity_to_t_is_the_nearest_label():
    table = disyre.severity_schedule(disyre_configs.get_config("paper").disyre)
    # The authors' examples (docs/methods.md, DISYRE): strong anomalies get small t.
    alphas = np.array([0.99, 0.9, 0.75, 0.5, 0.25, 0.1, 0.05, 0.01, 0.0])
    np.testing.assert_array_equal(disyre.severity_to_t(jnp.asarray(alphas), table),
                                  [3, 13, 23, 36, 51, 65, 74, 92, 99])
    # Brute force on a fine grid.
    grid = np.linspace(0, 1, 2001, dtype=np.float32)
    expected = [int(np.argmin(np.abs(table - a))) for a in grid]
    np.testing.assert_array_equal(disyre.severity_to_t(jnp.asarray(grid), table), expected)


def test_default_test_labels_are_the_strong_anomaly_severities():
    """D3: the default labels are the t of severities 1.0, 0.99, 0.90 and 0.73 under the
    training mapping; the `notebook` modifier gives the authors' spacing 99, 74, 49, 24."""
    for size in ("paper", "cpu", "tiny"):
        scfg = disyre_configs.get_config(size).disyre
        labels = disyre.test_labels(scfg)
        np.testing.assert_array_equal(labels, [0, 3, 13, 24])
        severities = jnp.asarray([1.0, 0.99, 0.90, 0.73])
        np.testing.assert_array_equal(
            disyre.severity_to_t(severities, disyre.severity_schedule(scfg)), labels)
        assert disyre.severity_schedule(scfg)[labels].min() > 0.7  # all strong anomalies
    notebook = disyre_configs.get_config("cpu,notebook").disyre
    np.testing.assert_array_equal(disyre.test_labels(notebook), [99, 74, 49, 24])
    assert disyre.severity_schedule(notebook)[disyre.test_labels(notebook)].min() < 0.01


def test_inference_timesteps_are_the_trailing_spacing():
    np.testing.assert_array_equal(disyre.inference_timesteps(100, 4), [99, 74, 49, 24])
    np.testing.assert_array_equal(disyre.inference_timesteps(100, 5), [99, 79, 59, 39, 19])
    with pytest.raises(ValueError, match="test timesteps"):
        disyre.inference_timesteps(100, 0)


# ------------------------------------------------------------------------------------------
# Masks and corruption.

@pytest.mark.parametrize("mode", ["reflect", "constant"])
@pytest.mark.parametrize("sigma", [0.0, 0.3, 0.7, 2.5])
def test_gaussian_blur_matches_scipy(sigma, mode):
    rng = np.random.default_rng(0)
    images = (rng.random((2, 20, 24)) > 0.7).astype(np.float32)
    out = disyre.gaussian_blur(jnp.asarray(images), jnp.full((2,), sigma), 2.5, mode=mode)
    for image, blurred in zip(images, np.asarray(out)):
        expected = scipy.ndimage.gaussian_filter(image, sigma, mode=mode, truncate=4.0)
        np.testing.assert_allclose(blurred, expected, atol=1e-5)


def test_soft_masks_stay_inside_the_anomaly_box_and_the_brain():
    config = disyre_configs.get_config("paper")
    dcfg = config.disyre
    dcfg.blur_p = 1.0
    brain = _disc_brain(32, 64)
    m, corners = disyre.soft_anomaly_masks(jax.random.key(0), brain, dcfg)
    m, corners = np.asarray(m), np.asarray(corners)
    box = dcfg.anomaly_box
    for mask, (r, c) in zip(m, corners):
        outside = np.ones_like(mask, bool)
        outside[r:r + box, c:c + box] = False
        assert mask.max() > 0 and np.all(mask[outside] == 0)
    assert m.min() >= 0 and m.max() <= 1
    assert np.all(m[np.asarray(brain) == 0] == 0)
    fractional = ((m > 0.01) & (m < 0.99)).reshape(32, -1).sum(1)
    assert (fractional > 0).mean() > 0.8  # blurred edges (sigma ~ U(0, 2.5) can be ~0)
    dcfg.blur_p = 0.0
    hard, _ = disyre.soft_anomaly_masks(jax.random.key(0), brain, dcfg)
    assert set(np.unique(np.asarray(hard))) <= {0.0, 1.0}


def test_all_three_shape_kinds_are_drawn():
    dcfg = disyre_configs.get_config("paper").disyre
    masks = np.asarray(disyre.shape_masks(jax.random.key(2), 300, dcfg))
    assert masks.shape == (300, dcfg.anomaly_box, dcfg.anomaly_box)
    assert set(np.unique(masks)) <= {0.0, 1.0}
    areas = masks.reshape(300, -1).sum(1)
    rows_extent = np.array([np.ptp(np.nonzero(m)[0]) + 1 for m in masks])
    cols_extent = np.array([np.ptp(np.nonzero(m)[1]) + 1 for m in masks])
    fill = areas / (rows_extent * cols_extent)
    assert (fill > 0.95).sum() > 20           # unrotated rectangles
    assert ((fill > 0.74) & (fill < 0.83)).sum() > 20  # discs (pi / 4 = 0.785)
    # Irregular shapes: the authors' big ones fill most of the box.
    assert (areas >= 0.5 * dcfg.anomaly_box**2).sum() > 40
    # Each mask is the shape of its drawn kind (the draw `shape_masks` makes, recomputed):
    # rectangles (unrotated ones fill their extent), discs, and the irregular shapes
    # exactly as `irregular_shapes` makes them.
    keys = jax.random.split(jax.random.key(2), 7)
    kind = np.asarray(jax.random.randint(keys[0], (300,), 0, 3))
    blobs = np.asarray(disyre.irregular_shapes(
        keys[6], disyre.blob_fill_fractions(keys[5], 300, dcfg), dcfg.anomaly_box)) > 0
    assert {0, 1, 2} <= set(kind.tolist()) and min(np.bincount(kind)) > 70
    np.testing.assert_array_equal(masks[kind == 2] > 0, blobs[kind == 2])
    assert np.median(fill[kind == 1]) == pytest.approx(np.pi / 4, abs=0.06)
    assert not np.array_equal(masks[kind == 0] > 0, blobs[kind == 0])
    assert np.median(fill[kind == 0]) > 0.8  # rectangles, half of them rotated


def test_irregular_shapes_fill_the_box_as_the_authors_shapes():
    """Fill of the box: range 24-100 %, mean 74 % (issue 22's measurement of the authors'
    shipped shapes); each shape's area is its drawn fill."""
    dcfg = disyre_configs.get_config("cpu").disyre
    fill = np.asarray(disyre.blob_fill_fractions(jax.random.key(0), 20000, dcfg))
    assert fill.min() >= 0.24 and fill.max() <= 1.0
    assert fill.mean() == pytest.approx(0.74, abs=0.01)
    box = dcfg.anomaly_box
    shapes = np.asarray(disyre.irregular_shapes(jax.random.key(1), jnp.asarray(fill[:64]), box))
    areas = shapes.reshape(64, -1).mean(1)
    np.testing.assert_allclose(areas, fill[:64], atol=2.0 / box**2)
    lumps = []  # one lump: the largest component holds nearly all of the shape
    for shape in shapes:
        labels, _ = scipy.ndimage.label(shape)
        lumps.append(np.bincount(labels.ravel())[1:].max() / shape.sum())
    assert np.mean(np.array(lumps) >= 0.9) >= 0.95


def test_no_brain_means_no_anomaly():
    config = disyre_configs.get_config("cpu,dag")
    x = jnp.asarray(np.random.default_rng(0).random((3, 48, 48, 1)), jnp.float32)
    x_c, alpha, m = disyre.corrupt(jax.random.key(0), x, jnp.zeros((3, 48, 48)), config.disyre)
    np.testing.assert_array_equal(x_c, x)
    np.testing.assert_array_equal(alpha, 0.0)
    assert float(jnp.max(m)) == 0.0


def test_alpha_zero_returns_the_input():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.random((2, 16, 16, 1)), jnp.float32)
    fp = jnp.asarray(rng.random((2, 16, 16, 1)), jnp.float32)
    m = jnp.asarray(rng.random((2, 16, 16)), jnp.float32)
    np.testing.assert_array_equal(disyre.interpolate(x, fp, m, jnp.zeros(2)), x)
    # alpha = 1 and m = 1 gives the foreign patch; in between, the convex combination.
    np.testing.assert_allclose(disyre.interpolate(x, fp, jnp.ones_like(m), jnp.ones(2)), fp)
    half = disyre.interpolate(x, fp, m, jnp.full((2,), 0.5))
    np.testing.assert_allclose(half, x + 0.5 * m[..., None] * (fp - x), atol=1e-6)


def test_corruption_only_inside_the_mask_and_brain():
    for variant in ("paper", "paper,dag"):
        config = disyre_configs.get_config(variant)
        brain = _disc_brain(16, 64)
        x = jnp.asarray(np.random.default_rng(0).random((16, 64, 64, 1)), jnp.float32) * \
            brain[..., None]
        x_c, alpha, m = disyre.corrupt(jax.random.key(1), x, brain, config.disyre)
        outside = np.asarray(m) == 0
        np.testing.assert_array_equal(np.asarray(x_c)[outside], np.asarray(x)[outside])
        assert np.all(np.asarray(brain)[np.asarray(m) > 0] == 1)
        assert np.all((np.asarray(alpha) >= 0) & (np.asarray(alpha) <= 1))
        assert np.all(np.asarray(x_c) >= 0) and np.all(np.asarray(x_c) <= 1)
        assert float(jnp.abs(x_c - x).max()) > 0.1  # something was corrupted


def test_p_anomaly_zero_is_clean_and_labelled_weakest():
    config = disyre_configs.get_config("cpu")
    config.disyre.p_anomaly = 0.0
    x = jnp.asarray(np.random.default_rng(0).random((4, 48, 48, 1)), jnp.float32)
    x_c, alpha, _ = disyre.corrupt(jax.random.key(0), x, jnp.ones((4, 48, 48)), config.disyre)
    np.testing.assert_array_equal(x_c, x)
    t = disyre.severity_to_t(alpha, disyre.severity_schedule(config.disyre))
    np.testing.assert_array_equal(t, 99)


def test_foreign_patches_are_brain_crops_of_other_slices_in_the_box():
    """Each foreign patch is a box-sized crop of another slice, inside that slice's brain
    bounding box, placed in the anomaly box (zero elsewhere)."""
    b, size, box = 6, 48, 24
    brain = _disc_brain(b, size, radius_fraction=0.35)
    x = (jnp.arange(1, b + 1, dtype=jnp.float32)[:, None, None, None]
         * brain[..., None] / b)
    corners = jnp.asarray(np.random.default_rng(0).integers(0, size - box, (b, 2)), jnp.int32)
    fp = np.asarray(disyre.foreign_patches(jax.random.key(0), x, brain, corners, box))
    for i, (r, c) in enumerate(np.asarray(corners)):
        inside = fp[i, r:r + box, c:c + box, 0]
        outside = fp[i].copy()
        outside[r:r + box, c:c + box] = 0
        assert np.all(outside == 0)
        values = set(np.unique(inside)) - {0.0}
        assert len(values) == 1 and values != {float(x[i, size // 2, size // 2, 0])}
        # The disc covers ~ 75 % of its bounding box's crops; a roll would often be empty.
        assert (inside > 0).mean() > 0.5


def test_intensity_bias_alpha_is_the_largest_change():
    config = disyre_configs.get_config("paper,dag")
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.random((4, 32, 32, 1)), jnp.float32)
    m = jnp.zeros((4, 32, 32)).at[:, 8:20, 8:20].set(1.0)
    biased, alpha_bias = disyre.intensity_bias(jax.random.key(0), x, m, config.disyre)
    diff = np.abs(np.asarray(biased) - np.asarray(x))
    np.testing.assert_allclose(alpha_bias, diff.max(axis=(1, 2, 3)), atol=1e-7)
    assert diff[:, m[0] == 0].max() == 0  # only inside the shape
    assert np.all(np.asarray(biased) >= 0) and np.all(np.asarray(biased) <= 1)


def test_minmax_foreign_patch_matches_the_target_range():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(0.3, 0.6, (2, 16, 16, 1)), jnp.float32)
    fp = jnp.asarray(rng.uniform(0.0, 1.0, (2, 16, 16, 1)), jnp.float32)
    m = jnp.zeros((2, 16, 16)).at[:, 4:12, 4:12].set(1.0)
    out = np.asarray(disyre.minmax_to_region(fp, x, m))
    inside = np.asarray(m) > 0
    for i in range(2):
        np.testing.assert_allclose(out[i][inside[i]].min(), np.asarray(x)[i][inside[i]].min(),
                                   atol=1e-6)
        np.testing.assert_allclose(out[i][inside[i]].max(), np.asarray(x)[i][inside[i]].max(),
                                   atol=1e-6)


# ------------------------------------------------------------------------------------------
# Training loss.

class CleanOracle:
    """Stand-in restorer that returns a fixed image whatever its input (records t)."""

    def __init__(self, clean):
        self.clean = clean

    def __call__(self, x, t, *args, **kwargs):
        self.t = t
        return jnp.broadcast_to(self.clean, x.shape)


def test_loss_conditions_on_the_severity_label():
    config = disyre_configs.get_config("tiny")
    batch = random_batch(np.random.default_rng(0), b=4)
    seen = {}

    def model(x_c, t, **kwargs):
        seen["t"], seen["x_c"] = t, x_c
        return x_c

    loss, metrics = disyre.loss_fn(model, batch, jax.random.key(0), config)
    assert seen["x_c"].shape == (4, 8, 8, 1)   # the tiny patch size
    assert seen["t"].dtype == jnp.int32 and np.all((np.asarray(seen["t"]) >= 0) &
                                                   (np.asarray(seen["t"]) < 100))
    # The label is the training mapping of each patch's severity: the same keys give the
    # same corruption, and t = severity_to_t(alpha).
    scfg = config.disyre
    k_crop, k_corrupt, _ = jax.random.split(jax.random.key(0), 3)
    x, brain = disyre.random_crops(k_crop, batch, int(scfg.patch_size))
    x_c, alpha, _ = disyre.corrupt(k_corrupt, x, brain, scfg)
    np.testing.assert_array_equal(seen["x_c"], x_c)
    np.testing.assert_array_equal(
        seen["t"], disyre.severity_to_t(alpha, disyre.severity_schedule(scfg)))
    assert len(set(np.asarray(seen["t"]).tolist())) > 1  # not one constant label
    assert float(loss) >= 0 and np.isfinite(float(metrics["mean_severity"]))


# ------------------------------------------------------------------------------------------
# Restorations.

def test_single_step_ensemble_equals_a_loop():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((2, 8, 8, 1)), jnp.float32)

    def model(x, t, **kwargs):
        return jnp.tanh(x * (1 + t[:, None, None, None] / 50.0))

    residual, rec = disyre.restore_single_step(model, x, np.array([99, 74, 49, 24]))
    preds = [model(x, jnp.full((2,), t)) for t in (99, 74, 49, 24)]
    np.testing.assert_allclose(residual, np.mean([np.abs(x - p) for p in preds], 0), atol=1e-6)
    np.testing.assert_allclose(rec, np.mean(preds, 0), atol=1e-6)


def test_multi_step_with_an_oracle_follows_the_cold_diffusion_path():
    dcfg = disyre_configs.get_config("paper").disyre
    table = disyre.severity_schedule(dcfg)
    rng = np.random.default_rng(1)
    clean = jnp.asarray(rng.random((1, 8, 8, 1)) * 0.5, jnp.float32)
    x = jnp.clip(clean + 0.3 * jnp.asarray(rng.random((1, 8, 8, 1)), jnp.float32), 0, 1)
    residual, restored = disyre.restore_multi_step(CleanOracle(clean), x,
                                                   np.array([99, 74, 49, 24]), table)
    np.testing.assert_allclose(restored, clean, atol=1e-6)  # the last step returns x0_hat
    # Loop: labels from the strongest anomaly (t = 24) to the weakest (t = 99); the residual
    # shrinks by a_{i+1} / a_i at each step.
    ts = [24, 49, 74, 99]
    expected, current = np.zeros_like(x), np.asarray(x)
    for i, t in enumerate(ts):
        expected += np.abs(current - np.asarray(clean))
        ratio = table[ts[i + 1]] / table[t] if i + 1 < len(ts) else 0.0
        current = np.clip(np.asarray(clean) + ratio * (current - np.asarray(clean)), 0, 1)
    np.testing.assert_allclose(residual, expected / 4, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Sliding window.

def _loop_sliding_window(fn, image, window, step, weights):
    """Plain numpy loop: every window, weighted sum, divided by the summed weights."""
    b, h, w = image.shape[:3]
    ph, pw = max(h, window), max(w, window)
    padded = np.zeros((b, ph, pw) + image.shape[3:], np.float32)
    padded[:, :h, :w] = image
    starts_r = list(range(0, ph - window + 1, step))
    starts_c = list(range(0, pw - window + 1, step))
    if starts_r[-1] != ph - window:
        starts_r.append(ph - window)
    if starts_c[-1] != pw - window:
        starts_c.append(pw - window)
    out = np.zeros_like(padded)
    norm = np.zeros((ph, pw), np.float32)
    for r in starts_r:
        for c in starts_c:
            y = np.asarray(fn(jnp.asarray(padded[:, r:r + window, c:c + window])))
            out[:, r:r + window, c:c + window] += y * weights[..., None]
            norm[r:r + window, c:c + window] += weights
    return (out / norm[None, :, :, None])[:, :h, :w]


@pytest.mark.parametrize("hw,window,step,chunk", [
    ((24, 24), 8, 4, None), ((24, 20), 8, 6, 3), ((6, 10), 8, 4, None)])
def test_sliding_window_matches_a_loop(hw, window, step, chunk):
    rng = np.random.default_rng(0)
    image = rng.random((2,) + hw + (1,)).astype(np.float32)

    def fn(x):  # position-dependent and nonlinear: a wrong placement would show
        ramp = jnp.arange(x.shape[1], dtype=jnp.float32)[None, :, None, None]
        return jnp.sin(3 * x) + 0.1 * ramp

    weights = sw.gaussian_importance(window)
    out = sw.sliding_window(fn, jnp.asarray(image), window=window, step=step,
                            chunk_size=chunk)
    np.testing.assert_allclose(out, _loop_sliding_window(fn, image, window, step, weights),
                               atol=1e-5)


def test_gaussian_blending_of_a_constant_is_the_constant():
    image = jnp.zeros((1, 40, 40, 1))
    out = sw.sliding_window(lambda x: x + 2.5, image, window=16, step=4)
    np.testing.assert_allclose(out, 2.5, atol=1e-5)


def test_gaussian_importance_map():
    g = sw.gaussian_importance(128)
    assert g.shape == (128, 128) and g.max() == pytest.approx(1.0, abs=1e-3)
    assert g.min() >= 1e-3
    np.testing.assert_allclose(g, g.T)


def _random_unet(config, seed=0):
    """The tiny UNet with every parameter perturbed."""
    return perturbed(make_model(config.model, seed=seed), seed)


@pytest.mark.parametrize("variant,chunk", [("tiny", None), ("tiny,multistep", 2)])
def test_score_matches_a_window_loop(variant, chunk):
    config = disyre_configs.get_config(variant)
    config.model.channel_mult = (1,)  # the method, not the network, is under test
    config.disyre.window_chunk = chunk
    model = _random_unet(config)
    batch = random_batch(np.random.default_rng(4), b=2)
    brain = np.ones((2, 16, 16), np.float32)
    brain[:, :3] = 0  # windows with different foreground fractions
    batch["brain_mask"] = jnp.asarray(brain)
    out = jax.jit(lambda b: disyre.score_fn({"restoration": model}, b, None, config))(batch)
    dcfg = config.disyre
    weights = sw.gaussian_importance(dcfg.patch_size, dcfg.window_sigma_scale)

    def window_fn(stacked):  # image and foreground stacked as channels for the loop helper
        window = {"image": stacked[..., :1], "foreground": stacked[..., 1]}
        return disyre.window_score(model, window, config)["score"][..., None]

    stacked = np.concatenate([np.asarray(batch["image"]), brain[..., None]], axis=-1)
    expected = _loop_sliding_window(window_fn, stacked, dcfg.patch_size, dcfg.window_step,
                                    weights)[..., 0]
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(out["score"], expected, atol=1e-5)
    assert out["reconstruction"].shape == (2, 16, 16, 1)
    assert np.all(np.asarray(out["score"])[:, :3] == 0)  # zero outside the foreground


def test_foreground_weighting_scales_by_the_window_fraction():
    config = disyre_configs.get_config("tiny")
    x = jnp.full((1, 8, 8, 1), 0.5)
    fg = jnp.zeros((1, 8, 8)).at[:, :4].set(1.0)
    model = CleanOracle(jnp.zeros((1, 8, 8, 1)))
    out = disyre.window_score(model, {"image": x, "foreground": fg}, config)["score"]
    np.testing.assert_allclose(out, 0.5 * 0.5 * fg, atol=1e-6)  # residual x fraction x fg
    config.disyre.foreground_weighting = False
    out = disyre.window_score(model, {"image": x, "foreground": fg}, config)["score"]
    np.testing.assert_allclose(out, 0.5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Configs and end to end.

def test_config_variants():
    assert get_method("disyre") is disyre.METHOD
    paper = disyre_configs.get_config("paper")
    assert paper.data.normalisation == "quantile" and paper.data.modalities == ("t2",)
    assert paper.data.data_dir == ".cache/shards"  # the common paths survive the data swap
    assert paper.train.batch_size == 96 and paper.train.optimizer == "adamw"
    assert disyre_configs.get_config("paper,t1").data.modalities == ("t1",)
    assert disyre_configs.get_config("cpu,t1").model.in_channels == 1
    dag = disyre_configs.get_config("cpu,dag").disyre
    assert dag.intensity_bias and dag.normalize_fp == "minmax"
    assert disyre_configs.get_config("cpu,multistep").disyre.score_mode == "multi_step"
    full = disyre_configs.get_config("paper,1mm")
    assert full.disyre.patch_size == 128 and tuple(full.data.image_size) == (192, 192)
    assert disyre_configs.get_config("cpu,short").train.num_steps == 300
    with pytest.raises(ValueError, match="unknown disyre config modifiers"):
        disyre_configs.get_config("cpu,nope")


def test_1mm_config_traces_at_full_size():
    config = disyre_configs.get_config("paper,1mm")
    model = nnx.eval_shape(lambda: disyre.make_restorer(config, nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    batch = {"image": jax.ShapeDtypeStruct((2, 192, 192, 1), jnp.float32),
             "brain_mask": jax.ShapeDtypeStruct((2, 192, 192), jnp.float32)}
    out = jax.eval_shape(lambda s, b: disyre.score_fn({"restoration": nnx.merge(graphdef, s)},
                                                      b, None, config), state, batch)
    assert out["score"].shape == (2, 192, 192)


def test_tiny_end_to_end(tiny_data, tmp_path):
    config = disyre_configs.get_config("tiny")
    config.model.channel_mult = (1,)
    run_tiny_end_to_end(config, tiny_data, tmp_path / "run")


def test_same_seed_same_corruption():
    config = disyre_configs.get_config("cpu,dag")
    x = jnp.asarray(np.random.default_rng(0).random((4, 48, 48, 1)), jnp.float32)
    brain = _disc_brain(4, 48)
    a = disyre.corrupt(jax.random.key(7), x, brain, config.disyre)
    b = disyre.corrupt(jax.random.key(7), x, brain, copy.deepcopy(config).disyre)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
