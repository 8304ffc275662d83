"""Method registry: `config.method = 'ddpm'` loads `uadjax/methods/ddpm.py`'s `METHOD`."""

from __future__ import annotations

import importlib
import pkgutil

from uadjax.methods.base import Method, Stage

__all__ = ["Method", "Stage", "available_methods", "get_method"]


# Modules of this package that are not methods: the Method type and what methods share.
NOT_METHODS = frozenset({"base", "shared"})


def available_methods() -> list[str]:
    names = [m.name for m in pkgutil.iter_modules(__path__) if m.name not in NOT_METHODS]
    return sorted(names)


def get_method(name: str) -> Method:
    """Imports `uadjax.methods.<name>` and returns its `METHOD`."""
    if name not in available_methods():
        raise ValueError(f"unknown method {name!r}; available: {available_methods()}")
    module = importlib.import_module(f"uadjax.methods.{name}")
    return module.METHOD
