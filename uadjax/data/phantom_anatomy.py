"""Healthy subject anatomy for the phantom: warped template maps, atrophy, normal findings.

Maps are [D, H, W] float32 on the phantom grid. The "normal findings" are the healthy
features that make real scans hard for intensity thresholds: bright periventricular rims
and caps, a few tiny white-matter spots, CSF flow artefacts on FLAIR. None of them is
labelled as a lesion.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import ndimage

from uadjax.data import phantom_geometry as geometry
from uadjax.data.phantom_template import Template

# Outside the grid: no tissue, far from the ventricles, depth 0.
FAR_VOX = 99.0
MAP_CVALS = {"gm": 0.0, "wm": 0.0, "csf": 0.0, "brainmask": 0.0, "depth": 0.0,
             "ventricle_distance": FAR_VOX}


def warp_template(template: Template, coords: np.ndarray) -> dict[str, np.ndarray]:
    """Resamples the template maps with one deformation.

    Args:
      template: the template.
      coords: [3, D, H, W] float32 template coordinates of each subject voxel.

    Returns:
      {gm, wm, csf, brainmask, depth, ventricle_distance}: [D, H, W] float32 (brainmask as
      a fraction; threshold at 0.5). Only the brain mask is resampled everywhere; the other
      maps only where the warped mask is > 0 (the cval elsewhere), which saves most of
      the time.
    """
    brainmask = geometry.warp(template.brainmask.astype(np.float32), coords)
    inside = brainmask > 0.0
    inside_coords = coords[:, inside]
    maps = {"brainmask": brainmask}
    sources = {"gm": template.gm, "wm": template.wm, "csf": template.csf,
               "depth": template.depth, "ventricle_distance": template.ventricle_distance}
    for name, volume in sources.items():
        warped = np.full(brainmask.shape, MAP_CVALS[name], np.float32)
        warped[inside] = geometry.warp(volume, inside_coords, MAP_CVALS[name])
        maps[name] = warped
    return maps


def ventricle_centre(maps: Mapping[str, np.ndarray]) -> np.ndarray:
    """[3] float centre of mass of the ventricles (ventricle_distance < 0.5)."""
    return np.argwhere(maps["ventricle_distance"] < 0.5).mean(axis=0)


def grow_csf(maps: Mapping[str, np.ndarray], growth: float, sigma_vox: float) -> dict:
    """Atrophy: CSF grows into adjacent GM and WM (wider sulci, larger ventricles).

    New CSF = min(tissue, max(csf, growth * G_sigma(csf))); the GM and WM that it replaces
    shrink in proportion, so the tissue total is unchanged.

    Args:
      maps: {gm, wm, csf, ...} [D, H, W] float32.
      growth: >= 1; 1 changes nothing.
      sigma_vox: Gaussian blur of the CSF map (voxels).

    Returns:
      Copy of `maps` with new gm, wm, csf.
    """
    gm, wm, csf = maps["gm"], maps["wm"], maps["csf"]
    tissue = gm + wm + csf
    grown = np.minimum(tissue, np.maximum(csf, growth * ndimage.gaussian_filter(csf, sigma_vox)))
    parenchyma = gm + wm
    keep = np.where(parenchyma > 1e-6, (tissue - grown) / np.maximum(parenchyma, 1e-6), 0.0)
    out = dict(maps)
    out.update(gm=(gm * keep).astype(np.float32), wm=(wm * keep).astype(np.float32),
               csf=grown.astype(np.float32))
    return out


def apply_atrophy(
    maps: Mapping[str, np.ndarray], rng: np.random.Generator, config
) -> tuple[dict[str, np.ndarray], bool]:
    """With probability `config.probability`: enlarge the ventricles and grow the CSF.

    Args:
      maps: warped maps (see `warp_template`).
      rng: the subject's anatomy generator (always consumes the same draws).
      config: `anatomy.atrophy` of the phantom config.

    Returns:
      (maps, atrophic).
    """
    atrophic = rng.uniform() < config.probability
    strength = rng.uniform(*config.ventricle_expansion)
    growth = rng.uniform(*config.csf_growth)
    if not atrophic:
        return dict(maps), False
    out = geometry.expand_around(maps, ventricle_centre(maps), strength,
                                 config.ventricle_scale_vox, MAP_CVALS)
    return grow_csf(out, growth, config.csf_growth_sigma_vox), True


def tissue_fractions(maps: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """GM, WM, CSF fractions inside the brain mask, summing to at most 1.

    Returns:
      ({gm, wm, csf} [D, H, W] float32)
    """
    inside = maps["brainmask"] >= 0.5
    fractions = {name: np.where(inside, np.clip(maps[name], 0.0, 1.0), 0.0).astype(np.float32)
                 for name in ("gm", "wm", "csf")}
    total = fractions["gm"] + fractions["wm"] + fractions["csf"]
    scale = np.where(total > 1.0, 1.0 / np.maximum(total, 1e-6), 1.0).astype(np.float32)
    return {name: f * scale for name, f in fractions.items()}


def vary_ventricles(
    coords: np.ndarray, template: Template, rng: np.random.Generator, config
) -> np.ndarray:
    """Every subject's own ventricle size and asymmetry (the template has the mean shape).

    One radial push or pull about a point offset sideways from the template ventricles'
    centre, so one lateral ventricle changes more than the other; composed into the
    subject's sampling coordinates (`geometry.push_coordinates`), so it costs no warp.

    Args:
      coords: [3, D, H, W] float32 template coordinates of the subject's voxels.
      template: the template (its ventricles).
      rng: the subject's anatomy generator (always two draws).
      config: `anatomy.ventricles` of the phantom config.

    Returns:
      [3, D, H, W] float32 coordinates.
    """
    strength = rng.uniform(*config.strength)
    offset = rng.normal(0.0, config.asymmetry_offset_vox)
    centre = ventricle_centre({"ventricle_distance": template.ventricle_distance})
    centre = centre + np.array([offset, 0.0, 0.0])
    return geometry.push_coordinates(coords, centre, strength, config.scale_vox)


def cortical_band(maps: Mapping[str, np.ndarray], band_vox: float) -> np.ndarray:
    """[D, H, W] float32 weight, 1 within `band_vox` of the brain surface fading to 0 at
    twice that, and 0 near the ventricles: where sulci and the cortical ribbon are."""
    band = np.clip(2.0 - maps["depth"] / band_vox, 0.0, 1.0)
    return (band * (maps["ventricle_distance"] > 3.0)).astype(np.float32)


def individual_cortex(
    maps: Mapping[str, np.ndarray], rng: np.random.Generator, config
) -> dict[str, np.ndarray]:
    """One subject's cortex from the population-average tissue maps.

    The ICBM maps average 152 brains, so their sulci are shallow CSF haze and every tissue
    boundary is blurred over several voxels. Three per-subject changes, each anchored in
    docs/phantom.md ("Healthy anatomy"):
      1. sulcal CSF: in the cortical band CSF is multiplied by `sulcal_csf_gain` (the CSF
         that averaging spread into the ribbon comes back; wider sulci for larger gains);
      2. cortical thickness: WM is multiplied by exp(b) in the band (b drawn from
         `thickness_log_shift`), which moves the GM/WM boundary into or out of the GM;
      3. boundary sharpness: fractions p_i become p_i^g / sum_j p_j^g (g from
         `sharpness`), total tissue unchanged: partial volume is then a voxel or so wide,
         as in one subject's scan, instead of the average's several voxels.

    Args:
      maps: the warped maps: gm, wm, csf fractions (`tissue_fractions`), depth and
        ventricle_distance [D, H, W].
      rng: the subject's anatomy generator (always three draws).
      config: `anatomy.cortex` of the phantom config.

    Returns:
      New {gm, wm, csf} [D, H, W] float32, same per-voxel total.
    """
    gain = rng.uniform(*config.sulcal_csf_gain)
    shift = rng.uniform(*config.thickness_log_shift)
    sharpness = rng.uniform(*config.sharpness)
    band = cortical_band(maps, config.band_vox)
    gm, wm, csf = (np.asarray(maps[n], np.float32) for n in ("gm", "wm", "csf"))
    total = gm + wm + csf
    csf = csf * (1.0 + np.float32(gain - 1.0) * band)
    wm = wm * np.exp(np.float32(shift) * band)
    powered = [np.power(np.maximum(x, 0.0), np.float32(sharpness)) for x in (gm, wm, csf)]
    norm = np.maximum(powered[0] + powered[1] + powered[2], 1e-12)
    scale = np.where(total > 0.0, total / norm, 0.0).astype(np.float32)
    return {name: (p * scale).astype(np.float32) for name, p in zip(("gm", "wm", "csf"), powered)}


def periventricular_weight(
    maps: Mapping[str, np.ndarray], rng: np.random.Generator, config
) -> np.ndarray:
    """Where healthy periventricular fluid sits: a thin rim plus caps at the horns.

    Rim: 1 at the ventricle wall falling to 0 at `thickness` voxels. Caps: Gaussian blobs
    just beyond the most anterior and posterior ventricle voxels of each hemisphere
    (frontal and occipital horns), where real FLAIR shows bright "caps".

    Args:
      maps: warped maps with ventricle_distance [D, H, W].
      rng: anatomy generator.
      config: `healthy` section of the phantom config.

    Returns:
      [D, H, W] float32 in [0, 1].
    """
    distance = maps["ventricle_distance"]
    thickness = rng.uniform(*config.rim_thickness_vox)
    weight = np.clip(1.0 - (distance - 0.5) / thickness, 0.0, 1.0)
    weight[distance < 0.5] = 0.0
    ventricles = np.argwhere(distance < 0.5)
    midline = ventricles[:, 0].mean()
    cap_radius = rng.uniform(*config.cap_radius_vox)
    cap_strength = rng.uniform(0.5, 1.0, size=4)
    caps = []
    for side in (ventricles[:, 0] < midline, ventricles[:, 0] >= midline):
        half = ventricles[side]
        if len(half) == 0:
            continue
        caps.append(half[np.argmax(half[:, 1])] + np.array([0.0, cap_radius * 0.7, 0.0]))
        caps.append(half[np.argmin(half[:, 1])] - np.array([0.0, cap_radius * 0.7, 0.0]))
    for centre, strength in zip(caps, cap_strength):
        slices, rel = geometry.box_slices(centre, 3.0 * cap_radius, distance.shape)
        blob = strength * np.exp(-(rel**2).sum(axis=0) / (2.0 * cap_radius**2))
        weight[slices] = np.maximum(weight[slices], blob * (distance[slices] >= 0.5))
    return weight.astype(np.float32)


def white_matter_spots(
    maps: Mapping[str, np.ndarray], rng: np.random.Generator, config
) -> np.ndarray:
    """A few tiny unlabelled white-matter hyperintensities (normal ageing, perivascular).

    Args:
      maps: warped maps with wm and depth.
      rng: anatomy generator.
      config: `healthy` section of the phantom config.

    Returns:
      [D, H, W] float32 weight in [0, 1] (Gaussian blobs of sub-voxel to 1-voxel radius).
    """
    weight = np.zeros(maps["wm"].shape, np.float32)
    count = int(rng.integers(config.spot_count[0], config.spot_count[1] + 1))
    candidates = np.argwhere((maps["wm"] > 0.8) & (maps["depth"] > 4.0))
    for _ in range(count):
        centre = candidates[rng.integers(len(candidates))] + rng.uniform(-0.5, 0.5, 3)
        radius = rng.uniform(*config.spot_radius_vox)
        slices, rel = geometry.box_slices(centre, 3.0 * radius + 1.0, weight.shape)
        blob = np.exp(-(rel**2).sum(axis=0) / (2.0 * radius**2))
        weight[slices] = np.maximum(weight[slices], blob)
    return weight


def csf_flow_pattern(
    maps: Mapping[str, np.ndarray], rng: np.random.Generator, config
) -> tuple[np.ndarray, float, int, float]:
    """FLAIR CSF flow artefact: bright patches in the ventricles and their phase-encode ghost.

    Inflowing CSF that missed the inversion pulse is bright on FLAIR (foramen of Monro,
    third ventricle). Pulsation also ghosts along the phase-encode (anterior-posterior,
    axis 1) direction.

    Args:
      maps: warped maps with ventricle_distance.
      rng: anatomy generator.
      config: `healthy` section of the phantom config.

    Returns:
      (pattern [D, H, W] float32 in [0, 1], strength (x WM FLAIR signal), ghost shift
      (voxels along axis 1), ghost amplitude (fraction of the pattern)); strength is 0 for
      subjects without the artefact.
    """
    present = rng.uniform() < config.flow_probability
    strength = rng.uniform(*config.flow_strength) if present else 0.0
    shift = int(rng.integers(8, 40)) * int(rng.choice([-1, 1]))
    ghost = rng.uniform(*config.flow_ghost_amplitude)
    noise = geometry.smooth_field(rng, maps["csf"].shape, config.flow_ctrl)
    patches = np.clip(noise - config.flow_threshold, 0.0, 1.0)
    inside = np.clip(1.0 - maps["ventricle_distance"], 0.0, 1.0)
    return (patches * inside).astype(np.float32), float(strength), shift, float(ghost)


def morphometry(
    fractions: Mapping[str, np.ndarray], depth: np.ndarray, ventricle_distance: np.ndarray,
    brainmask: np.ndarray, voxel_mm: float,
) -> dict[str, float]:
    """Measures one subject's healthy anatomy, for comparison with published morphometry.

    Args:
      fractions: {gm, wm, csf} [D, H, W] float32 tissue fractions.
      depth, ventricle_distance: [D, H, W] float32 distances (voxels) to the outside of the
        brain and to the lateral ventricles.
      brainmask: [D, H, W] bool.
      voxel_mm: isotropic voxel size.

    Returns:
      csf_fraction: CSF / all tissue inside the brain mask;
      ventricle_ml: CSF inside the lateral and third ventricles;
      gm_wm_edge_mm: width of the GM/WM transition, 10-90 % (0.8 / the median gradient of
        the WM fraction where it crosses 0.35-0.65 between GM and WM);
      thickness_mm: mean cortical thickness, 2 V / (A_white + A_pial), with V the GM
        volume and A the areas of the WM = 0.5 and GM + WM = 0.5 surfaces
        (`skimage.measure.marching_cubes`), all within 16 mm of the brain surface;
      pure_voxels: share of brain voxels with one tissue above 0.9.
    """
    from skimage import measure  # only needed for measuring

    gm, wm, csf = (np.asarray(fractions[n], np.float32) for n in ("gm", "wm", "csf"))
    tissue = gm + wm + csf
    voxel_ml = voxel_mm**3 / 1000.0
    gradient = np.linalg.norm(np.stack(np.gradient(wm)), axis=0)
    edge = (wm > 0.35) & (wm < 0.65) & (gm + wm > 0.9)
    band = (depth * voxel_mm <= 16.0) & (ventricle_distance * voxel_mm > 6.0)

    def area(volume: np.ndarray) -> float:
        """Area (mm2) of the 0.5 isosurface of `volume` inside the band (no cut faces)."""
        verts, faces, _, _ = measure.marching_cubes(np.array(volume, np.float32), 0.5)
        centre = np.rint(verts[faces].mean(axis=1)).astype(int)
        keep = band[tuple(np.clip(centre, 0, np.asarray(band.shape) - 1).T)]
        return float(measure.mesh_surface_area(verts * voxel_mm, faces[keep]))

    cortex_mm3 = float((gm * band).sum()) * voxel_mm**3
    return {
        "csf_fraction": float(csf[brainmask].sum() / tissue[brainmask].sum()),
        "ventricle_ml": float((csf * (ventricle_distance < 0.5)).sum() * voxel_ml),
        # A binary (partial-volume free) boundary has no transition voxels: width 0.
        "gm_wm_edge_mm": (float(0.8 / np.median(gradient[edge]) * voxel_mm) if edge.any()
                          else 0.0),
        "thickness_mm": 2.0 * cortex_mm3 / (area(wm) + area(wm + gm)),
        "pure_voxels": float((np.maximum(np.maximum(gm, wm), csf)[brainmask] > 0.9).mean()),
    }
