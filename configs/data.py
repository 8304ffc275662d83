"""Preprocessing and augmentation defaults: `get_config(arg)`.

Variants (arg, optionally followed by modalities, e.g. 'paper' or 'cpu:t2,flair'):
  paper   Behrendt et al.: 96x96x50 at 2 mm, brain p1-p99 normalisation, T2 (alias
          'behrendt'; the dataset folder from `data_prep.datasets --preset behrendt`).
  mmccd_brats  MMCCD's protocol: axial slices 70-89 of BraTS at 1 mm, 128x128 in-plane
          (1.875 mm), [-3, 3] scaling as in the authors' code (`--preset mmccd`).
  disyre_upd   DISYRE's protocol: 1 mm, quantile scaling over the volume, foreground crop
          to 192x192 (128 px training patches: configs/disyre.py:paper,1mm; `--preset disyre`).
  cpu     64x64 in-plane at 3 mm (fast CPU runs), percentile normalisation, T2.
  disyre  96x96 at 2 mm, DISYRE quantile normalisation (q0 .. q0.98 over all voxels).
  mmccd   96x96 at 2 mm, MMCCD [-3, 3] normalisation, T1/T2/PD/FLAIR, lesion-free training
          slices of lesion subjects.
  tiny    16x16 at 3 mm for unit tests.

Use from the command line as `--config configs/data.py:cpu`.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

# Preprocessing fields whose default is None, and the type an override may give them.
_OPTIONAL_TYPES = {"num_slices": int, "target_spacing": tuple, "slice_range": tuple}


def preprocessing_defaults() -> ml_collections.ConfigDict:
    """The fields of `uadjax.data.preprocess.PreprocessConfig` with its defaults (the one
    place they are written down, and documented): fields that default to None are typed
    placeholders, so that `--config.data.num_slices=50` works."""
    from uadjax.data.preprocess import PreprocessConfig

    c = ml_collections.ConfigDict()
    for field in dataclasses.fields(PreprocessConfig):
        value = field.default
        c[field.name] = (ml_collections.config_dict.placeholder(_OPTIONAL_TYPES[field.name])
                         if value is None else value)
    return c


def get_augment_config() -> ml_collections.ConfigDict:
    """Intensity augmentation (uadjax.data.pipeline.AugmentConfig fields)."""
    aug = ml_collections.ConfigDict()
    aug.enabled = True  # Master switch.
    aug.gamma_p = 0.5  # Probability of a gamma change per slice (torchio RandomGamma p=.5).
    aug.gamma_range = (0.7, 1.5)  # Gamma range, sampled log-uniformly.
    aug.bias_p = 0.25  # Probability of a smooth multiplicative bias field (RandomBiasField).
    aug.bias_order = 3  # Polynomial degree of the bias field.
    aug.bias_coeff = 0.3  # Coefficients ~ U(-c, c).
    aug.noise_p = 0.25  # Probability of Gaussian noise inside the brain.
    aug.noise_std = (0.0, 0.03)  # Noise std range.
    aug.blur_p = 0.0  # Probability of a Gaussian blur (RandomBlur; the cddpm preset: 0.25).
    aug.blur_sigma = (0.0, 1.0)  # Blur sigma range in pixels, per axis.
    aug.ghost_p = 0.0  # Probability of a k-space ghosting artefact (RandomGhosting).
    aug.ghost_count = (4, 10)  # Number of ghosts.
    aug.ghost_intensity = (0.5, 1.0)  # Artefact strength.
    return aug


AUGMENT_PRESETS = ("default", "none", "cddpm")


def augment_preset(name: str, pixel_mm: float | None) -> ml_collections.ConfigDict:
    """The intensity augmentation a method's authors train with, by name:
      default  ours (`get_augment_config`): for methods whose authors' set is not reproduced;
      none     no intensity augmentation: Behrendt's pDDPM repository (DDPM and pDDPM);
      cddpm    Behrendt's cDDPM repository (src/datamodules/create_dataset.py::get_augment,
               aug_intensity; torchio 0.18 defaults): RandomGamma p 0.5 (log gamma
               +-0.3), RandomBiasField p 0.25 (coefficients 0.5, order 3), RandomBlur p 0.25
               (std 0-2 mm per axis, here in pixels of `pixel_mm`, 1 mm when None) and
               RandomGhosting p 0.5 (4-10 ghosts, strength 0.5-1); no Gaussian noise.
    Ours changes the brain only and works per 2D slice; theirs the whole 3D volume."""
    aug = get_augment_config()
    if name == "default":
        return aug
    if name == "none":
        aug.enabled = False
        return aug
    if name == "cddpm":
        aug.update({"gamma_p": 0.5, "gamma_range": (math.exp(-0.3), math.exp(0.3)),
                    "bias_p": 0.25, "bias_order": 3, "bias_coeff": 0.5, "noise_p": 0.0,
                    "blur_p": 0.25, "blur_sigma": (0.0, 2.0 / (pixel_mm or 1.0)),
                    "ghost_p": 0.5, "ghost_count": (4, 10), "ghost_intensity": (0.5, 1.0)})
        return aug
    raise ValueError(f"unknown augmentation preset {name!r}; use one of {AUGMENT_PRESETS}")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the data config for variant `arg` (see the module docstring).

    `arg` may carry modalities after a colon: 'cpu:t2,flair'.
    """
    variant, _, mods = (arg or "cpu").partition(":")
    c = preprocessing_defaults()
    c.target_spacing = (3.0, 3.0, 3.0)  # the CPU size: 3 mm (the dataclass: native spacing)
    c.augment = get_augment_config()

    if variant in ("paper", "behrendt"):
        # Authors: CropOrPad 192x192x100 at 1 mm, then 2 mm -> 96x96x50.
        c.image_size = (96, 96)
        c.num_slices = 50
        c.target_spacing = (2.0, 2.0, 2.0)
    elif variant == "mmccd_brats":
        c.image_size = (128, 128)
        c.target_spacing = (1.875, 1.875, 1.0)  # 240 px -> 128 px in-plane; slices unchanged
        c.slice_range = (70, 90)  # 0-based slices 70..89 of the 155 (RAS, as the authors')
        c.normalisation = "mmccd"
        c.mmccd_lower_over = "volume"  # the code's semantics: l = 0, 6 x / u - 3
        c.modalities = ("flair", "t2")
    elif variant == "disyre_upd":
        c.image_size = (192, 192)
        c.target_spacing = (1.0, 1.0, 1.0)
        c.normalisation = "quantile"
    elif variant == "cpu":
        pass
    elif variant == "disyre":
        c.image_size = (96, 96)
        c.target_spacing = (2.0, 2.0, 2.0)
        c.normalisation = "quantile"
    elif variant == "mmccd":
        c.image_size = (96, 96)
        c.target_spacing = (2.0, 2.0, 2.0)
        c.normalisation = "mmccd"
        c.modalities = ("t1", "t2", "pd", "flair")
    elif variant == "tiny":
        c.image_size = (16, 16)
        c.target_spacing = (3.0, 3.0, 3.0)
    else:
        raise ValueError(f"unknown data config variant {variant!r}")
    if mods:
        c.modalities = tuple(m.strip() for m in mods.split(",") if m.strip())
    return c
