"""Tests for uadjax.models: the guided-diffusion UNet, the registry and functional use."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from helpers_models import make_apply_fn, split_model

from uadjax.models import (
    UNet,
    available_models,
    count_params,
    default_unet_config,
    get_model_class,
    make_model,
    register_model,
)
from uadjax.models.layers import AttentionBlock, ResBlock, num_groups_for, timestep_embedding

TINY = {"base_channels": 8, "channel_mult": (1, 2), "num_res_blocks": 1, "num_head_channels": 8}
# The model that is really initialised and jit-compiled (one level keeps compilation short).
SMALL_COND = {"channel_mult": (1,), "cond_dim": 4, "dropout": 0.5}


def _tiny(**overrides):
    kwargs = dict(TINY)
    kwargs.update(overrides)
    return UNet(**kwargs, rngs=nnx.Rngs(0))


def _abstract(**overrides):
    """The module structure with abstract parameters: no compilation, no memory."""
    return nnx.eval_shape(lambda: _tiny(**overrides))


def _random_params(abstract_params, seed=1):
    """Random values for abstract parameters, drawn with NumPy on the host.

    Kernels ~ N(0, 1/fan_in), GroupNorm scales ~ 1 + N(0, 0.1^2), other vectors ~ N(0, 0.1^2).
    Host-side sampling keeps the tests free of per-shape compilations.
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if len(leaf.shape) >= 2:
            value = rng.standard_normal(leaf.shape) / math.sqrt(np.prod(leaf.shape[:-1]))
        else:
            value = 0.1 * rng.standard_normal(leaf.shape)
            if "scale" in jax.tree_util.keystr(path):
                value = value + 1.0
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract_params)


def _random_model(**overrides):
    """A UNet with random parameters everywhere (no zero layers), built without compiling."""
    graphdef, params, rest = split_model(_abstract(**overrides))
    return nnx.merge(graphdef, _random_params(params), rest)


def _inputs(batch=2, size=16, channels=1, seed=0):
    x = np.random.default_rng(seed).standard_normal((batch, size, size, channels))
    t = jnp.arange(batch, dtype=jnp.int32) * 300 + 1
    return jnp.asarray(x, jnp.float32), t


def _attention_count(model):
    return sum(isinstance(m, AttentionBlock) for _, m in nnx.iter_graph(model))


@pytest.fixture(scope="module")
def cond_model_init():
    """A one-level conditioned UNet with dropout and middle attention at init, split."""
    return split_model(_tiny(**SMALL_COND))


@pytest.fixture(scope="module")
def cond_model(cond_model_init):
    """The same UNet with perturbed parameters (zero-initialised layers made active)."""
    graphdef, params, rest = cond_model_init
    return graphdef, _random_params(params), rest


@pytest.fixture(scope="module")
def cond_apply(cond_model):
    graphdef, _, _ = cond_model
    return jax.jit(make_apply_fn(graphdef))


@pytest.mark.parametrize(
    "overrides, channels_in, channels_out, size",
    [
        ({}, 1, 1, 16),
        ({"use_timestep": False}, 1, 1, 16),
        ({"cond_dim": 4}, 1, 1, 16),
        ({"in_channels": 3, "out_channels": 2}, 3, 2, 16),
        ({"attention_resolutions": (1, 2), "num_head_channels": -1, "num_heads": 2}, 1, 1, 16),
        ({"channel_mult": (1, 3), "use_middle_attention": False}, 1, 1, 16),
        ({"resblock_updown": False, "use_scale_shift_norm": False}, 1, 1, 32),
        (
            {
                "resblock_updown": False,
                "conv_resample": False,
                "use_timestep": False,
                "cond_dim": 3,
            },
            1,
            1,
            16,
        ),
    ],
)
def test_output_shape(overrides, channels_in, channels_out, size):
    model = _random_model(**overrides)
    x, t = _inputs(size=size, channels=channels_in)
    cond = jnp.ones((2, overrides["cond_dim"])) if overrides.get("cond_dim") else None
    y = model(x, t if model.use_timestep else None, cond)
    assert y.shape == (2, size, size, channels_out)
    assert y.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y))) and float(jnp.abs(y).max()) > 0


def test_zero_init(cond_model_init):
    graphdef, params, rest = cond_model_init
    model = nnx.merge(graphdef, params, rest)
    zero_layers = [model.conv_out]
    for _, m in nnx.iter_graph(model):
        if isinstance(m, ResBlock):
            zero_layers.append(m.out_conv)
        elif isinstance(m, AttentionBlock):
            zero_layers.append(m.proj_out)
    assert len(zero_layers) == 1 + 5 + 1  # conv_out, ResBlocks (1 + 2 + 2), middle attention
    for layer in zero_layers:
        np.testing.assert_array_equal(layer.kernel[...], 0.0)
        np.testing.assert_array_equal(layer.bias[...], 0.0)
    assert float(jnp.abs(model.conv_in.kernel[...]).max()) > 0
    # The zero-initialised output conv makes the network output exactly zero at init.
    x, t = _inputs()
    np.testing.assert_array_equal(model(x, t, jnp.ones((2, 4))), 0.0)


