"""Model registry and helpers for using NNX modules functionally.

A network module registers its class under a name::

    @register_model("unet")
    class UNet(nnx.Module): ...

and ``make_model(config.model, seed=0)`` builds it from a ``ConfigDict`` whose ``name``
picks the class and whose other fields are the constructor's keyword arguments. Modules
under ``uadjax/models/`` are imported on demand when a name is not yet registered, so a new
network only needs the decorator.

Training and inference split a module with ``nnx.split(model, nnx.Param, ...)`` into a
graph definition, its parameters and the rest, and merge them inside the jitted step
(`uadjax.trainer.make_train_step`, `uadjax.inference.scoring.make_batch_scorer` closes over
the merged modules).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
from flax import nnx

_REGISTRY: dict[str, type[nnx.Module]] = {}


def register_model(name: str) -> Callable[[type], type]:
    """Class decorator registering an ``nnx.Module`` subclass under ``name``.

    Raises:
      ValueError: if ``name`` is already taken by a different class.
    """

    def decorator(cls: type) -> type:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(
                f"Model name {name!r} is already registered to {existing.__module__}."
                f"{existing.__qualname__}"
            )
        _REGISTRY[name] = cls
        return cls

    return decorator


def _import_model_modules() -> None:
    """Imports every module of the ``uadjax.models`` package so that they register."""
    package = importlib.import_module("uadjax.models")
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"uadjax.models.{info.name}")


def available_models() -> list[str]:
    """Sorted names of all registered models (after importing every model module)."""
    _import_model_modules()
    return sorted(_REGISTRY)


def get_model_class(name: str) -> type[nnx.Module]:
    """The class registered under ``name``.

    Raises:
      KeyError: unknown name; the message lists the valid names.
    """
    if name not in _REGISTRY:
        _import_model_modules()
    if name not in _REGISTRY:
        raise KeyError(f"Unknown model name {name!r}; valid names: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def _to_python(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_to_python(v) for v in value)
    return value


def make_model(
    model_config: ml_collections.ConfigDict | Mapping[str, Any],
    *,
    rngs: nnx.Rngs | None = None,
    seed: int | None = None,
) -> nnx.Module:
    """Builds the model named by ``model_config.name`` with the other fields as kwargs.

    Args:
      model_config: ``ConfigDict`` (or mapping) with ``name`` and constructor fields; lists
        are passed as tuples.
      rngs: parameter RNGs; give exactly one of ``rngs`` and ``seed``.
      seed: builds ``nnx.Rngs(seed)``.

    Returns:
      The eagerly initialised module.

    Raises:
      KeyError: missing ``name`` or unknown name (lists the valid names).
      TypeError: unknown fields or missing required fields (lists the valid fields), or not
        exactly one of ``rngs``/``seed``.
    """
    if (rngs is None) == (seed is None):
        raise TypeError("make_model needs exactly one of rngs= and seed=.")
    if isinstance(model_config, ml_collections.ConfigDict):
        fields = model_config.to_dict()
    else:
        fields = dict(model_config)
    if "name" not in fields:
        raise KeyError(f"model config has no 'name'; valid names: {available_models()}")
    name = fields.pop("name")
    cls = get_model_class(name)
    kwargs = {k: _to_python(v) for k, v in fields.items()}

    signature = inspect.signature(cls.__init__)
    params = {
        p.name: p
        for p in list(signature.parameters.values())[1:]
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "rngs"
    }
    takes_var_kwargs = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
    unknown = sorted(set(kwargs) - set(params))
    if unknown and not takes_var_kwargs:
        raise TypeError(
            f"Unknown field(s) {unknown} for model {name!r} ({cls.__name__}); "
            f"valid fields: {sorted(params)}"
        )
    missing = sorted(
        n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in kwargs
    )
    if missing:
        raise TypeError(f"Missing required field(s) {missing} for model {name!r}")
    return cls(**kwargs, rngs=rngs if rngs is not None else nnx.Rngs(seed))


def count_params(params: Any) -> int:
    """Total number of scalar parameters in a pytree (e.g. ``nnx.State``) or an nnx.Module."""
    if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Param)
    return int(sum(leaf.size for leaf in jax.tree.leaves(params)))
