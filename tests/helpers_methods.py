"""Small batches and stand-in networks shared by the method tests."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def random_batch(rng, b=2, size=16, channels=1):
    """{'image': [b, size, size, channels] in [0, 1], 'brain_mask': all ones}."""
    return {"image": jnp.asarray(rng.random((b, size, size, channels)), jnp.float32),
            "brain_mask": jnp.ones((b, size, size), jnp.uint8)}


class Halver:
    """Stand-in network: x0 estimate = x_t / 2 (deterministic, no parameters)."""

    def __call__(self, x_t, t, *args, **kwargs):
        return x_t * 0.5


def run_tiny_end_to_end(config, tiny_data, workdir):
    """Trains `config` for one step on the session's tiny phantom, evaluates it and checks
    that every lesion kind has a finite Dice at both thresholds (lesion-validation and
    test-set best). Returns the method's results entry."""
    import json
    import math
    import os

    from uadjax import jobs

    config.train.num_steps = 1
    config.train.val_every_steps = 0  # the validation loss is loss_fn again: one compile less
    config.data.phantom_dir = tiny_data.phantom_dir
    config.data.data_dir = tiny_data.data_dir
    jobs.run_all(config, str(workdir), progress=False)
    with open(os.path.join(str(workdir), "eval", "results.json")) as f:
        results = json.load(f)["results"][config.method]
    assert results["kinds"]
    for kind, entry in results["kinds"].items():
        for source in ("val", "oracle"):
            assert math.isfinite(entry[source]["per_volume"]["dice"]["mean"]), (kind, source)
    return results


def perturbed(model, seed=0, scale=0.2):
    """`model` with every parameter perturbed by N(0, scale^2): zero-initialised layers (the
    UNet output conv, the MAE head) would otherwise make it a constant or hide what it does."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    leaves = [p + scale * rng.standard_normal(p.shape).astype(np.float32) for p in leaves]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), rest)