def test_attention_placement():
    assert _attention_count(_abstract()) == 1  # middle only
    assert _attention_count(_abstract(use_middle_attention=False)) == 0
    # ds=2 is the second level: 1 encoder block + 2 decoder blocks, plus the middle.
    assert _attention_count(_abstract(attention_resolutions=(2,))) == 4
    # ds=1: 1 encoder + 2 decoder blocks at full resolution.
    assert _attention_count(_abstract(attention_resolutions=(1,), use_middle_attention=False)) == 3
    # ds=4 is the third level of (1, 2, 2): 2 + 3 blocks there.
    assert (
        _attention_count(
            _abstract(channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(4,))
        )
        == 6
    )


def test_layout_counts():
    model = _abstract(channel_mult=(1, 3, 2), num_res_blocks=2)
    # Encoder: 2 per level + 2 downsampling blocks; decoder: 3 per level.
    assert len(model.input_blocks) == 3 * 2 + 2
    assert len(model.output_blocks) == 3 * 3
    n_res = sum(isinstance(m, ResBlock) for _, m in nnx.iter_graph(model))
    assert n_res == 8 + 2 + 9 + 2  # encoder + middle + decoder + 2 upsampling ResBlocks


def test_timestep_embedding_values():
    t = jnp.array([0.0, 3.0, 999.0])
    emb = timestep_embedding(t, 8)
    freqs = np.exp(-math.log(10000.0) * np.arange(4) / 4)
    args = np.asarray(t)[:, None] * freqs[None]
    np.testing.assert_allclose(emb, np.concatenate([np.cos(args), np.sin(args)], -1), atol=1e-5)
    assert timestep_embedding(t, 7).shape == (3, 7)
    np.testing.assert_array_equal(timestep_embedding(t, 7)[:, -1], 0.0)


def test_group_count():
    assert num_groups_for(128) == 32
    assert num_groups_for(8) == 8
    assert num_groups_for(24) == 24
    assert num_groups_for(48) == 24


def test_timestep_and_cond_change_output(cond_model, cond_apply):
    _graphdef, params, rest = cond_model
    x, _ = _inputs()
    cond = jax.random.normal(jax.random.key(3), (2, 4))
    t1 = jnp.array([10, 10])
    t2 = jnp.array([700, 700])
    y11 = cond_apply(params, rest, x, t1, cond)
    y21 = cond_apply(params, rest, x, t2, cond)
    y12 = cond_apply(params, rest, x, t1, cond + 1.0)
    assert float(jnp.abs(y11).max()) > 0
    assert float(jnp.abs(y11 - y21).max()) > 1e-3  # FiLM from the timestep is wired
    assert float(jnp.abs(y11 - y12).max()) > 1e-3  # FiLM from the condition is wired


def test_no_timestep_ignores_t():
    model = _random_model(use_timestep=False, channel_mult=(1,))
    assert model.time_mlp is None
    assert all(m.emb_linear is None for _, m in nnx.iter_graph(model) if isinstance(m, ResBlock))
    x, _ = _inputs()
    y0 = model(x, None)
    assert float(jnp.abs(y0).max()) > 0
    np.testing.assert_array_equal(y0, model(x, jnp.array([5, 900])))


def test_jit_apply_matches_eager(cond_model, cond_apply):
    graphdef, params, rest = cond_model
    x, t = _inputs()
    cond = jnp.ones((2, 4))
    eager = nnx.merge(graphdef, params, rest)(x, t, cond)
    np.testing.assert_allclose(cond_apply(params, rest, x, t, cond), eager, atol=1e-5, rtol=1e-5)


def test_grads_finite_and_nonzero(cond_model_init, cond_model):
    graphdef, init_params, rest = cond_model_init
    _, params, _ = cond_model
    apply = make_apply_fn(graphdef)
    x, t = _inputs()
    cond = jnp.ones((2, 4))

    @jax.jit
    def grad_fn(p):
        return jax.grad(lambda q: jnp.mean((apply(q, rest, x, t, cond) - 1.0) ** 2))(p)

    # At init only the zero-initialised output conv receives gradient (as in guided-diffusion).
    grads = grad_fn(init_params)
    assert float(jnp.abs(grads["conv_out"]["kernel"][...]).max()) > 0
    grads = grad_fn(params)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert float(sum(jnp.sum(jnp.abs(g)) for g in leaves)) > 0
    # The embedding MLPs are reached through FiLM.
    assert float(jnp.abs(grads["time_mlp"]["fc1"]["kernel"][...]).max()) > 0
    assert float(jnp.abs(grads["cond_mlp"]["fc1"]["kernel"][...]).max()) > 0


