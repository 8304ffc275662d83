"""Every method's paper-sized config builds and traces its train loss and score at full size.

The networks are built abstractly (`nnx.eval_shape`) and the loss and score are traced with
`jax.eval_shape`, so shapes, stage plumbing and config fields are checked at paper size without
allocating or running a 40 M parameter network on the CPU.
"""

import importlib

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from uadjax.methods import available_methods, get_method
from uadjax.train_state import stage_config

# Every method module with a config of the same name (the threshold baseline has no network).
METHODS = tuple(m for m in available_methods() if m != "threshold")


def _abstract_batch(config, batch_size=4):
    h, w = config.data.image_size
    m = len(config.data.modalities)
    f32 = jnp.float32
    return {"image": jax.ShapeDtypeStruct((batch_size, h, w, m), f32),
            "brain_mask": jax.ShapeDtypeStruct((batch_size, h, w), f32),
            "seg": jax.ShapeDtypeStruct((batch_size, h, w), f32),
            "slice_index": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}


@pytest.mark.parametrize("name", METHODS)
def test_paper_config_traces_at_full_size(name):
    config = importlib.import_module(f"configs.{name}").get_config("paper")
    h, w = config.data.image_size
    assert min(h, w) >= 96, config.data.image_size  # a paper size, not a CPU one
    method = get_method(config.method)
    batch = _abstract_batch(config)
    key = jax.random.key(0)
    models = {}
    for stage in method.active_stages(config):
        model = nnx.eval_shape(lambda s=stage: s.make_model(config, nnx.Rngs(0)))
        graphdef, state = nnx.split(model)

        def loss(state, batch, stage=stage, graphdef=graphdef):
            model = nnx.merge(graphdef, state)
            if stage.is_statistics:  # a statistics pass: scalar metrics, no loss
                return stage.statistics_fn(model, batch, key, config)
            return {"loss": stage.loss_fn(model, batch, key, config)[0]}

        for metric, out in jax.eval_shape(loss, state, batch).items():
            assert out.shape == () and out.dtype == jnp.float32, (name, stage.name, metric)
        models[stage.name] = (graphdef, state)

    def score(states, batch):
        merged = {k: nnx.merge(g, states[k]) for k, (g, _) in models.items()}
        return method.score_fn(merged, batch, key, config)

    out = jax.eval_shape(score, {k: s for k, (_, s) in models.items()}, batch)
    assert out["score"].shape == (4, h, w)


@pytest.mark.parametrize("method", [m for m in available_methods()])
def test_every_config_checks_its_modifiers_in_one_place(method):
    """configs/common.parse_variant / check_modifiers: an unknown modifier is refused with
    the method's own and the common modifiers listed; the common ones are accepted."""
    module = importlib.import_module(f"configs.{method}")
    with pytest.raises(ValueError, match=f"unknown {method} config modifiers \\['nope'\\]; "
                                         f"{method} takes .*every method"):
        module.get_config("cpu,nope")
    assert module.get_config("cpu,long").train.num_steps == 3000


@pytest.mark.parametrize("method", [m for m in available_methods()])
@pytest.mark.parametrize("size", ["paper", "cpu", "tiny"])
def test_a_budget_cuts_every_training_stage_and_no_statistics_pass(method, size):
    """`short` is 300 steps for each training stage, whatever the stage's own recipe says
    (cDDPM's pre-training, LDM's VQ-VAE), with its checkpoint and validation at the end and
    its warm-up at most 30; a statistics pass keeps the length the config gives it."""
    module = importlib.import_module(f"configs.{method}")
    full, short = module.get_config(size), module.get_config(f"{size},short")
    for stage in get_method(short.method).stages:
        cfg = stage_config(short, stage.name).train
        own = stage_config(full, stage.name).train
        if stage.is_statistics:
            assert cfg.num_steps == own.num_steps, (method, stage.name)
            continue
        assert (cfg.num_steps, cfg.checkpoint_every_steps, cfg.val_every_steps) == (
            300, 300, 300), (method, stage.name)
        assert cfg.warmup_steps == min(own.warmup_steps, 30), (method, stage.name)
