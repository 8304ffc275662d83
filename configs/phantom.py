"""Phantom dataset variants: `get_config(arg)`, arg 'default', 'subtle' or 'tiny'.

  default  48 healthy train, 8 healthy val, 4 val and 10 test lesion subjects per kind
           (tumour, ms, stroke), 8 healthy test: 106 subjects; lesion statistics calibrated
           to published data (docs/phantom.md)
  subtle   the same subjects with the lesion statistics of generator 1: every lesion
           diluted to a FLAIR contrast over WM drawn uniformly in [0.1, 1.0], smaller
           tumours, fewer MS lesions, and generator 1's more frequent FLAIR flow
           artefacts, white-matter spots and stronger bias fields. Much harder than the
           real datasets (docs/phantom.md gives its threshold figures): for studies of
           subtle lesions, never the default
  tiny     one subject per split and kind, for tests (seconds)

Every generator setting (tissue parameters, deformation, lesion ranges) lives in
`uadjax.data.phantom.default_config()`; variants change sizes or name a study setting.
Add ',tiny' to shrink a variant to the tiny split sizes ('subtle,tiny').
"""

from __future__ import annotations

import ml_collections

from uadjax.data import phantom

VARIANTS = ("default", "subtle", "tiny")

# Generator 1's lesion and confounder settings (before the calibration of docs/phantom.md).
SUBTLE = {
    "lesions": {
        "contrast_model": "flair_contrast",
        "flair_contrast": (0.1, 1.0),
        "tumour": {"radius_vox": (4.0, 14.0), "core_ratio": (0.3, 0.8),
                   "oedema_edge": (0.3, 0.8), "oedema_heterogeneity": 0.3,
                   "solid_severity": (0.5, 1.0)},
        "ms": {"count": (4, 16), "periventricular_fraction": 0.7},
    },
    "healthy": {"spot_count": (0, 6), "flow_probability": 0.7},
    "acquisition": {"bias_amplitude": (0.02, 0.2)},
}
TINY_SPLITS = {"train": 2, "val_healthy": 1, "val_lesion_per_kind": 1,
               "test_lesion_per_kind": 1, "test_healthy": 1}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Phantom generator config for the variant `arg` ('default' when None or '')."""
    words = [w for w in (arg or "default").split(",") if w]
    unknown = [w for w in words if w not in VARIANTS]
    if unknown or not words:
        raise ValueError(f"unknown phantom config variant {arg!r}; one of {VARIANTS}")
    config = phantom.default_config()
    if "subtle" in words:
        config.update(SUBTLE)
    if "tiny" in words:
        config.splits.update(TINY_SPLITS)
    return config
