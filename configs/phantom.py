"""Phantom dataset variants: `get_config(arg)`, arg 'default', 'subtle' or 'tiny'.

  default  48 healthy train, 8 healthy val, 4 val and 10 test lesion subjects per kind
           (tumour, ms, stroke), 8 healthy test: 106 subjects; lesion statistics calibrated
           to published data (docs/phantom.md)
  subtle   the same subjects with the lesion statistics of generator 1: every lesion
           diluted to a FLAIR contrast drawn uniformly (generator 1's range, moved up by
           the change in grey matter's FLAIR contrast: 0.27-1.17 over WM), smaller
           tumours, fewer MS lesions, and generator 1's more frequent FLAIR flow
           artefacts, white-matter spots and stronger bias fields. Much harder than the
           real datasets (docs/phantom.md gives its threshold figures): for studies of
           subtle lesions, never the default
  1mm      the default subjects on the 1 mm ICBM grid (160 x 200 x 168): the resolution
           users scan at, with the cortical detail a 2 mm grid averages away. Every size
           in voxels (`*_vox`) is doubled so that lesions and anatomy keep their size in
           mm; generation is about 8 times slower (minutes for the default set)
  tiny     one subject per split and kind, for tests (seconds)

Every generator setting (tissue parameters, deformation, lesion ranges) lives in
`uadjax.data.phantom.default_config()`; variants change sizes or name a study setting.
Variants combine: '1mm,tiny', 'subtle,tiny', 'subtle,1mm'.
"""

from __future__ import annotations

import ml_collections

from uadjax.data import phantom

VARIANTS = ("default", "subtle", "1mm", "tiny")

# Generator 1's lesion and confounder settings (before the calibration of docs/phantom.md).
# Generator 1 drew FLAIR contrasts over WM uniformly in [0.1, 1.0] when GM stood at +0.16
# over WM on FLAIR; with generator 2's relaxometry GM stands at +0.33, so the range moves up
# by the difference: the lesions stand as far above grey matter as they did, and the
# FLAIR threshold lands where generator 1's did (docs/phantom.md).
SUBTLE = {
    "lesions": {
        "contrast_model": "flair_contrast",
        "flair_contrast": (0.27, 1.17),
        "tumour": {"radius_vox": (4.0, 14.0), "core_ratio": (0.3, 0.8),
                   "oedema_edge": (0.3, 0.8), "oedema_heterogeneity": 0.3,
                   "solid_severity": (0.5, 1.0)},
        "ms": {"count": (4, 16), "periventricular_size_scale": 1.0,
               "site_p": {"periventricular": 70.0, "subcortical": 30.0, "juxtacortical": 0.0,
                          "infratentorial": 0.0}},
    },
    "healthy": {"spot_count": (0, 6), "flow_probability": 0.7},
    "acquisition": {"bias_amplitude": (0.02, 0.2)},
}
# The 1 mm maps blur as many millimetres as the 2 mm ones, twice as many voxels: a
# stronger sharpening gives the one-subject partial volume of about a voxel there too.
ONE_MM_SHARPNESS = (3.0, 5.0)
TINY_SPLITS = {"train": 2, "val_healthy": 1, "val_lesion_per_kind": 1,
               "test_lesion_per_kind": 1, "test_healthy": 1}


def scale_voxel_sizes(config: ml_collections.ConfigDict, factor: float) -> None:
    """Multiplies every size in voxels (keys ending in '_vox') by `factor`, in place."""
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            scale_voxel_sizes(value, factor)
        elif key.endswith("_vox"):
            config[key] = (tuple(factor * v for v in value) if isinstance(value, tuple)
                           else factor * value)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Phantom generator config for the variant `arg` ('default' when None or '')."""
    words = [w for w in (arg or "default").split(",") if w]
    unknown = [w for w in words if w not in VARIANTS]
    if unknown or not words:
        raise ValueError(f"unknown phantom config variant {arg!r}; one of {VARIANTS}")
    config = phantom.default_config()
    if "subtle" in words:
        config.update(SUBTLE)
    if "1mm" in words:
        config.template = "1mm"
        scale_voxel_sizes(config, 2.0)
        config.anatomy.cortex.sharpness = ONE_MM_SHARPNESS
    if "tiny" in words:
        config.splits.update(TINY_SPLITS)
    return config
