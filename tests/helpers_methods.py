"""Small batches and stand-in networks shared by the method tests."""

import jax.numpy as jnp


def random_batch(rng, b=2, size=16, channels=1):
    """{'image': [b, size, size, channels] in [0, 1], 'brain_mask': all ones}."""
    return {"image": jnp.asarray(rng.random((b, size, size, channels)), jnp.float32),
            "brain_mask": jnp.ones((b, size, size), jnp.uint8)}


class Halver:
    """Stand-in network: x0 estimate = x_t / 2 (deterministic, no parameters)."""

    def __call__(self, x_t, t, *args, **kwargs):
        return x_t * 0.5