def test_dropout_keys(cond_model, cond_apply):
    _graphdef, params, rest = cond_model
    x, t = _inputs()
    cond = jnp.ones((2, 4))
    det_a = cond_apply(params, rest, x, t, cond)
    det_b = cond_apply(params, rest, x, t, cond)
    np.testing.assert_array_equal(det_a, det_b)
    k1, k2 = jax.random.key(11), jax.random.key(12)
    d1 = cond_apply(params, rest, x, t, cond, dropout_key=k1)
    d1_again = cond_apply(params, rest, x, t, cond, dropout_key=k1)
    d2 = cond_apply(params, rest, x, t, cond, dropout_key=k2)
    np.testing.assert_array_equal(d1, d1_again)
    assert float(jnp.abs(d1 - d2).max()) > 1e-4
    assert float(jnp.abs(d1 - det_a).max()) > 1e-4
    # Deterministic output did not change after the stochastic calls (no leaked RNG state).
    np.testing.assert_array_equal(cond_apply(params, rest, x, t, cond), det_a)


def test_bfloat16_compute():
    graphdef, params, rest = split_model(_abstract(dtype="bfloat16", cond_dim=2, channel_mult=(1,)))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    x, t = _inputs()
    y = jax.jit(make_apply_fn(graphdef))(_random_params(params), rest, x, t, jnp.ones((2, 2)))
    assert y.dtype == jnp.float32 and y.shape == x.shape
    assert bool(jnp.all(jnp.isfinite(y)))


def test_input_errors():
    model = _abstract(cond_dim=2)
    x, t = _inputs()
    with pytest.raises(ValueError, match="pass cond"):
        model(x, t)
    with pytest.raises(ValueError, match="use_timestep"):
        model(x, None, jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="divisible"):
        model(jnp.ones((2, 15, 16, 1)), t, jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="cond_dim=0"):
        _abstract()(x, t, jnp.ones((2, 2)))


def test_count_params():
    assert count_params(nnx.Linear(3, 4, rngs=nnx.Rngs(0))) == 16
    model = _abstract()
    _, params, _ = split_model(model)
    assert count_params(params) == count_params(model) > 0


def test_registry_make_model_and_errors():
    assert "unet" in available_models()
    assert get_model_class("unet") is UNet
    cfg = default_unet_config()
    cfg.update(TINY)
    cfg.update(SMALL_COND)
    model = make_model(cfg, seed=0)
    assert isinstance(model, UNet) and model.base_channels == 8
    same = make_model(cfg.to_dict(), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(model.conv_in.kernel[...], same.conv_in.kernel[...])

    bad = ml_collections.ConfigDict({"name": "nope"})
    with pytest.raises(KeyError, match="unet"):
        make_model(bad, seed=0)
    cfg.unknown_field = 3
    with pytest.raises(TypeError, match="valid fields.*base_channels"):
        make_model(cfg, seed=0)
    with pytest.raises(TypeError, match="exactly one"):
        make_model(default_unet_config(), seed=0, rngs=nnx.Rngs(0))
    with pytest.raises(KeyError, match="name"):
        make_model({"base_channels": 8}, seed=0)

    @register_model("test_only_linear")
    class _Tiny(nnx.Module):
        def __init__(self, features: int, *, rngs: nnx.Rngs):
            self.linear = nnx.Linear(2, features, rngs=rngs)

    with pytest.raises(TypeError, match="Missing required.*features"):
        make_model({"name": "test_only_linear"}, seed=0)
    assert count_params(make_model({"name": "test_only_linear", "features": 3}, seed=0)) == 9
    with pytest.raises(ValueError, match="already registered"):
        register_model("unet")(_Tiny)


def test_default_config_is_behrendt_and_fields_match_signature():
    cfg = default_unet_config()
    assert (cfg.base_channels, tuple(cfg.channel_mult), cfg.num_res_blocks) == (128, (1, 2, 2), 3)
    assert tuple(cfg.attention_resolutions) == () and cfg.use_middle_attention
    assert cfg.num_head_channels == 64 and cfg.use_scale_shift_norm and cfg.resblock_updown
    # Build abstractly (no parameter memory): every field is accepted, attention only middle.
    model = nnx.eval_shape(lambda: make_model(cfg, seed=0))
    assert _attention_count(model) == 1
    assert count_params(nnx.state(model, nnx.Param)) > 10_000_000


@pytest.mark.parametrize("shape", [(2, 8, 8, 16), (3, 4, 4, 64), (2, 5, 96), (1, 6, 6, 24)])
def test_groupnorm32_matches_flax_groupnorm(shape):
    """The dot-based statistics of GroupNorm32 against nnx.GroupNorm (its own parameters)."""
    from uadjax.models.layers import GroupNorm32

    norm = GroupNorm32(shape[-1], rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    norm.norm.scale[...] = jnp.asarray(1 + 0.3 * rng.standard_normal(shape[-1]), jnp.float32)
    norm.norm.bias[...] = jnp.asarray(0.3 * rng.standard_normal(shape[-1]), jnp.float32)
    x = jnp.asarray(3.0 + 2.0 * rng.standard_normal(shape), jnp.float32)
    np.testing.assert_allclose(norm(x), norm.norm(x), rtol=1e-5, atol=1e-5)
    half = norm(x.astype(jnp.bfloat16))
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(half.astype(jnp.float32), norm.norm(x), atol=0.1)
