"""Networks (flax NNX), built eagerly by name.

Public API: ``make_model``, ``register_model``, ``available_models``, ``get_model_class``,
``count_params``, ``UNet``, ``default_unet_config``.
"""

from uadjax.models.registry import (
    available_models,
    count_params,
    get_model_class,
    make_model,
    register_model,
)
from uadjax.models.unet import UNet, default_unet_config

__all__ = [
    "UNet",
    "available_models",
    "count_params",
    "default_unet_config",
    "get_model_class",
    "make_model",
    "register_model",
]
