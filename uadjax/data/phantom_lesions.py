"""Lesions for the phantom: tumour, MS-like and stroke-like, with exact voxel masks.

Every lesion is a `Lesion`: a partial-volume lesion fraction L [D, H, W] (the share of each
voxel occupied by lesion, at most the voxel's tissue) and the pathological compartments
inside it ({tissue name: [D, H, W] fraction}, each <= L). Within the lesion a "severity" s
in [0, 1] sets how much of the lesion volume is pathological tissue and how much stays the
tissue it replaced. `draw_severity` draws s per lesion under the config's contrast model:
'relaxometry' (the default) draws s itself, mostly near 1 with a minority of subtle lesions,
so each lesion's contrast in every modality follows from its compartment's relaxation
times; 'flair_contrast' (the `subtle` variant) sets s from a target FLAIR contrast over
white matter drawn uniformly (`phantom_signal.severity_for_flair_contrast`).
The label is seg = (L >= 0.5): exactly the voxels where lesion tissue was inserted.

Size: about 520 lines: the three lesion models, their shared geometry and site choice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from uadjax.data import phantom_geometry as geometry
from uadjax.data import phantom_regions as regions
from uadjax.data.phantom_anatomy import MAP_CVALS, ventricle_centre
from uadjax.data.phantom_signal import severity_for_flair_contrast

MASK_THRESHOLD = 0.5


@dataclasses.dataclass
class Lesion:
    """One subject's lesions.

    Attributes:
      fraction: [D, H, W] float32 lesion fraction L in [0, 1].
      pathology: {tissue name: [D, H, W] float32 fraction of that tissue, summing to <= L}.
      info: JSON-serialisable description (subtype, count, target FLAIR contrasts).
    """

    fraction: np.ndarray
    pathology: dict[str, np.ndarray]
    info: dict

    @property
    def mask(self) -> np.ndarray:
        """[D, H, W] uint8 label: 1 where the lesion fraction is >= 0.5."""
        return (self.fraction >= MASK_THRESHOLD).astype(np.uint8)


def empty_lesion(shape) -> Lesion:
    """No lesion (healthy subject)."""
    return Lesion(np.zeros(shape, np.float32), {}, {"count": 0})


def _pick(rng: np.random.Generator, candidates: np.ndarray, what: str) -> np.ndarray:
    """A random candidate voxel [3] with sub-voxel jitter."""
    if len(candidates) == 0:
        raise ValueError(f"phantom: no voxel qualifies as a {what}")
    return candidates[rng.integers(len(candidates))] + rng.uniform(-0.5, 0.5, size=3)


def normalised(weights: Mapping[str, float]) -> tuple[list[str], np.ndarray]:
    """(names, probabilities) of a {name: weight} prior, weights >= 0 and not all 0."""
    names = list(weights)
    p = np.asarray([float(weights[n]) for n in names], np.float64)
    if (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"phantom: a location prior needs weights >= 0, not all 0: {weights}")
    return names, p / p.sum()


def draw_site(rng: np.random.Generator, weights: Mapping[str, float]) -> str:
    """One name drawn from a {name: weight} location prior."""
    names, p = normalised(weights)
    return names[int(rng.choice(len(names), p=p))]


GOLDEN_FRACTION = (np.sqrt(5.0) - 1.0) / 2.0


def spread_site(index: int, weights: Mapping[str, float]) -> str:
    """Subject `index`'s site under a {name: weight} prior, spread evenly over subjects.

    The site is the prior's inverse CDF at u_i = frac((i + 1/2) g), g = (sqrt 5 - 1) / 2:
    a golden-ratio sequence, so any run of consecutive subjects (a split of one kind)
    holds each site in close to its share (within about one subject for ten), where
    independent draws would often give a test set of ten tumours one frontal one.
    """
    names, p = normalised(weights)
    u = ((index + 0.5) * GOLDEN_FRACTION) % 1.0
    return names[min(int(np.searchsorted(np.cumsum(p), u, side="right")), len(names) - 1)]


def is_subtle_subject(index: int, fraction: float) -> bool:
    """Whether subject `index`'s single lesion is a subtle one.

    An evenly spread assignment instead of a coin flip: subject i is subtle when
    floor((i + 1) f + 1/2) > floor(i f + 1/2), so any run of n consecutive subjects (a
    split) holds floor(n f) or ceil(n f) subtle lesions. A test set of ten tumours cannot
    draw three subtle ones by chance and move the benchmark's figures.
    """
    return int(np.floor((index + 1) * fraction + 0.5)) > int(np.floor(index * fraction + 0.5))


def draw_severity(
    rng: np.random.Generator, signals: Mapping[str, Mapping[str, float]], compartment: str,
    config, subtle: bool | None = None,
) -> tuple[float, float]:
    """One lesion's severity s and the FLAIR contrast over WM it gives, (s, contrast).

    Args:
      rng: lesion generator (one uniform draw for 'flair_contrast', two for 'relaxometry').
      signals: {modality: {tissue: signal}} of this subject.
      compartment: the lesion compartment whose FLAIR signal sets the contrast.
      config: the `lesions` section of the phantom config.
      subtle: 'relaxometry' only: whether the lesion is subtle; None draws it with
        probability `subtle_fraction` (the draw is made either way).
    """
    flair = signals["flair"]
    full_contrast = flair[compartment] / flair["wm"] - 1.0
    if config.contrast_model == "flair_contrast":
        contrast = float(rng.uniform(*config.flair_contrast))
        return severity_for_flair_contrast(signals, compartment, contrast), contrast
    if config.contrast_model != "relaxometry":
        raise ValueError(f"phantom: unknown lesions.contrast_model {config.contrast_model!r}")
    coin = rng.uniform() < config.subtle_fraction
    subtle = coin if subtle is None else subtle
    severity = float(rng.uniform(*(config.subtle_severity if subtle else config.severity)))
    return severity, severity * full_contrast


def _paste(volume: np.ndarray, slices, local: np.ndarray) -> None:
    """volume[slices] = max(volume[slices], local), in place."""
    volume[slices] = np.maximum(volume[slices], local)


# ----------------------------------------------------------------------------------------
# Tumour


@dataclasses.dataclass(frozen=True)
class TumourPlan:
    """Where a tumour grows, drawn before the healthy features (mass effect moves them)."""

    centre: np.ndarray
    radius: float
    mass_effect: float
    site: str = ""  # the drawn lobe (`TUMOUR_SITES`)


# Lobes of `tumour.location_p`: "deep" (Larjavaara's deeper structures) takes the basal
# ganglia, thalamus and insula regions of `phantom_regions`.
TUMOUR_SITES = {"frontal": ("frontal",), "temporal": ("temporal",), "parietal": ("parietal",),
                "occipital": ("occipital",), "deep": ("deep", "insula")}


def plan_tumour(maps: Mapping[str, np.ndarray], rng: np.random.Generator, config,
                site: str | None = None) -> TumourPlan:
    """Draws a tumour's centre in the white matter of its lobe, its radius and its mass
    effect.

    The centre needs white matter (> 0.6) at least 0.5 radius + 3 voxels inside the brain,
    off the ventricles; where the drawn lobe has no such voxel for this radius (a large
    tumour in a small lobe) the depth condition relaxes to 3 voxels, then the lobe to the
    whole supratentorial brain.

    Args:
      maps: warped maps (wm, depth, ventricle_distance, region) [D, H, W].
      rng: the subject's lesion generator.
      config: `lesions.tumour` of the phantom config.
      site: the lobe (a `TUMOUR_SITES` key; `spread_site` of `config.location_p` in the
        generator); None draws it from `config.location_p`.
    """
    radius = rng.uniform(*config.radius_vox)
    site = draw_site(rng, config.location_p) if site is None else site
    white = (maps["wm"] > 0.6) & (maps["ventricle_distance"] > 2.0)
    in_site = np.isin(maps["region"], [regions.REGION_ID[r] for r in TUMOUR_SITES[site]])
    supratentorial = (maps["region"] > 0) & (
        maps["region"] != regions.REGION_ID["infratentorial"])
    candidates = np.empty((0, 3), int)
    for where, depth in ((in_site, 0.5 * radius + 3.0), (in_site, 3.0),
                         (supratentorial, 0.5 * radius + 3.0)):
        candidates = np.argwhere(white & where & (maps["depth"] > depth))
        if len(candidates):
            break
    centre = _pick(rng, candidates, "tumour centre")
    return TumourPlan(centre=centre, radius=float(radius),
                      mass_effect=float(rng.uniform(*config.mass_effect)), site=site)


def apply_mass_effect(maps: Mapping[str, np.ndarray], plan: TumourPlan) -> dict:
    """Pushes tissue (and the ventricles) away from the tumour centre; brain mask unchanged."""
    moved = {name: maps[name] for name in ("gm", "wm", "csf", "depth", "ventricle_distance")}
    out = dict(maps)
    out.update(geometry.expand_around(moved, plan.centre, plan.mass_effect, plan.radius,
                                      MAP_CVALS))
    return out


def make_tumour(
    maps: Mapping[str, np.ndarray], plan: TumourPlan, rng: np.random.Generator, config,
    signals: Mapping[str, Mapping[str, float]], lesion_config, subtle: bool | None = None,
) -> Lesion:
    """An irregular tumour: solid core (maybe necrotic or cystic) inside finger-like oedema.

    Shapes are ellipsoids roughened by smooth noise. Oedema spreads in white matter and
    spares the cortex; its severity (`draw_severity`, per tumour) fades from the core
    outwards and varies in space, so some oedema is subtle. The core replaces all tissue;
    necrosis and cysts are fluid-like (T2 very bright, FLAIR darker).

    Args:
      maps: fractions gm, wm, csf after the mass effect [D, H, W].
      plan: from `plan_tumour`.
      rng: lesion generator.
      config: `lesions.tumour` config.
      signals: {modality: {tissue: signal}} of this subject.
      lesion_config: the `lesions` section (contrast model, see `draw_severity`).
      subtle: passed to `draw_severity`.

    Returns:
      The `Lesion`.
    """
    shape = maps["wm"].shape
    radius = plan.radius
    core_ratio = rng.uniform(*config.core_ratio)
    subtype = str(rng.choice(["solid", "necrotic", "cystic"], p=list(config.core_type_p)))
    slices, rel = geometry.box_slices(plan.centre, 1.6 * radius + 3.0, shape)
    box = rel.shape[1:]
    axes = geometry.random_basis(rng)
    radii = radius * rng.uniform(0.75, 1.25, size=3)
    rough = config.irregularity
    sd_outer = (geometry.ellipsoid_signed_distance(rel, axes, radii)
                + rough * radius * geometry.smooth_field(rng, box, (6, 6, 6)))
    sd_core = (geometry.ellipsoid_signed_distance(rel, axes, radii * core_ratio)
               + rough * radius * core_ratio * geometry.smooth_field(rng, box, (5, 5, 5)))
    inner_ratio = core_ratio * rng.uniform(0.4, 0.75)
    sd_inner = (geometry.ellipsoid_signed_distance(rel, axes, radii * inner_ratio)
                + 0.1 * radius * geometry.smooth_field(rng, box, (4, 4, 4)))
    outer = geometry.soft_fraction(sd_outer)
    core = np.minimum(geometry.soft_fraction(sd_core), outer)
    inner = np.minimum(geometry.soft_fraction(sd_inner), core)
    if subtype == "solid":
        inner = np.zeros_like(inner)

    gm, wm, csf = (maps[name][slices] for name in ("gm", "wm", "csf"))
    tissue = gm + wm + csf
    oedema_room = np.minimum(tissue, 1.3 * wm)  # oedema follows white matter
    oedema_geometry = (outer - core) * oedema_room
    core_geometry = core * tissue

    severity, contrast = draw_severity(rng, signals, "oedema", lesion_config, subtle)
    edge = rng.uniform(*config.oedema_edge)
    across = np.clip(sd_core / max(radius * (1.0 - core_ratio), 1.0), 0.0, 1.0)
    texture = 1.0 + config.oedema_heterogeneity * geometry.smooth_field(rng, box, (6, 6, 6))
    oedema_severity = np.clip(severity * (1.0 - (1.0 - edge) * across) * texture, 0.0, 1.0)
    solid_severity = rng.uniform(*config.solid_severity)
    inner_severity = rng.uniform(0.7, 1.0)
    inner_tissue = "necrosis" if subtype == "necrotic" else "cyst"

    local = {
        "oedema": oedema_geometry * oedema_severity,
        "tumour": (core - inner) * tissue * solid_severity,
        inner_tissue: inner * tissue * inner_severity,
    }
    fraction = np.zeros(shape, np.float32)
    fraction[slices] = core_geometry + oedema_geometry
    pathology = {}
    for name, value in local.items():
        pathology[name] = np.zeros(shape, np.float32)
        pathology[name][slices] = value
    whole = float((core_geometry + oedema_geometry).sum())
    info = {"count": 1, "subtype": subtype, "site": plan.site, "radius_vox": round(radius, 2),
            "core_share": round(float(core_geometry.sum()) / max(whole, 1e-6), 3),
            "mass_effect": round(plan.mass_effect, 3), "severity": [round(severity, 3)],
            "flair_contrast": [round(contrast, 3)]}
    return Lesion(fraction, pathology, info)


# ----------------------------------------------------------------------------------------
# MS


def _gradient_at(volume: np.ndarray, point: np.ndarray) -> np.ndarray:
    """[3] central-difference gradient of `volume` at the voxel nearest `point`."""
    idx = np.clip(np.round(point).astype(int), 1, np.asarray(volume.shape) - 2)
    grad = np.zeros(3)
    for axis in range(3):
        step = np.zeros(3, int)
        step[axis] = 1
        grad[axis] = (volume[tuple(idx + step)] - volume[tuple(idx - step)]) / 2.0
    return grad


def ms_site_candidates(maps: Mapping[str, np.ndarray], config) -> dict[str, np.ndarray]:
    """Candidate centres [N, 3] of each MS lesion site of `config.site_p`.

    periventricular: white matter within `periventricular_max_vox` of the lateral
    ventricles; juxtacortical: white matter touching the cortex (the GM/WM partial-volume
    boundary, gm > 0.15); subcortical: the other deep white matter; infratentorial: white
    matter of the brainstem and cerebellum (`phantom_regions`). Supratentorial sites
    exclude the infratentorial region.
    """
    distance = maps["ventricle_distance"]
    infratentorial = maps["region"] == regions.REGION_ID["infratentorial"]
    supra = (maps["region"] > 0) & ~infratentorial
    away = distance > config.periventricular_max_vox
    juxtacortical = supra & away & (maps["wm"] > 0.5) & (maps["gm"] > 0.15) & (maps["depth"] > 2.0)
    return {
        "periventricular": np.argwhere(supra & (maps["wm"] > 0.6) & (distance >= 1.0) & ~away),
        "juxtacortical": np.argwhere(juxtacortical),
        "subcortical": np.argwhere(supra & away & ~juxtacortical & (maps["wm"] > 0.7)
                                   & (maps["depth"] > 3.0)),
        "infratentorial": np.argwhere(infratentorial & (maps["wm"] > 0.6)
                                      & (maps["depth"] > 2.0)),
    }


def make_ms(
    maps: Mapping[str, np.ndarray], rng: np.random.Generator, config,
    signals: Mapping[str, Mapping[str, float]], lesion_config,
) -> Lesion:
    """Several small ovoid white-matter lesions at the sites of `config.site_p`.

    Periventricular ovoids point their long axis along the gradient of the distance to the
    ventricles, i.e. perpendicular to the ventricle wall (Dawson's fingers), and are
    `periventricular_size_scale` times larger (periventricular lesions carry the largest
    volume, Pongratz 2023); juxtacortical, subcortical and infratentorial ones have random
    orientation. Each lesion has its own severity (`draw_severity`). Lesions occupy
    parenchyma, not CSF.

    Args:
      maps: fractions gm, wm, csf plus depth, ventricle_distance and region [D, H, W].
      rng: lesion generator.
      config: `lesions.ms` config.
      signals: {modality: {tissue: signal}} of this subject.
      lesion_config: the `lesions` section (contrast model, see `draw_severity`).

    Returns:
      The `Lesion`; `info['sites']` counts the lesions per site.
    """
    shape = maps["wm"].shape
    distance = maps["ventricle_distance"]
    candidates = ms_site_candidates(maps, config)
    count = int(rng.integers(config.count[0], config.count[1] + 1))
    lesion_shape = np.zeros(shape, np.float32)
    lesion_severity = np.zeros(shape, np.float32)
    contrasts, severities = [], []
    sites = {name: 0 for name in config.site_p}
    for _ in range(count):
        site = draw_site(rng, config.site_p)
        if not len(candidates[site]):  # a site this grid lacks (tiny crops): deep WM instead
            site = "subcortical"
        sites[site] += 1
        centre = _pick(rng, candidates[site], f"{site} MS lesion centre")
        scale = 1.0
        if site == "periventricular":
            axes = geometry.orthonormal_basis(_gradient_at(distance, centre), rng)
            scale = config.periventricular_size_scale
        else:
            axes = geometry.random_basis(rng)
        long_radius = scale * rng.uniform(*config.long_radius_vox)
        short_radius = min(long_radius, scale * rng.uniform(*config.short_radius_vox))
        radii = (long_radius, short_radius, short_radius * rng.uniform(0.8, 1.2))
        slices, rel = geometry.box_slices(centre, long_radius + 2.0, shape)
        sd = (geometry.ellipsoid_signed_distance(rel, axes, radii)
              + 0.2 * short_radius * geometry.smooth_field(rng, rel.shape[1:], (4, 4, 4)))
        local = geometry.soft_fraction(sd)
        severity, contrast = draw_severity(rng, signals, "ms", lesion_config)
        contrasts.append(round(contrast, 3))
        severities.append(round(severity, 3))
        _paste(lesion_shape, slices, local)
        _paste(lesion_severity, slices, local * severity)
    parenchyma = maps["gm"] + maps["wm"]
    info = {"count": count, "subtype": "ms", "sites": sites, "severity": severities,
            "flair_contrast": contrasts}
    return Lesion(lesion_shape * parenchyma, {"ms": lesion_severity * parenchyma}, info)


# ----------------------------------------------------------------------------------------
# Stroke


def _wedge(maps: Mapping[str, np.ndarray], rng: np.random.Generator, config,
           territory: str) -> tuple[tuple, np.ndarray, dict]:
    """A cortical-subcortical wedge in one arterial territory: (box slices, signed
    distance [b0, b1, b2] in the box, info).

    The wedge is a cone whose axis runs from a cortical point of the territory towards the
    ventricles; it covers the cortex and the white matter beneath down to a random depth,
    with rough edges.
    """
    shape = maps["wm"].shape
    centre_of_ventricles = ventricle_centre(maps)
    cortex = np.argwhere((maps["gm"] > 0.5) & (maps["depth"] >= 1.0) & (maps["depth"] <= 4.0)
                         & (maps["territory"] == regions.TERRITORY_ID[territory]))
    surface_point = _pick(rng, cortex, f"cortical stroke origin ({territory})")
    to_centre = centre_of_ventricles - surface_point
    axis = to_centre / max(np.linalg.norm(to_centre), 1e-6)
    reach = rng.uniform(*config.depth_fraction) * np.linalg.norm(to_centre)
    half_angle = np.deg2rad(rng.uniform(*config.half_angle_deg))
    # Apex beyond the deep end; "along" counts from the apex back towards the cortex.
    apex_offset = reach * rng.uniform(0.8, 1.6)
    apex = surface_point + axis * (reach + apex_offset)
    along_min, along_max = apex_offset, reach + apex_offset + 4.0
    box_centre = apex - axis * (along_min + along_max) / 2.0
    box_radius = (along_max - along_min) / 2.0 + along_max * np.tan(half_angle) + 3.0
    slices, rel = geometry.box_slices(box_centre, box_radius, shape)
    from_apex = rel + (box_centre - apex).astype(np.float32)[:, None, None, None]
    along = -np.tensordot(axis.astype(np.float32), from_apex, axes=(0, 0))
    perp = np.sqrt(np.maximum((from_apex**2).sum(axis=0) - along**2, 0.0))
    sd = np.maximum.reduce([
        perp * np.cos(half_angle) - along * np.sin(half_angle),
        along_min - along,
        along - along_max,
    ]) + config.irregularity_vox * geometry.smooth_field(rng, rel.shape[1:], (10, 10, 10))
    return slices, sd, {"half_angle_deg": round(float(np.rad2deg(half_angle)), 1)}


def _lacune(maps: Mapping[str, np.ndarray], rng: np.random.Generator,
            config) -> tuple[tuple, np.ndarray, dict]:
    """A small subcortical (lacunar) infarct in the basal ganglia, internal capsule or
    thalamus: a roughened ellipsoid of radius `lacune_radius_vox`. Returns (box slices,
    signed distance in the box, info)."""
    shape = maps["wm"].shape
    deep = np.argwhere((maps["region"] == regions.REGION_ID["deep"])
                       & (maps["gm"] + maps["wm"] > 0.8) & (maps["ventricle_distance"] > 1.0))
    centre = _pick(rng, deep, "lacunar infarct centre")
    radius = rng.uniform(*config.lacune_radius_vox)
    radii = radius * rng.uniform(0.75, 1.25, size=3)
    slices, rel = geometry.box_slices(centre, 1.3 * radius + 2.0, shape)
    sd = (geometry.ellipsoid_signed_distance(rel, geometry.random_basis(rng), radii)
          + 0.2 * radius * geometry.smooth_field(rng, rel.shape[1:], (4, 4, 4)))
    return slices, sd, {"radius_vox": round(float(radius), 2)}


def make_stroke(
    maps: Mapping[str, np.ndarray], rng: np.random.Generator, config,
    signals: Mapping[str, Mapping[str, float]], lesion_config, subtle: bool | None = None,
    territory: str | None = None,
) -> Lesion:
    """An ischaemic infarct: a territorial wedge, or a lacune, as `config.territory_p`
    says.

    Territorial infarcts (MCA, ACA, PCA) are cortical-subcortical wedges (`_wedge`);
    lacunar ones small deep ellipsoids (`_lacune`). Subacute infarcts are oedema-like
    (FLAIR bright, severity from `draw_severity`); chronic ones are a fluid cavity (T1
    dark, T2 bright, FLAIR dark) lined with gliosis.

    Args:
      maps: fractions gm, wm, csf plus depth, ventricle_distance, region and territory
        [D, H, W].
      rng: lesion generator.
      config: `lesions.stroke` config.
      signals: {modality: {tissue: signal}} of this subject.
      lesion_config: the `lesions` section (contrast model, see `draw_severity`).
      subtle: passed to `draw_severity`.
      territory: 'mca', 'aca', 'pca' or 'lacunar' (`spread_site` of `config.territory_p`
        in the generator); None draws it from `config.territory_p`.

    Returns:
      The `Lesion`.
    """
    shape = maps["wm"].shape
    if territory is None:
        territory = draw_site(rng, config.territory_p)
    if territory == "lacunar":
        slices, sd, shape_info = _lacune(maps, rng, config)
    else:
        slices, sd, shape_info = _wedge(maps, rng, config, territory)
    box = sd.shape
    wedge = geometry.soft_fraction(sd)
    parenchyma = maps["gm"][slices] + maps["wm"][slices]
    local_fraction = wedge * parenchyma

    subtype = "chronic" if rng.uniform() < config.chronic_probability else "subacute"
    compartment = "gliosis" if subtype == "chronic" else "infarct_acute"
    severity, contrast = draw_severity(rng, signals, compartment, lesion_config, subtle)
    if subtype == "chronic":
        rim_width = rng.uniform(*config.rim_width_vox)
        cavity = np.clip(-sd - rim_width, 0.0, 1.0)
        local = {
            "infarct_fluid": local_fraction * cavity * rng.uniform(0.6, 1.0),
            "gliosis": local_fraction * (1.0 - cavity) * severity,
        }
    else:
        texture = 1.0 + 0.2 * geometry.smooth_field(rng, box, (5, 5, 5))
        local = {"infarct_acute": local_fraction * np.clip(severity * texture, 0.0, 1.0)}
    fraction = np.zeros(shape, np.float32)
    fraction[slices] = local_fraction
    pathology = {}
    for name, value in local.items():
        pathology[name] = np.zeros(shape, np.float32)
        pathology[name][slices] = value
    info = {"count": 1, "subtype": subtype, "site": territory, "severity": [round(severity, 3)],
            "flair_contrast": [round(float(contrast), 3)], **shape_info}
    return Lesion(fraction, pathology, info)


def insert(fractions: Mapping[str, np.ndarray], lesion: Lesion) -> dict[str, np.ndarray]:
    """Replaces healthy tissue by the lesion's pathological compartments.

    The healthy compartments shrink in proportion so each voxel's total is unchanged.

    Args:
      fractions: {compartment: [D, H, W] float32}, healthy tissue included.
      lesion: the lesion (pathology <= fraction <= tissue).

    Returns:
      New {compartment: [D, H, W] float32}.
    """
    if not lesion.pathology:
        return dict(fractions)
    pathology_total = sum(lesion.pathology.values())
    total = sum(fractions.values())
    keep = np.where(total > 1e-6, 1.0 - pathology_total / np.maximum(total, 1e-6), 1.0)
    keep = np.clip(keep, 0.0, 1.0).astype(np.float32)
    out = {name: value * keep for name, value in fractions.items()}
    for name, value in lesion.pathology.items():
        out[name] = out[name] + value if name in out else value
    return out
