"""The DDPM and threshold methods: losses, score sweeps against loops, config variants."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers_methods import Halver, random_batch

from configs import ddpm as ddpm_configs
from configs import threshold as threshold_configs
from uadjax import diffusion
from uadjax.methods import available_methods, ddpm, get_method, shared, threshold


def test_registry():
    assert {"ddpm", "threshold"} <= set(available_methods())
    assert get_method("ddpm") is ddpm.METHOD
    with pytest.raises(ValueError, match="unknown method"):
        get_method("nope")


def test_no_method_module_imports_another_method():
    """A method module imports `base`, `shared`, diffusion, inference and models, never
    another method (what methods share lives in `uadjax/methods/shared.py`)."""
    import ast
    import pathlib

    import uadjax.methods as methods_pkg

    folder = pathlib.Path(methods_pkg.__file__).parent
    methods = set(available_methods())
    allowed = {"base", "shared"}
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "uadjax.methods":
                    imported |= {a.name for a in node.names}
                elif node.module.startswith("uadjax.methods."):
                    imported.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                imported |= {a.name.split(".")[2] for a in node.names
                             if a.name.startswith("uadjax.methods.")}
        if path.stem == "__init__":
            continue
        others = (imported & methods) - {path.stem}
        assert not others, f"{path.name} imports the method module(s) {sorted(others)}"
        outside = {n for n in imported if n not in methods} - allowed
        assert not outside, f"{path.name} imports {sorted(outside)} from uadjax.methods"
    assert {"base", "shared"}.isdisjoint(methods)


def test_single_step_ensemble_equals_a_loop():
    config = ddpm_configs.get_config("tiny,ens")
    batch = random_batch(np.random.default_rng(0))
    key = jax.random.key(3)
    out = ddpm.score_fn({"diffusion": Halver()}, batch, key, config)
    schedule = shared.schedule_of(config)
    noise_fn = shared.noise_fn_of(config.diffusion)
    x0 = batch["image"] * 2 - 1
    keys = jax.random.split(key, 3)
    recs = []
    for t_value, k in zip(config.diffusion.test_timesteps, keys):
        t = jnp.full((2,), t_value, jnp.int32)
        x_t = diffusion.q_sample(schedule, x0=x0, t=t, noise=noise_fn(k, x0.shape, t))
        recs.append((x_t * 0.5 + 1) / 2)
    rec = np.mean(recs, axis=0)
    np.testing.assert_allclose(out["reconstruction"], rec, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["score"], np.abs(batch["image"] - rec)[..., 0], atol=1e-6)


def test_partial_diffusion_mode_runs_the_chain():
    config = ddpm_configs.get_config("tiny,anoddpm")
    config.diffusion.partial_t_start = 5
    batch = random_batch(np.random.default_rng(1))
    out = ddpm.score_fn({"diffusion": Halver()}, batch, jax.random.key(0), config)
    assert out["score"].shape == (2, 16, 16)
    assert np.isfinite(np.asarray(out["score"])).all()
    # L2 residual in the AnoDDPM variant.
    np.testing.assert_allclose(out["score"],
                               ((batch["image"] - out["reconstruction"]) ** 2)[..., 0],
                               atol=1e-6)


def test_loss_uses_the_configured_t_range_and_noise():
    config = ddpm_configs.get_config("tiny")
    config.diffusion.train_t_range = (10, 10)
    key = jax.random.key(0)
    batch = random_batch(np.random.default_rng(2))
    loss, _ = ddpm.loss_fn(Halver(), batch, key, config)
    x0 = batch["image"] * 2 - 1
    _, k_noise, _ = jax.random.split(key, 3)
    noise = shared.noise_fn_of(config.diffusion)(k_noise, x0.shape)
    x_t = diffusion.q_sample(shared.schedule_of(config), x0=x0, t=jnp.full((2,), 10),
                             noise=noise)
    assert float(loss) == pytest.approx(float(jnp.mean(jnp.abs(x_t * 0.5 - x0))), rel=1e-5)


def test_threshold_score_is_the_intensity():
    config = threshold_configs.get_config("tiny")
    batch = random_batch(np.random.default_rng(3), channels=2)
    out = threshold.score_fn({}, batch, None, config)
    np.testing.assert_allclose(out["score"], np.mean(batch["image"], axis=-1))


def test_config_variants():
    paper = ddpm_configs.get_config("paper")
    assert paper.diffusion.schedule == "cosine" and paper.diffusion.prediction == "x0"
    assert paper.diffusion.test_timesteps == (499,) and paper.model.base_channels == 128
    assert ddpm_configs.get_config("paper,ens").diffusion.test_timesteps == (249, 499, 749)
    assert ddpm_configs.get_config("cpu,flair").data.modalities == ("flair",)
    anoddpm = ddpm_configs.get_config("paper,anoddpm").diffusion
    assert (anoddpm.schedule, anoddpm.prediction, anoddpm.score_mode) == (
        "linear", "eps", "partial")
    with pytest.raises(ValueError, match="modifiers"):
        ddpm_configs.get_config("paper,bogus")
    with pytest.raises(ValueError, match="variant"):
        ddpm_configs.get_config("huge")
    locked = copy.deepcopy(paper)
    locked.lock()
    with pytest.raises(AttributeError):
        locked.train.not_a_field = 1
