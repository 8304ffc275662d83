"""cDDPM: conditioning path, SparK masking, stage plumbing and a tiny end-to-end run."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import cddpm as cddpm_config
from uadjax import jobs, runs, trainer
from uadjax.methods import get_method
from uadjax.models import make_model
from uadjax.models.resnet import ResNetEncoder
from uadjax.models.spark import masked_reconstruction_loss, random_unit_mask
from uadjax.models.unet import default_unet_config


def _randomise(module, seed=0, scale=0.2):
    """Replaces every parameter by noise (zero-initialised layers would hide the paths)."""
    state = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)

    @jax.jit
    def noise(leaves):
        keys = jax.random.split(jax.random.key(seed), len(leaves))
        return [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]

    nnx.update(module, jax.tree.unflatten(treedef, noise(leaves)))


def _tiny_unet(cond_dim):
    cfg = default_unet_config()
    cfg.update(base_channels=8, channel_mult=(1,), num_res_blocks=1, num_head_channels=8,
               cond_dim=cond_dim)
    return make_model(cfg, rngs=nnx.Rngs(0))


@nnx.jit
def _apply(model, x, t, c=None):
    return model(x, t, c)


def test_condition_changes_the_output():
    unet = _tiny_unet(cond_dim=4)
    _randomise(unet)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    t = jnp.array([3, 7])
    c1 = jax.random.normal(jax.random.key(2), (2, 4))
    out1, out2 = _apply(unet, x, t, c1), _apply(unet, x, t, c1 + 1.0)
    assert float(jnp.max(jnp.abs(out1 - out2))) > 1e-3
    np.testing.assert_array_equal(np.asarray(out1), np.asarray(_apply(unet, x, t, c1)))


def test_zeroed_condition_embedding_gives_the_unconditioned_network():
    """With the condition embedding at zero, the conditioned UNet equals an unconditioned
    UNet holding the same weights (FiLM layers restricted to the timestep half)."""
    cond = _tiny_unet(cond_dim=4)
    _randomise(cond)
    last = cond.cond_mlp.fc2  # e_c = fc2(silu(fc1(c))) is then zero for every c
    last.kernel[...] = jnp.zeros_like(last.kernel[...])
    last.bias[...] = jnp.zeros_like(last.bias[...])
    plain = _tiny_unet(cond_dim=0)
    cond_params = dict(nnx.to_flat_state(nnx.state(cond, nnx.Param)))
    flat = []
    for path, var in nnx.to_flat_state(nnx.state(plain, nnx.Param)):
        value = cond_params[path][...]
        if value.shape != var[...].shape:  # FiLM kernel [2E, 2C] -> its timestep rows [E, 2C]
            assert path[-2] == "emb_linear" and path[-1] == "kernel", path
            value = value[: var[...].shape[0]]
        flat.append((path, value))
    nnx.update(plain, nnx.from_flat_state(flat))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    t = jnp.array([3, 7])
    for c in (jnp.zeros((2, 4)), jax.random.normal(jax.random.key(5), (2, 4))):
        np.testing.assert_allclose(np.asarray(_apply(cond, x, t, c)),
                                   np.asarray(_apply(plain, x, t)), atol=1e-5)


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_sparse_encoder_ignores_masked_units(kind):
    if kind == "basic":
        encoder = ResNetEncoder(stem_channels=8, stem_kernel=3, stage_widths=(8, 16, 16),
                                stage_blocks=(1, 1, 1), bottleneck=False, rngs=nnx.Rngs(0))
    else:  # ResNet-50's layout (7x7 stem, max-pool, bottlenecks, projection shortcuts), narrow
        encoder = ResNetEncoder(stem_channels=8, stem_kernel=7, stage_widths=(4, 8, 8),
                                stage_blocks=(2, 1, 1), bottleneck=True, rngs=nnx.Rngs(0))
    _randomise(encoder, scale=0.3)
    assert encoder.downsample == 16
    x = jax.random.uniform(jax.random.key(1), (2, 64, 64, 1))
    active = random_unit_mask(jax.random.key(2), 2, (4, 4), 0.65)
    pixel_active = np.repeat(np.repeat(np.asarray(active), 16, 1), 16, 2)[..., None]
    other = jnp.where(pixel_active, x, 5.0 * jax.random.normal(jax.random.key(3), x.shape))
    run = nnx.jit(lambda m, x, a: m(x, a))
    for a, b in zip(run(encoder, x, active), run(encoder, other, active)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    # Dense execution does see the whole image.
    dense = nnx.jit(lambda m, x: m(x)[-1])
    assert not np.allclose(np.asarray(dense(encoder, x)), np.asarray(dense(encoder, other)))


def test_unit_mask_keeps_the_configured_ratio():
    active = np.asarray(random_unit_mask(jax.random.key(0), 64, (3, 3), 0.65))
    assert active.shape == (64, 3, 3)
    np.testing.assert_array_equal(active.reshape(64, -1).sum(1), 3)  # round(9 * 0.35)
    assert len({a.tobytes() for a in active}) > 10  # random per image


def test_masked_pretraining_loss_ignores_visible_units():
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(2, 8, 8, 1)).astype(np.float32)
    target = rng.normal(size=(2, 8, 8, 1)).astype(np.float32)
    active = np.array([[[True, False], [False, False]], [[False, True], [True, False]]])
    pixel_active = np.repeat(np.repeat(active, 4, 1), 4, 2)[..., None]
    loss = float(masked_reconstruction_loss(pred, target, active))
    expected = np.sum((pred - target) ** 2 * ~pixel_active) / np.sum(~pixel_active)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    changed_visible = np.where(pixel_active, pred + 10.0, pred)
    assert float(masked_reconstruction_loss(changed_visible, target, active)) == pytest.approx(loss)
    changed_masked = np.where(pixel_active, pred, pred + 1.0)
    assert float(masked_reconstruction_loss(changed_masked, target, active)) > loss + 0.5


def test_config_variants_and_stage_overrides():
    paper = cddpm_config.get_config("paper")
    code = cddpm_config.get_config("paper,code")
    # One learning rate for the DDPM family at paper size (the code's Adam 1e-4); the
    # paper's 1e-5 is a modifier.
    assert (paper.model.cond_dim, paper.train.learning_rate) == (128, 1e-4)
    assert (code.model.cond_dim, code.train.learning_rate) == (512, 1e-4)
    assert cddpm_config.get_config("paper,paperlr").train.learning_rate == 1e-5
    from configs import ddpm, pddpm
    for family in (ddpm.get_config("paper"), pddpm.get_config("paper")):
        assert (family.train.optimizer, family.train.learning_rate) == ("adam", 1e-4)
    assert cddpm_config.get_config("cpu,ens").diffusion.test_timesteps == (249, 499, 749)
    method = get_method("cddpm")
    assert [s.name for s in method.active_stages(paper)] == ["pretrain", "diffusion"]
    nopre = cddpm_config.get_config("cpu,nopretrain")
    assert [s.name for s in method.active_stages(nopre)] == ["diffusion"]
    pre = trainer.stage_config(paper, "pretrain").train
    assert (pre.optimizer, pre.weight_decay, pre.b2) == ("adamw", 0.05, 0.95)
    assert trainer.stage_config(paper, "diffusion").train.optimizer == "adam"
    paper.stage_train.pretrain.bogus = 1
    with pytest.raises(ValueError, match="bogus"):
        trainer.stage_config(paper, "pretrain")
    with pytest.raises(ValueError, match="modifiers"):
        cddpm_config.get_config("cpu,wrong")


def _tiny_config(tiny_run, workdir):
    config = cddpm_config.get_config("tiny")
    config.data.phantom_dir = tiny_run.data.phantom_dir
    config.data.data_dir = tiny_run.data.data_dir
    config.workdir = str(workdir)
    config.model.channel_mult = (1,)  # a one-level UNet: the plumbing is tested, not the net
    config.train.val_every_steps = 0
    config.eval.baseline = False
    return config


def _encoder_params(module):
    return jax.tree.leaves(nnx.state(module.encoder, nnx.Param))


def _stage_encoder(config, workdir, stage):
    method = get_method("cddpm")
    return _encoder_params(runs.load_stage_models(config, workdir, method.stage(stage)))


def _assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_two_stage_run_end_to_end(tiny_run, tmp_path):
    config = _tiny_config(tiny_run, tmp_path / "full")
    config.stage_train.pretrain.num_steps = 1  # a per-stage override of the step count
    config.train.learning_rate = 0.0  # stage 2 keeps its initial weights: checkable below
    results = jobs.run_all(config, config.workdir, progress=False)
    steps = {stage: sorted(int(d) for d in os.listdir(
        os.path.join(config.workdir, stage, "checkpoints")) if d.isdigit())
        for stage in ("pretrain", "diffusion")}
    assert steps["pretrain"][-1] == 1 and steps["diffusion"][-1] == 2
    for kind, entry in results["results"]["cddpm"]["kinds"].items():
        assert np.isfinite(entry["val"]["per_volume"]["dice"]["mean"]), kind
    with open(os.path.join(config.workdir, "eval", "results.json")) as f:
        assert json.load(f)["timing"]["seconds_per_volume"] > 0

    # The trainer started stage 2 from the pre-trained encoder (lr 0 kept it there), and
    # the pre-training's step moved that encoder: Adam's first step moves a parameter with a
    # gradient by about the learning rate, AdamW's weight decay alone by 5 % of it at most.
    pretrained = _stage_encoder(config, config.workdir, "pretrain")
    _assert_same(_stage_encoder(config, config.workdir, "diffusion"), pretrained)
    pre_cfg = trainer.stage_config(config, "pretrain")
    initial = _encoder_params(get_method("cddpm").stage("pretrain").make_model(
        pre_cfg, nnx.Rngs(config.seed)))
    moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(initial, pretrained, strict=True))
    assert moved > 0.5 * pre_cfg.train.learning_rate, moved

    # Another run reusing that pre-training: only stage 2 is trained there, from the reused
    # encoder, and evaluation needs no pre-training checkpoint of its own.
    reuse = _tiny_config(tiny_run, tmp_path / "reuse")
    reuse.train.learning_rate = 0.0
    reuse.stage_workdirs.pretrain = config.workdir
    assert jobs.train(reuse, reuse.workdir, progress=False)
    assert not os.path.exists(os.path.join(reuse.workdir, "pretrain"))
    _assert_same(_stage_encoder(reuse, reuse.workdir, "diffusion"), pretrained)
    jobs.evaluate(reuse, reuse.workdir, progress=False)
    with pytest.raises(ValueError, match="stage_workdirs"):
        jobs.train(reuse, reuse.workdir, stages=["pretrain"], progress=False)


def test_second_stage_needs_a_finished_first(tiny_run, tmp_path):
    config = _tiny_config(tiny_run, tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="pretrain"):
        jobs.train(config, config.workdir, stages=["diffusion"], progress=False)
    # A pre-training stopped at step 1 of 3 (killed): stage 2 refuses to start from it.
    config.stage_train.pretrain.num_steps = 3
    stage = get_method("cddpm").stage("pretrain")
    data = jobs.make_train_data(trainer.stage_config(config, "pretrain"), stage)
    out = trainer.train_stage(stage, config, config.workdir, data, stop_at_step=1, progress=False)
    assert not out["finished"]
    with pytest.raises(RuntimeError, match="step 1 of 3"):
        jobs.train(config, config.workdir, stages=["diffusion"], progress=False)
