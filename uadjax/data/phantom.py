"""Built-in phantom dataset: multi-contrast brain MRI with lesions, from the ICBM template.

Each subject is the ICBM 2009c tissue maps under a random smooth deformation and small
affine, sometimes atrophic, with healthy normal findings (periventricular rims and caps,
tiny white-matter spots, FLAIR CSF flow artefacts and imperfect CSF suppression), and for
lesion subjects a tumour, MS-like lesions or a stroke-like wedge. T1, T2, PD (spin echo)
and FLAIR (inversion recovery) come from the tissue fractions through the MR signal
equations with jittered 1.5 T tissue parameters (see `phantom_signal`), then a smooth bias
field and Rician noise. Every random draw comes from numpy Generators seeded by
(seed, subject index, stream): stream 0 anatomy, 1 lesion, 2 acquisition, 3 lesion
relaxometry, so the healthy and a lesion version of the same subject index share anatomy
and noise. Every default setting is anchored to a published measurement: docs/phantom.md
names the source of each, and `benchmarks/phantom_calibration.py` measures the phantom
against them.

The dataset folder follows docs/CONTRACTS.md; `generate_dataset` writes it atomically.

Size: about 540 lines: the generator's driver (plan, subjects, manifest, caching); anatomy,
lesions, signal, regions and references are their own modules.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import pathlib
import shutil
from typing import Any

import ml_collections
import nibabel as nib
import numpy as np

from uadjax.data import phantom_anatomy as anatomy
from uadjax.data import phantom_geometry as geometry
from uadjax.data import phantom_lesions as lesions
from uadjax.data import phantom_regions as regions
from uadjax.data import phantom_signal as signal
from uadjax.data import schema
from uadjax.data.phantom_template import Template, load_template

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
# Version of the generator itself (the code, not the config): bump it whenever the same
# config and seed would give other images. It is written to the manifest and is part of
# the cache key, so a phantom made by an older generator is never reused silently.
#   1  lesion FLAIR contrast drawn uniformly in [0.1, 1.0] (now the `subtle` variant)
#   2  lesion statistics calibrated to published data (docs/phantom.md)
#   3  location priors: tumours by lobe, infarcts by territory (and lacunes), MS by site
GENERATOR_VERSION = 3
# Images are scaled so that nominal white matter reads about this much in every modality.
WHITE_MATTER_LEVEL = 1000.0
ANATOMY, LESION, ACQUISITION, LESION_RELAXOMETRY = 0, 1, 2, 3
# Default parallelism of generate_dataset (starting workers costs about a second each).
AUTO_WORKERS = 2
PARALLEL_MIN_SUBJECTS = 24


def default_config() -> ml_collections.ConfigDict:
    """Generator settings of the default phantom dataset (configs/phantom.py picks variants)."""
    config = ml_collections.ConfigDict()
    # Subjects per split; lesion splits hold this many subjects of every lesion kind.
    config.splits = ml_collections.ConfigDict({
        "train": 48, "val_healthy": 8, "val_lesion_per_kind": 4, "test_lesion_per_kind": 10,
        "test_healthy": 8})
    config.kinds = schema.PHANTOM_LESION_KINDS
    # The vendored template grid: '2mm' or '1mm' (`phantom_template.ASSET_FILES`). Sizes
    # named *_vox are in voxels of this grid (configs/phantom.py:1mm doubles them).
    config.template = "2mm"
    # 1.5 T protocol (ms). FLAIR ti = 0: null nominal CSF.
    config.sequences = ml_collections.ConfigDict({
        "t1": {"kind": "se", "tr": 500.0, "te": 15.0},
        "t2": {"kind": "se", "tr": 4000.0, "te": 100.0},
        "pd": {"kind": "se", "tr": 6000.0, "te": 15.0},
        "flair": {"kind": "ir", "tr": 9000.0, "te": 120.0, "ti": 0.0},
    })
    config.anatomy = ml_collections.ConfigDict({
        "deformation_ctrl": (6, 7, 6),  # control points per axis of the smooth displacement
        "displacement_std_vox": 1.2,
        "rotation_deg": 4.0,
        "scale_range": 0.04,
        "translation_vox": 1.5,
        # One subject's anatomy, not the average's (docs/phantom.md, "Healthy anatomy").
        "ventricles": {
            "strength": (-0.3, 0.35),  # radial push (> 0 larger, < 0 smaller ventricles)
            "scale_vox": 20.0,
            "asymmetry_offset_vox": 2.0,  # sideways offset of the push: left-right asymmetry
        },
        "cortex": {
            "band_vox": 7.0,  # the cortical band: within 7 voxels of the surface, fading out
            "sulcal_csf_gain": (2.0, 4.0),
            "thickness_log_shift": (0.6, 1.2),
            "sharpness": (3.0, 5.0),
        },
        "tissue_relative_std": 0.05,  # log-normal jitter of T1, T2 per subject and tissue
        "tissue_pd_relative_std": 0.03,
        "texture_ctrl": (10, 12, 10),  # within-tissue water-content variation
        "texture_std": 0.6,  # in units of a 10% T1/T2 change
        # Some subjects are atrophic: enlarged ventricles and CSF growing into tissue.
        "atrophy": {
            "probability": 0.35,
            "ventricle_expansion": (0.15, 0.45),  # strength of the radial push (< 1)
            "ventricle_scale_vox": 9.0,
            "csf_growth": (1.15, 1.7),  # factor on the blurred CSF map
            "csf_growth_sigma_vox": 1.0,
        },
    })
    # Normal FLAIR-bright structures and acquisition: prevalence and levels from the sources
    # of docs/phantom.md, section 4.
    config.healthy = ml_collections.ConfigDict({
        "rim_probability": 0.85,
        "rim_flair_contrast": (0.15, 0.9),  # periventricular rims/caps, over WM
        "rim_thickness_vox": (0.8, 2.0),
        "cap_radius_vox": (1.5, 3.0),
        "spot_count": (0, 3),  # tiny unlabelled white-matter spots
        "spot_radius_vox": (0.4, 0.8),
        "spot_flair_contrast": (0.3, 1.0),
        "flow_probability": 0.25,  # FLAIR CSF inflow patches and their phase-encode ghost
        "flow_strength": (0.3, 1.6),  # x WM FLAIR signal
        "flow_ctrl": (14, 16, 14),
        "flow_threshold": 0.7,
        "flow_ghost_amplitude": (0.0, 0.3),
    })
    config.acquisition = ml_collections.ConfigDict({
        "bias_amplitude": (0.02, 0.1),  # max |field - 1| inside the brain
        "bias_ctrl": (4, 5, 4),
        "noise_fraction": (0.01, 0.05),  # Rician sigma / WM signal
        "gain": (0.9, 1.1),
    })
    # Lesions (docs/phantom.md, "Lesions", gives the source of every number).
    config.lesions = ml_collections.ConfigDict({
        # Severity s = the share of lesion tissue in a lesion voxel (the rest stays the
        # tissue it replaced). 'relaxometry': s drawn per lesion from `severity`, a share
        # `subtle_fraction` of lesions from `subtle_severity`, so contrast in every modality
        # follows from the compartment's relaxation times; 'flair_contrast': s set so that
        # the FLAIR contrast over WM is uniform in `flair_contrast` (generator 1: `subtle`).
        "contrast_model": "relaxometry",
        "severity": (0.85, 1.0),
        "subtle_fraction": 0.15,
        "subtle_severity": (0.35, 0.65),
        "flair_contrast": (0.1, 1.0),
        # Per-subject log-normal spread of the lesion compartments' T1 and T2 (relaxometry
        # model only; on top of anatomy.tissue_relative_std).
        "relaxometry_std": 0.10,
        "tumour": {
            "radius_vox": (9.0, 20.0),  # whole tumour incl. oedema, before roughening
            "core_ratio": (0.35, 0.65),  # core radius / tumour radius
            "core_type_p": (0.4, 0.4, 0.2),  # solid, necrotic, cystic
            "mass_effect": (0.1, 0.45),
            "irregularity": 0.2,  # smooth-noise roughening, x radius
            "oedema_edge": (0.85, 1.0),  # oedema severity at its outer edge / at the core
            "oedema_heterogeneity": 0.15,
            "solid_severity": (0.8, 1.0),
            # Lobe of the tumour centre (Larjavaara et al. 2007, gliomas): weights, summed
            # to 1 when drawn; "deep" is the basal ganglia, thalamus and insula.
            "location_p": {"frontal": 40.0, "temporal": 29.0, "parietal": 14.0,
                           "occipital": 3.0, "deep": 14.0},
        },
        "ms": {
            "count": (8, 35),
            # Sites (`phantom_lesions.ms_site_candidates`): subcortical lesions the most
            # frequent, periventricular ones the largest volume (Pongratz et al. 2023); the
            # shares themselves are ours (the paper's per-region counts were not retrieved).
            "site_p": {"periventricular": 38.0, "subcortical": 40.0, "juxtacortical": 14.0,
                       "infratentorial": 8.0},
            "periventricular_size_scale": 1.1,
            "periventricular_max_vox": 5.0,
            "long_radius_vox": (1.5, 5.0),
            "short_radius_vox": (1.0, 2.5),
        },
        "stroke": {
            "depth_fraction": (0.2, 0.55),  # wedge depth / distance cortex-ventricles
            "half_angle_deg": (10.0, 22.0),
            "irregularity_vox": 2.5,  # smooth-noise roughening
            "chronic_probability": 0.5,
            "rim_width_vox": (0.8, 1.8),  # gliotic rim of chronic infarcts
            # Arterial territory, or a lacune (small-vessel): MCA 50.8 % and small vessel
            # 12.8 % of first-ever ischaemic strokes (Ng et al. 2007); ACA 1.8 % and PCA
            # 8.6 % of cerebral infarcts (Sagrat Cor registry, Arboix et al. 2009); the
            # remaining quarter (vertebrobasilar, watershed, multiple) is not modelled.
            "territory_p": {"mca": 50.8, "aca": 1.8, "pca": 8.6, "lacunar": 12.8},
            # Lacunes: a small subcortical infarct is up to 20 mm across (STRIVE, Wardlaw et
            # al. 2013): radius 2.5-10 mm.
            "lacune_radius_vox": (1.25, 5.0),
        },
    })
    return config


def subject_rngs(seed: int, index: int) -> tuple[np.random.Generator, ...]:
    """(anatomy, lesion, acquisition, lesion relaxometry) generators of subject `index`."""
    return tuple(np.random.default_rng([seed, index, stream])
                 for stream in (ANATOMY, LESION, ACQUISITION, LESION_RELAXOMETRY))


def _wet_tissues(tissues: dict) -> dict:
    """GM and WM with 10% longer T1 and T2 and 3% more PD (for the texture field)."""
    return {name: signal.TissueParameters(p.t1 * 1.1, p.t2 * 1.1, min(1.0, p.pd * 1.03))
            for name, p in tissues.items() if name in ("gm", "wm")}


def _move_from_white_matter(fractions: dict, name: str, amount: np.ndarray) -> None:
    """Turns `amount` [D, H, W] of WM into compartment `name`, in place."""
    fractions["wm"] = fractions["wm"] - amount
    fractions[name] = fractions[name] + amount if name in fractions else amount


def _bias_field(rng, shape, brainmask, config) -> np.ndarray:
    """[D, H, W] float32 smooth multiplicative field 1 +- amplitude (max over the brain)."""
    field = geometry.smooth_field(rng, shape, config.bias_ctrl)
    peak = max(float(np.abs(field[brainmask]).max()), 1e-6)
    return (1.0 + rng.uniform(*config.bias_amplitude) * field / peak).astype(np.float32)


def make_subject(
    template: Template, config: ml_collections.ConfigDict, index: int, kind: str, seed: int,
    *, with_anatomy: bool = False,
) -> dict[str, Any]:
    """Generates one subject.

    Args:
      template: from `load_template()`.
      config: phantom config (`default_config()` or configs/phantom.py).
      index: subject index (0-based position in the dataset).
      kind: 'healthy', 'tumour', 'ms' or 'stroke'.
      seed: dataset seed.
      with_anatomy: also return 'anatomy': the subject's healthy {gm, wm, csf} fractions,
        its warped 'depth' and 'ventricle_distance' maps and its 'region' and 'territory'
        labels (`phantom_regions`) [D, H, W] (for measuring the phantom,
        `benchmarks/phantom_calibration.py`).

    Returns:
      {'t1', 't2', 'pd', 'flair': [D, H, W] float32 images (WM about 1000, 0 outside the
       brain), 'seg': [D, H, W] uint8 lesion label, 'brainmask': [D, H, W] uint8,
       'lesion_fraction': [D, H, W] float32 partial-volume lesion fraction
       (seg == lesion_fraction >= 0.5), 'info': dict of JSON-serialisable details}.
    """
    if kind != schema.HEALTHY and kind not in schema.PHANTOM_LESION_KINDS:
        raise ValueError(f"phantom: unknown subject kind {kind!r}")
    rng_anatomy, rng_lesion, rng_acquisition, rng_relaxometry = subject_rngs(seed, index)
    shape = template.shape
    a, h = config.anatomy, config.healthy

    coords = geometry.deformation_coordinates(
        rng_anatomy, shape, a.deformation_ctrl, a.displacement_std_vox, a.rotation_deg,
        a.scale_range, a.translation_vox)
    if a.get("ventricles") is not None:
        coords = anatomy.vary_ventricles(coords, template, rng_anatomy, a.ventricles)
    maps = anatomy.warp_template(template, coords)
    # Lobe and territory labels follow the warp (not the atrophy, which moves tissue by a
    # voxel or two near the ventricles: nothing at this partition's scale).
    labels = regions.subject_regions(coords, template.affine, maps["brainmask"] > 0.0)
    del coords
    maps, atrophic = anatomy.apply_atrophy(maps, rng_anatomy, a.atrophy)
    maps.update(anatomy.tissue_fractions(maps))
    maps.update(labels)
    if a.get("cortex") is not None:
        maps.update(anatomy.individual_cortex(maps, rng_anatomy, a.cortex))
    tumour_plan = None
    if kind == "tumour":
        tumour_plan = lesions.plan_tumour(
            maps, rng_lesion, config.lesions.tumour,
            site=lesions.spread_site(index, config.lesions.tumour.location_p))
        maps = lesions.apply_mass_effect(maps, tumour_plan)
    brainmask = maps["brainmask"] >= 0.5

    tissues = signal.jitter_tissues(rng_anatomy, a.tissue_relative_std,
                                    a.tissue_pd_relative_std)
    if config.lesions.contrast_model == "relaxometry":
        tissues = signal.jitter_pathology(rng_relaxometry, tissues,
                                          config.lesions.relaxometry_std)
    signals = signal.compartment_signals(tissues, config.sequences)
    wet_signals = signal.compartment_signals(_wet_tissues(tissues), config.sequences)
    texture = geometry.smooth_field(rng_anatomy, shape, a.texture_ctrl) * np.float32(
        a.texture_std)

    fractions = {name: maps[name] for name in signal.HEALTHY_TISSUES}
    anatomy_maps = ({**fractions, **{name: maps[name] for name in (
        "depth", "ventricle_distance", "region", "territory")}} if with_anatomy else None)
    rim_contrast = rng_anatomy.uniform(*h.rim_flair_contrast)
    has_rims = rng_anatomy.uniform() < h.rim_probability
    rim_weight = anatomy.periventricular_weight(maps, rng_anatomy, h)
    if has_rims:
        severity = signal.severity_for_flair_contrast(signals, "pv_rim", rim_contrast)
        _move_from_white_matter(fractions, "pv_rim", fractions["wm"] * rim_weight * severity)
    spot_contrast = rng_anatomy.uniform(*h.spot_flair_contrast)
    spot_weight = anatomy.white_matter_spots(maps, rng_anatomy, h)
    _move_from_white_matter(
        fractions, "ms", fractions["wm"] * spot_weight
        * signal.severity_for_flair_contrast(signals, "ms", spot_contrast))
    flow, flow_strength, ghost_shift, ghost_amplitude = anatomy.csf_flow_pattern(
        maps, rng_anatomy, h)

    lc = config.lesions
    subtle = lesions.is_subtle_subject(index, lc.subtle_fraction)  # single-lesion kinds
    if kind == "tumour":
        lesion = lesions.make_tumour(maps, tumour_plan, rng_lesion, lc.tumour, signals, lc,
                                     subtle)
    elif kind == "ms":
        lesion = lesions.make_ms(maps, rng_lesion, lc.ms, signals, lc)
    elif kind == "stroke":
        territory = lesions.spread_site(index, lc.stroke.territory_p)
        lesion = lesions.make_stroke(maps, rng_lesion, lc.stroke, signals, lc, subtle,
                                     territory)
    else:
        lesion = lesions.empty_lesion(shape)
    lesion.fraction *= brainmask
    fractions = lesions.insert(fractions, lesion)

    out: dict[str, Any] = {}
    acq = config.acquisition
    for modality in signal.MODALITIES:
        image = signal.mix_signal(fractions, signals[modality], texture, wet_signals[modality])
        if modality == "flair" and flow_strength > 0.0:
            artefact = flow * np.float32(flow_strength * signals["flair"]["wm"])
            image += artefact + np.float32(ghost_amplitude) * np.roll(artefact, ghost_shift, 1)
        image *= _bias_field(rng_acquisition, shape, brainmask, acq)
        white_matter = signals[modality]["wm"]
        sigma = rng_acquisition.uniform(*acq.noise_fraction) * white_matter
        nominal_white_matter = float(signal.modality_signal(signal.TISSUES["wm"],
                                                            config.sequences[modality]))
        scale = WHITE_MATTER_LEVEL / nominal_white_matter * rng_acquisition.uniform(*acq.gain)
        noisy = np.zeros(shape, np.float32)  # skull-stripped: 0 outside the brain
        noisy[brainmask] = signal.rician_noise(rng_acquisition, image[brainmask], sigma)
        out[modality] = noisy * np.float32(scale)
    out["seg"] = lesion.mask
    out["brainmask"] = brainmask.astype(np.uint8)
    out["lesion_fraction"] = lesion.fraction
    voxel_ml = template.voxel_size_mm**3 / 1000.0
    out["info"] = {
        "kind": kind, "atrophy": bool(atrophic), "periventricular_rims": bool(has_rims),
        "flow_artefact": flow_strength > 0.0,
        "lesion_volume_ml": round(float(out["seg"].sum()) * voxel_ml, 3),
        "lesion": lesion.info,
    }
    if with_anatomy:
        out["anatomy"] = anatomy_maps
    return out


def plan_subjects(config: ml_collections.ConfigDict) -> list[dict]:
    """Subjects of the dataset in order: [{'id', 'split', 'kind'}], index = position."""
    s = config.splits
    plan = [(schema.TRAIN, schema.HEALTHY)] * s.train
    plan += [(schema.VAL_HEALTHY, schema.HEALTHY)] * s.val_healthy
    for split, per_kind in ((schema.VAL_LESION, s.val_lesion_per_kind),
                            (schema.TEST_LESION, s.test_lesion_per_kind)):
        for kind in config.kinds:
            plan += [(split, kind)] * per_kind
    plan += [(schema.TEST_HEALTHY, schema.HEALTHY)] * s.test_healthy
    return [{"id": f"sub-{i + 1:04d}", "split": split, "kind": kind}
            for i, (split, kind) in enumerate(plan)]


def _nifti(volume: np.ndarray, affine: np.ndarray, dtype) -> nib.Nifti1Image:
    """NIfTI-1 image with qform = sform = `affine` (code 1) and mm units."""
    image = nib.Nifti1Image(volume.astype(dtype), affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return image


def write_subject(folder: pathlib.Path, sid: str, subject: dict, affine: np.ndarray) -> dict:
    """Writes one subject's NIfTI files; returns {key: path relative to the dataset root}.

    Images are stored as int16 (rounded; WM about 1000), seg and brainmask as uint8.
    """
    (folder / sid).mkdir(parents=True)
    files = {}
    for key in (*signal.MODALITIES, "seg", "brainmask"):
        relative = f"{sid}/{sid}_{key}.nii.gz"
        if key in signal.MODALITIES:
            data = np.clip(np.rint(subject[key]), 0, np.iinfo(np.int16).max)
            image = _nifti(data, affine, np.int16)
        else:
            image = _nifti(subject[key], affine, np.uint8)
        nib.save(image, folder / relative)
        files[key] = relative
    return files


def _jsonable(config: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON types (tuples become lists), for the manifest and caching."""
    return json.loads(json.dumps(config.to_dict()))


