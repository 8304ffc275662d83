"""Coarse lobes and arterial territories of the phantom brain, from MNI coordinates.

The phantom's lesions are placed with published location priors (docs/phantom.md,
"Location"): gliomas by lobe, infarcts by arterial territory, MS lesions by
periventricular / juxtacortical / deep / infratentorial site. The ICBM 2009c template lives
in MNI space, so a subject voxel's region follows from the template coordinate it was
warped from. The partition below is planes and simple surfaces through textbook MNI
landmarks, not an atlas (no lobar atlas of the template may be shipped with it): it is
right in the bulk of each lobe and approximate within about a centimetre of the
boundaries, which is all a placement prior needs. `docs/phantom.md` shows the partition and
its region volumes against published lobar volumes.

Landmarks (MNI mm; x right, y anterior, z superior; origin at the anterior commissure):
  central sulcus: y = -8 at the Sylvian end (z = 15), running back to y = -35 at the vertex;
  Sylvian fissure / top of the temporal lobe: z = -12 at the temporal pole (y = 10) rising
  to z = 23 at y = -60; temporal lobe lateral to |x| = 25;
  parieto-occipital boundary: y = -70;
  insula: |x| 28-42 under the opercula, y -30 to 25, z -10 to 25;
  deep grey matter (basal ganglia, thalamus): |x| < 28, y -35 to 25, z -10 to 20;
  tentorium: infratentorial below z = -5 - 0.35 (-30 - y) behind y = -30, plus the
  brainstem (|x| < 14, y -45 to -5, z < -8).
"""

from __future__ import annotations

import numpy as np

# Region ids of `region_labels` (0: outside the brain).
REGIONS = ("outside", "frontal", "parietal", "temporal", "occipital", "insula", "deep",
           "infratentorial")
REGION_ID = {name: i for i, name in enumerate(REGIONS)}
LOBES = ("frontal", "parietal", "temporal", "occipital")

# Arterial territories (`territory_labels`): middle, anterior and posterior cerebral
# arteries, and the vertebrobasilar system below the tentorium.
TERRITORIES = ("outside", "mca", "aca", "pca", "vertebrobasilar")
TERRITORY_ID = {name: i for i, name in enumerate(TERRITORIES)}
ACA_MEDIAL_MM = 18.0  # the ACA supplies the medial surface of the frontal and parietal lobes


def _central_sulcus_y(z: np.ndarray) -> np.ndarray:
    return -8.0 - 0.45 * np.clip(z - 15.0, 0.0, None)


def _sylvian_z(y: np.ndarray) -> np.ndarray:
    return -12.0 + 0.5 * (10.0 - y)


def _is_infratentorial(x, y, z) -> np.ndarray:
    below_tentorium = (y < -30.0) & (z < -5.0 - 0.35 * (-30.0 - y))
    brainstem = (np.abs(x) < 14.0) & (y > -45.0) & (y < -5.0) & (z < -8.0)
    return below_tentorium | brainstem


def region_labels(mm: np.ndarray) -> np.ndarray:
    """Region id (`REGIONS`) of points in MNI space.

    Args:
      mm: [3, N] float MNI coordinates (mm) of points inside the brain.

    Returns:
      [N] uint8 ids, never 0 (every point gets a region).
    """
    x, y, z = (np.asarray(c, np.float32) for c in mm)
    ax = np.abs(x)
    labels = np.full(x.shape, REGION_ID["parietal"], np.uint8)
    labels[y >= _central_sulcus_y(z)] = REGION_ID["frontal"]
    temporal = (ax > 25.0) & (z < _sylvian_z(y)) & (y < 20.0)
    labels[temporal] = REGION_ID["temporal"]
    labels[y < -70.0] = REGION_ID["occipital"]
    insula = (ax >= 28.0) & (ax <= 42.0) & (y > -30.0) & (y < 25.0) & (z > -10.0) & (z < 25.0)
    labels[insula] = REGION_ID["insula"]
    deep = (ax < 28.0) & (y > -35.0) & (y < 25.0) & (z > -10.0) & (z < 20.0)
    labels[deep] = REGION_ID["deep"]
    labels[_is_infratentorial(x, y, z)] = REGION_ID["infratentorial"]
    return labels


def territory_labels(mm: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """Arterial territory id (`TERRITORIES`) of points in MNI space.

    The ACA takes the medial frontal and parietal lobes; the PCA the occipital lobe, the
    inferior and medial temporal lobe and the thalamus; the vertebrobasilar system the
    brainstem and cerebellum; the MCA the rest (lateral hemisphere, insula, basal ganglia).

    Args:
      mm: [3, N] float MNI coordinates (mm).
      regions: [N] region ids from `region_labels`.

    Returns:
      [N] uint8 ids.
    """
    x, y, z = (np.asarray(c, np.float32) for c in mm)
    ax = np.abs(x)
    out = np.full(x.shape, TERRITORY_ID["mca"], np.uint8)
    frontal_parietal = np.isin(regions, [REGION_ID["frontal"], REGION_ID["parietal"]])
    out[frontal_parietal & (ax < ACA_MEDIAL_MM) & (z > 0.0)] = TERRITORY_ID["aca"]
    inferior_temporal = (regions == REGION_ID["temporal"]) & (y < -15.0) & (z < -8.0)
    thalamus = (regions == REGION_ID["deep"]) & (y < -8.0)
    pca = (regions == REGION_ID["occipital"]) | inferior_temporal | thalamus
    out[pca] = TERRITORY_ID["pca"]
    out[regions == REGION_ID["infratentorial"]] = TERRITORY_ID["vertebrobasilar"]
    return out


def subject_regions(coords: np.ndarray, affine: np.ndarray, inside: np.ndarray) -> dict:
    """Region and territory maps of one subject.

    Args:
      coords: [3, D, H, W] template voxel coordinates of each subject voxel (the warp).
      affine: [4, 4] the template's voxel-to-MNI-mm affine.
      inside: [D, H, W] bool, the subject's brain.

    Returns:
      {'region', 'territory'}: [D, H, W] uint8 (0 outside `inside`).
    """
    mm = affine[:3, :3] @ coords[:, inside].astype(np.float64) + affine[:3, 3:4]
    region = np.zeros(inside.shape, np.uint8)
    territory = np.zeros(inside.shape, np.uint8)
    region[inside] = region_labels(mm)
    territory[inside] = territory_labels(mm, region[inside])
    return {"region": region, "territory": territory}
