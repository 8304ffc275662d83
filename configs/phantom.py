"""Phantom dataset sizes: `get_config(arg)` with arg 'default' or 'tiny'.

  default  48 healthy train, 8 healthy val, 4 val and 10 test lesion subjects per kind
           (tumour, ms, stroke), 8 healthy test: 106 subjects
  tiny     one subject per split and kind, for tests (seconds)

Every generator setting (tissue parameters, deformation, lesion ranges) lives in
`uadjax.data.phantom.default_config()`; variants only change sizes.
"""

from __future__ import annotations

import ml_collections

from uadjax.data import phantom

VARIANTS = ("default", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Phantom generator config for the variant `arg` ('default' when None or '')."""
    variant = arg or "default"
    if variant not in VARIANTS:
        raise ValueError(f"unknown phantom config variant {variant!r}; one of {VARIANTS}")
    config = phantom.default_config()
    if variant == "tiny":
        config.splits.update({"train": 2, "val_healthy": 1, "val_lesion_per_kind": 1,
                                  "test_lesion_per_kind": 1, "test_healthy": 1})
    return config