def _read_manifest(folder: pathlib.Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _same_phantom(manifest: dict, config_json: dict, seed: int) -> bool:
    """Whether `manifest` describes the phantom this generator makes for (config, seed)."""
    return (manifest.get("dataset") == "phantom" and manifest.get("seed") == seed
            and manifest.get("generator") == GENERATOR_VERSION
            and manifest.get("config") == config_json)


def is_stale_cache(out_dir, config: ml_collections.ConfigDict, seed: int) -> bool:
    """True when `out_dir` holds a phantom made with another config, seed or generator.

    Callers that own `out_dir` as a cache (the jobs, the calibration benchmark) then
    regenerate it with overwrite=True; a folder holding anything else is left alone.
    """
    existing = _read_manifest(pathlib.Path(out_dir))
    return (existing is not None and existing.get("dataset") == "phantom"
            and not _same_phantom(existing, _jsonable(config), seed))


def _remove_stale_partials(out_dir: pathlib.Path) -> None:
    """Deletes temporary siblings left by killed runs (their process is gone)."""
    for partial in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(partial, ignore_errors=True)
            except PermissionError:
                continue


def generate_dataset(
    out_dir: str | os.PathLike,
    config: ml_collections.ConfigDict | None = None,
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
    template: Template | None = None,
    workers: int | None = None,
) -> dict:
    """Generates the phantom dataset folder (docs/CONTRACTS.md), atomically, with caching.

    Files are written into a temporary sibling folder that is renamed to `out_dir` at the
    end, so an interrupted run leaves no half-written dataset. When `out_dir` already holds
    a manifest with the same config and seed it is returned without regenerating.

    Args:
      out_dir: dataset root.
      config: phantom config; `default_config()` when None.
      seed: dataset seed; same seed and config give byte-identical files.
      progress: show a tqdm bar.
      overwrite: regenerate even if cached, replacing an existing folder.
      template: defaults to the vendored template.
      workers: worker processes; None: up to `AUTO_WORKERS` (bounded by the CPU count) for
        datasets of at least `PARALLEL_MIN_SUBJECTS` subjects, else 1. Subjects are seeded
        independently, so the files do not depend on it.

    Returns:
      The manifest dict (also in out_dir/manifest.json).

    Raises:
      FileExistsError: `out_dir` holds something else and `overwrite` is False.
    """
    out_dir = pathlib.Path(out_dir).resolve()
    config = config if config is not None else default_config()
    config_json = _jsonable(config)
    existing = _read_manifest(out_dir)
    if existing is not None and not overwrite and _same_phantom(existing, config_json, seed):
        return existing
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out_dir}: exists with a different phantom config/seed or other content; "
            "pass overwrite=True (--overwrite) to replace it")
    template = template if template is not None else load_template(config.get("template"))
    if workers is None:
        parallel = len(plan_subjects(config)) >= PARALLEL_MIN_SUBJECTS
        workers = min(AUTO_WORKERS, os.cpu_count() or 1) if parallel else 1
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out_dir)
    partial = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        manifest = _write_all(partial, template, config, config_json, seed, progress, workers)
        if out_dir.exists():
            retired = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(retired)
            partial.rename(out_dir)
            shutil.rmtree(retired)
        else:
            partial.rename(out_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return manifest


_WORKER_TEMPLATE: Template | None = None


def _init_worker(template: Template) -> None:
    global _WORKER_TEMPLATE
    _WORKER_TEMPLATE = template


def _generate_and_write(folder, template, config, seed, index, entry) -> dict:
    """Makes and writes subject `index`; returns its manifest entry."""
    template = template if template is not None else _WORKER_TEMPLATE
    subject = make_subject(template, config, index, entry["kind"], seed)
    files = write_subject(folder, entry["id"], subject, template.affine)
    info = subject["info"]
    return {**entry, "lesion_volume_ml": info["lesion_volume_ml"], "files": files,
            "atrophy": info["atrophy"], "lesion": info["lesion"]}


def _write_all(folder, template, config, config_json, seed, progress, workers) -> dict:
    """Generates and writes every subject, then the manifest, into `folder`."""
    from uadjax.progress import progress_bar

    folder.mkdir(parents=True)
    plan = plan_subjects(config)
    bar = progress_bar(total=len(plan), desc="phantom", unit="subject", disable=not progress)
    if workers <= 1:
        subjects = []
        for index, entry in enumerate(plan):
            subjects.append(_generate_and_write(folder, template, config, seed, index, entry))
            bar.update()
    else:
        with concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker, initargs=(template,)) as pool:
            futures = [pool.submit(_generate_and_write, folder, None, config, seed, index, entry)
                       for index, entry in enumerate(plan)]
            for future in concurrent.futures.as_completed(futures):
                future.result()
                bar.update()
            subjects = [future.result() for future in futures]
    bar.close()
    manifest = {
        "dataset": "phantom", "version": MANIFEST_VERSION, "generator": GENERATOR_VERSION,
        "seed": seed,
        "modalities": list(signal.MODALITIES), "shape": list(template.shape),
        "voxel_size_mm": template.voxel_size_mm, "affine": template.affine.tolist(),
        "config": config_json, "subjects": subjects,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest
