"""Phantom dataset: determinism, lesion masks, tissue contrasts, realism, files on disk."""

from __future__ import annotations

import json

import ml_collections
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage, stats

from configs import common as common_configs
from configs import phantom as phantom_configs
from data_prep import phantom as phantom_cli
from uadjax.data import (
    phantom,
    phantom_anatomy,
    phantom_reference,
    phantom_regions,
    phantom_signal,
    schema,
)
from uadjax.data import phantom_lesions as lesions
from uadjax.data.phantom_template import load_template

IMAGES = ("t1", "t2", "pd", "flair")


@pytest.fixture(scope="module")
def template():
    return load_template()


@pytest.fixture(scope="module")
def config():
    return phantom_configs.get_config("tiny")


@pytest.fixture(scope="module")
def undeformed_config():
    """No deformation and no atrophy: subject tissue = template tissue (pure-tissue masks)."""
    config = phantom_configs.get_config("tiny")
    config.anatomy.update({"displacement_std_vox": 0.0, "rotation_deg": 0.0, "scale_range": 0.0,
                               "translation_vox": 0.0})
    config.anatomy.atrophy.probability = 0.0
    return config


@pytest.fixture(scope="module")
def subjects(template, config):
    """One subject of every kind, all at subject index 7 (same anatomy and noise)."""
    return {kind: phantom.make_subject(template, config, 7, kind, seed=0)
            for kind in (schema.HEALTHY, *schema.PHANTOM_LESION_KINDS)}


def _pure(template, name, ventricle_margin=4.0):
    """Template voxels of one pure tissue, away from the periventricular rims."""
    return ((getattr(template, name) > 0.95) & template.brainmask
            & (template.ventricle_distance > ventricle_margin))


def test_same_seed_same_arrays_other_seed_other_arrays(template, config, subjects):
    again = phantom.make_subject(template, config, 7, "tumour", seed=0)
    for key in (*IMAGES, "seg", "brainmask", "lesion_fraction"):
        np.testing.assert_array_equal(again[key], subjects["tumour"][key])
    assert again["info"] == subjects["tumour"]["info"]
    other = phantom.make_subject(template, config, 7, "tumour", seed=1)
    assert not np.array_equal(other["flair"], subjects["tumour"]["flair"])
    assert not np.array_equal(other["seg"], subjects["tumour"]["seg"])


def test_outputs_have_template_grid_and_types(template, subjects):
    for subject in subjects.values():
        for key in IMAGES:
            assert subject[key].shape == template.shape and subject[key].dtype == np.float32
            assert np.all(subject[key][subject["brainmask"] == 0] == 0.0)
            assert np.all(np.isfinite(subject[key])) and subject[key].min() >= 0.0
        assert subject["seg"].dtype == np.uint8 and subject["brainmask"].dtype == np.uint8
        assert 150_000 < subject["brainmask"].sum() < 330_000


def test_masks_are_the_inserted_lesions(subjects):
    healthy = subjects[schema.HEALTHY]
    assert healthy["seg"].sum() == 0 and healthy["lesion_fraction"].max() == 0.0
    for kind in schema.PHANTOM_LESION_KINDS:
        subject = subjects[kind]
        seg = subject["seg"].astype(bool)
        np.testing.assert_array_equal(seg, subject["lesion_fraction"] >= 0.5)
        assert seg.sum() >= 3, kind
        assert np.all(subject["brainmask"][seg] == 1)
        voxel_ml = 8.0 / 1000.0
        assert subject["info"]["lesion_volume_ml"] == pytest.approx(seg.sum() * voxel_ml)


@pytest.mark.parametrize("kind", ["ms", "stroke"])
def test_lesion_changes_images_only_where_inserted(subjects, kind):
    # Same index and seed: the healthy and lesion versions share anatomy and noise, so the
    # images differ exactly where lesion tissue went (no mass effect for these kinds).
    healthy, subject = subjects[schema.HEALTHY], subjects[kind]
    inserted = subject["lesion_fraction"] > 0.0
    seg = subject["seg"].astype(bool)
    for key in IMAGES:
        changed = healthy[key] != subject[key]
        assert not np.any(changed & ~inserted), key
        assert changed[seg].mean() > 0.99, key


def test_tissue_contrast_ordering(template, undeformed_config):
    for index in (0, 1):
        subject = phantom.make_subject(template, undeformed_config, index, "healthy", seed=3)
        median = {key: {name: float(np.median(subject[key][_pure(template, name)]))
                        for name in ("gm", "wm", "csf")} for key in IMAGES}
        t1, t2, pd, flair = (median[key] for key in IMAGES)
        assert t1["wm"] > t1["gm"] > t1["csf"]
        assert t2["csf"] > t2["gm"] > t2["wm"]
        assert pd["csf"] >= 0.95 * pd["gm"] and pd["gm"] > pd["wm"]
        assert flair["gm"] > flair["wm"] > 2.0 * flair["csf"]


def _lesion_vs_white_matter(template, subject, key):
    """Median of `key` in the lesion over median in pure WM at least 8 voxels away."""
    seg = subject["seg"].astype(bool)
    far = ~ndimage.binary_dilation(seg, iterations=8)
    return (np.median(subject[key][seg])
            / np.median(subject[key][_pure(template, "wm") & far]))


@pytest.mark.parametrize("kind", list(schema.PHANTOM_LESION_KINDS))
def test_lesions_are_t2_bright_and_t1_dark(template, undeformed_config, kind):
    subject = phantom.make_subject(template, undeformed_config, 2, kind, seed=5)
    assert _lesion_vs_white_matter(template, subject, "t2") > 1.05
    assert _lesion_vs_white_matter(template, subject, "t1") < 1.0


def test_tumour_core_is_t2_hyper_and_t1_hypo(template, undeformed_config):
    subject = phantom.make_subject(template, undeformed_config, 4, "tumour", seed=11)
    fraction = subject["lesion_fraction"]
    core = fraction > 0.9  # the core fills whole voxels; oedema is limited to white matter
    assert core.sum() > 0
    wm = _pure(template, "wm") & ~ndimage.binary_dilation(fraction > 0, iterations=8)
    assert np.median(subject["t2"][core]) > 1.3 * np.median(subject["t2"][wm])
    assert np.median(subject["t1"][core]) < 0.9 * np.median(subject["t1"][wm])


def test_signal_equations_correlate_with_real_template(template, undeformed_config):
    signals = phantom_signal.compartment_signals(phantom_signal.TISSUES,
                                                 undeformed_config.sequences)
    fractions = {name: getattr(template, name) for name in ("gm", "wm", "csf")}
    brain = template.brainmask
    subject = phantom.make_subject(template, undeformed_config, 0, "healthy", seed=0)
    for key, minimum in (("t1", 0.9), ("t2", 0.75), ("pd", 0.7)):
        synthetic = phantom_signal.mix_signal(fractions, signals[key])
        real = getattr(template, key)
        assert np.corrcoef(synthetic[brain], real[brain])[0, 1] > minimum, key
        # Full subject (texture, rims, bias field, noise) on the undeformed grid.
        assert np.corrcoef(subject[key][brain], real[brain])[0, 1] > minimum - 0.15, key


def test_flair_inversion_time_nulls_csf():
    sequence = {"kind": "ir", "tr": 9000.0, "te": 120.0, "ti": 0.0}
    assert phantom_signal.modality_signal(phantom_signal.TISSUES["csf"], sequence) < 1e-9
    ti = phantom_signal.null_inversion_time(4200.0, 1e9)
    assert ti == pytest.approx(4200.0 * np.log(2.0))


def test_severity_gives_the_target_flair_contrast():
    signals = phantom_signal.compartment_signals(phantom_signal.TISSUES,
                                                 phantom.default_config().sequences)
    severity = phantom_signal.severity_for_flair_contrast(signals, "ms", 0.3)
    flair = signals["flair"]
    mixed = severity * flair["ms"] + (1.0 - severity) * flair["wm"]
    assert mixed / flair["wm"] - 1.0 == pytest.approx(0.3)


def _micro_config():
    config = phantom_configs.get_config("tiny")
    config.splits.update({"train": 1, "val_healthy": 0, "val_lesion_per_kind": 0,
                              "test_lesion_per_kind": 1, "test_healthy": 0})
    config.kinds = ("ms",)
    return config


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory, config):
    out = tmp_path_factory.mktemp("phantom") / "tiny"
    manifest = phantom.generate_dataset(out, config, seed=0, progress=False)
    return out, manifest


def test_written_dataset_follows_the_contract(tiny_dataset, template, config):
    out, manifest = tiny_dataset
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["dataset"] == "phantom" and manifest["version"] == 1
    assert manifest["seed"] == 0 and manifest["modalities"] == list(IMAGES)
    assert manifest["config"] == json.loads(json.dumps(config.to_dict()))
    subjects = manifest["subjects"]
    assert len(subjects) == len(phantom.plan_subjects(config)) == 10
    assert {s["split"] for s in subjects} == set(schema.SPLITS)
    assert {s["kind"] for s in subjects if s["split"] == "test_lesion"} == set(schema.PHANTOM_LESION_KINDS)
    assert len({s["id"] for s in subjects}) == len(subjects)
    for entry in subjects:
        sid = entry["id"]
        assert set(entry["files"]) == {*IMAGES, "seg", "brainmask"}
        for key, relative in entry["files"].items():
            assert relative == f"{sid}/{sid}_{key}.nii.gz"
            image = nib.load(out / relative)
            assert image.shape == template.shape
            np.testing.assert_allclose(image.affine, template.affine)
            assert image.header.get_zooms() == (2.0, 2.0, 2.0)
            assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        seg = np.asarray(nib.load(out / entry["files"]["seg"]).dataobj)
        assert seg.dtype == np.uint8 and set(np.unique(seg)) <= {0, 1}
        assert entry["lesion_volume_ml"] == pytest.approx(seg.sum() * 0.008)
        assert (seg.sum() > 0) == (entry["kind"] != "healthy")
        flair = nib.load(out / entry["files"]["flair"])
        assert flair.get_data_dtype() == np.int16
        brain = np.asarray(nib.load(out / entry["files"]["brainmask"]).dataobj) > 0
        assert 500 < np.median(np.asarray(flair.dataobj)[brain]) < 2000


def test_no_partial_folder_left_and_second_call_is_cached(tiny_dataset, config):
    out, manifest = tiny_dataset
    assert not list(out.parent.glob(".tiny.*"))
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert phantom.generate_dataset(out, config, seed=0, progress=False) == manifest
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError):
        phantom.generate_dataset(out, config, seed=1, progress=False)
    assert phantom_cli.main(["--out", str(out), "--config", "configs/phantom.py:tiny",
                             "--quiet"]) == 0
    assert (out / "manifest.json").stat().st_mtime_ns == stamp


def test_same_seed_gives_byte_identical_files(tmp_path):
    config = _micro_config()
    first = phantom.generate_dataset(tmp_path / "a", config, seed=4, progress=False)
    phantom.generate_dataset(tmp_path / "b", config, seed=4, progress=False)
    for entry in first["subjects"]:
        for relative in entry["files"].values():
            first_bytes = (tmp_path / "a" / relative).read_bytes()
            assert first_bytes == (tmp_path / "b" / relative).read_bytes()
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (
        tmp_path / "b" / "manifest.json").read_bytes()


def test_worker_processes_write_the_same_files(tmp_path):
    config = _micro_config()
    serial = phantom.generate_dataset(tmp_path / "serial", config, seed=2, progress=False,
                                      workers=1)
    parallel = phantom.generate_dataset(tmp_path / "parallel", config, seed=2, progress=False,
                                        workers=2)
    assert serial == parallel
    for entry in serial["subjects"]:
        for relative in entry["files"].values():
            serial_bytes = (tmp_path / "serial" / relative).read_bytes()
            assert serial_bytes == (tmp_path / "parallel" / relative).read_bytes()


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    make_subject = phantom.make_subject

    def failing_make_subject(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return make_subject(*args, **kwargs)

    monkeypatch.setattr(phantom, "make_subject", failing_make_subject)
    with pytest.raises(KeyboardInterrupt):
        phantom.generate_dataset(tmp_path / "out", _micro_config(), seed=0, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_the_folder(tmp_path):
    config = _micro_config()
    phantom.generate_dataset(tmp_path / "out", config, seed=0, progress=False)
    manifest = phantom.generate_dataset(tmp_path / "out", config, seed=1, progress=False,
                                        overwrite=True)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["seed"] == 1
    assert manifest["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_config_variants():
    default = phantom_configs.get_config("default")
    assert len(phantom.plan_subjects(default)) == 48 + 8 + 3 * 4 + 3 * 10 + 8
    assert phantom_cli.load_config("configs/phantom.py:tiny").splits.train == 2
    assert phantom.default_config().to_dict() == phantom_configs.get_config(None).to_dict()
    with pytest.raises(ValueError):
        phantom_configs.get_config("huge")


# ----------------------------------------------------------------------------------------
# Generator 2: calibrated lesion statistics, versioned caches, individual anatomy, 1 mm.


def test_manifest_carries_the_generator_version(tiny_dataset):
    _, manifest = tiny_dataset
    assert manifest["generator"] == phantom.GENERATOR_VERSION >= 2


def test_phantom_of_another_generator_version_is_never_reused(tmp_path, monkeypatch):
    from uadjax import jobs

    config = _micro_config()
    out = tmp_path / "cache"
    manifest = phantom.generate_dataset(out, config, seed=0, progress=False)
    assert not phantom.is_stale_cache(out, config, 0)
    old = dict(manifest, generator=manifest["generator"] - 1)
    (out / "manifest.json").write_text(json.dumps(old))
    assert phantom.is_stale_cache(out, config, 0)
    with pytest.raises(FileExistsError):  # not returned as cached, not silently replaced
        phantom.generate_dataset(out, config, seed=0, progress=False)
    # The jobs own their cache folder: every job that reads the phantom (through the
    # shards) regenerates a stale one, even when its manifest and shards exist.
    monkeypatch.setattr(phantom_configs, "get_config", lambda variant=None: config)
    run = common_configs.base_config("tiny")
    run.data.update({"phantom_dir": str(tmp_path), "phantom_variant": "micro",
                     "data_dir": str(tmp_path / "shards")})
    jobs.ensure_shards(run, progress=False)
    cached = tmp_path / "micro-seed0" / "manifest.json"
    cached.write_text(json.dumps(dict(json.loads(cached.read_text()), generator=1)))
    jobs.ensure_shards(run, progress=False)
    assert json.loads(cached.read_text())["generator"] == phantom.GENERATOR_VERSION


def _lesion_config(model="relaxometry"):
    config = phantom.default_config().lesions
    config.contrast_model = model
    return config


def test_relaxometry_severities_follow_the_configured_mixture():
    config = _lesion_config()
    signals = phantom_signal.compartment_signals(phantom_signal.TISSUES,
                                                 phantom.default_config().sequences)
    rng = np.random.default_rng(0)
    draws = np.array([lesions.draw_severity(rng, signals, "oedema", config)
                      for _ in range(4000)])
    severity, contrast = draws[:, 0], draws[:, 1]
    subtle = severity < config.severity[0]
    assert subtle.mean() == pytest.approx(config.subtle_fraction, abs=0.02)
    # Each component is uniform on its range (Kolmogorov-Smirnov against scipy's uniform).
    for values, (low, high) in ((severity[~subtle], config.severity),
                                (severity[subtle], config.subtle_severity)):
        assert values.min() >= low and values.max() <= high
        assert stats.kstest(values, stats.uniform(low, high - low).cdf).pvalue > 0.01
    full = signals["flair"]["oedema"] / signals["flair"]["wm"] - 1.0
    np.testing.assert_allclose(contrast, severity * full, rtol=1e-12)


def test_flair_contrast_model_draws_uniform_contrasts():
    config = _lesion_config("flair_contrast")
    signals = phantom_signal.compartment_signals(phantom_signal.TISSUES,
                                                 phantom.default_config().sequences)
    rng = np.random.default_rng(1)
    draws = np.array([lesions.draw_severity(rng, signals, "ms", config) for _ in range(2000)])
    low, high = config.flair_contrast
    assert stats.kstest(draws[:, 1], stats.uniform(low, high - low).cdf).pvalue > 0.01
    flair = signals["flair"]
    mixed = draws[:, 0] * flair["ms"] + (1.0 - draws[:, 0]) * flair["wm"]
    np.testing.assert_allclose(mixed / flair["wm"] - 1.0, draws[:, 1], rtol=1e-9)


def test_subtle_single_lesions_are_spread_evenly_over_subjects():
    fraction = phantom.default_config().lesions.subtle_fraction
    flags = np.array([lesions.is_subtle_subject(i, fraction) for i in range(1000)])
    assert flags.mean() == pytest.approx(fraction, abs=0.005)
    for start in range(0, 990):  # any ten consecutive subjects: 1 or 2 subtle ones
        assert abs(flags[start:start + 10].sum() - 10 * fraction) < 1.0


def test_generated_lesions_follow_the_configured_distributions(template):
    """Tiny-size draws: radii, severities, counts in range; volumes match the radii."""
    config = phantom_configs.get_config("tiny")
    lc = config.lesions
    voxel_ml = template.voxel_size_mm**3 / 1000.0
    for index in range(3):
        tumour = phantom.make_subject(template, config, index, "tumour", seed=3)
        info = tumour["info"]["lesion"]
        low, high = lc.tumour.radius_vox
        assert low <= info["radius_vox"] <= high
        sphere_ml = 4.0 / 3.0 * np.pi * info["radius_vox"] ** 3 * voxel_ml
        # Roughened ellipsoid (radii x 0.75-1.25), oedema only in white matter.
        assert 0.15 * sphere_ml < tumour["info"]["lesion_volume_ml"] < 2.0 * sphere_ml
        subtle = lesions.is_subtle_subject(index, lc.subtle_fraction)
        assert (lc.subtle_severity if subtle else lc.severity)[0] <= info["severity"][0] <= (
            lc.subtle_severity if subtle else lc.severity)[1]
        assert 0.0 < info["core_share"] < 0.7
        ms = phantom.make_subject(template, config, index, "ms", seed=3)["info"]["lesion"]
        assert lc.ms.count[0] <= ms["count"] <= lc.ms.count[1] == 35
        assert len(ms["severity"]) == ms["count"]
        assert all(lc.subtle_severity[0] <= s <= lc.severity[1] for s in ms["severity"])


def test_default_lesion_volumes_sit_in_the_published_bands(template):
    """The median lesion volume of ten default subjects per kind (a test split's worth)
    against the anchors."""
    config = phantom_configs.get_config("default")
    for kind, anchor in phantom_reference.ANCHORS.items():
        volumes = [phantom.make_subject(template, config, 60 + i, kind, seed=0)[
            "info"]["lesion_volume_ml"] for i in range(10)]
        low, high = anchor["volume_ml"]["median"]
        assert low <= np.median(volumes) <= high, (kind, volumes)


def test_subtle_variant_keeps_generator_one_lesion_draws():
    subtle = phantom_configs.get_config("subtle")
    assert subtle.lesions.contrast_model == "flair_contrast"
    low, high = subtle.lesions.flair_contrast  # generator 1's [0.1, 1.0] above GM
    signals = phantom_signal.compartment_signals(phantom_signal.TISSUES, subtle.sequences)
    gm_contrast = signals["flair"]["gm"] / signals["flair"]["wm"] - 1.0
    assert (low, high) == pytest.approx((0.1 + gm_contrast - 0.16, 1.0 + gm_contrast - 0.16),
                                        abs=0.01)
    assert tuple(subtle.lesions.tumour.radius_vox) == (4.0, 14.0)
    assert tuple(subtle.healthy.spot_count) == (0, 6) and subtle.healthy.flow_probability == 0.7
    default = phantom_configs.get_config("default")
    assert default.lesions.contrast_model == "relaxometry"  # the hard variant is an option
    assert phantom_configs.get_config("subtle,tiny").splits.train == 2


def test_individual_anatomy_is_sharper_and_thinner_than_the_average(template):
    """One healthy subject's morphometry against the template and the published anchors."""
    config = phantom_configs.get_config("tiny")
    subject = phantom.make_subject(template, config, 0, schema.HEALTHY, seed=0,
                                   with_anatomy=True)
    a = subject["anatomy"]
    measured = phantom_anatomy.morphometry(a, a["depth"], a["ventricle_distance"],
                                           subject["brainmask"] > 0, template.voxel_size_mm)
    average = phantom_anatomy.morphometry(
        {"gm": template.gm, "wm": template.wm, "csf": template.csf}, template.depth,
        template.ventricle_distance, template.brainmask, template.voxel_size_mm)
    anchors = phantom_reference.ANATOMY_ANCHORS
    for key in ("thickness_mm", "csf_fraction", "ventricle_ml"):
        low, high = anchors[key]["target"]
        assert low <= measured[key] <= high, (key, measured[key])
    low, high = anchors["gm_wm_edge_mm"]["target_voxels"]
    assert low <= measured["gm_wm_edge_mm"] / template.voxel_size_mm <= high
    assert average["gm_wm_edge_mm"] > 1.5 * measured["gm_wm_edge_mm"]
    assert average["thickness_mm"] > measured["thickness_mm"] + 0.8
    assert measured["csf_fraction"] > average["csf_fraction"]


def test_morphometry_of_a_known_slab():
    """A flat 3-voxel GM slab between WM and CSF: thickness 3 voxels, no partial volume."""
    shape = (40, 40, 40)
    depth = np.zeros(shape, np.float32)  # all within the cortical band
    gm, wm, csf = (np.zeros(shape, np.float32) for _ in range(3))
    csf[..., 30:] = 1.0
    gm[..., 27:30] = 1.0
    wm[..., :27] = 1.0
    brain = np.ones(shape, bool)
    far = np.full(shape, 50.0, np.float32)
    m = phantom_anatomy.morphometry({"gm": gm, "wm": wm, "csf": csf}, depth, far, brain, 2.0)
    assert m["thickness_mm"] == pytest.approx(6.0, rel=0.06)
    assert m["pure_voxels"] == 1.0 and m["csf_fraction"] == pytest.approx(10 / 40)
    assert m["gm_wm_edge_mm"] == 0.0


def test_one_mm_variant_keeps_sizes_in_millimetres():
    one = phantom_configs.get_config("1mm,tiny")
    two = phantom_configs.get_config("tiny")
    assert one.template == "1mm" and two.template == "2mm"
    assert tuple(one.lesions.tumour.radius_vox) == tuple(2 * r for r in two.lesions.tumour.radius_vox)
    assert one.anatomy.displacement_std_vox == 2 * two.anatomy.displacement_std_vox
    template = load_template("1mm")
    assert template.shape == (160, 200, 168) and template.voxel_size_mm == 1.0
    assert template.t2 is None  # no 1 mm T2 template exists
    two_mm = load_template()
    ventricles = [(t.ventricle_distance < 0.5).sum() * t.voxel_size_mm**3 / 1000 for t in (template, two_mm)]
    assert ventricles[0] == pytest.approx(ventricles[1], rel=0.15)


def test_regions_put_textbook_landmarks_in_their_lobe_and_territory():
    """MNI points well inside each region (x right, y anterior, z superior, mm)."""
    points = {
        "frontal": (20, 55, 10), "parietal": (30, -50, 50), "temporal": (-55, -20, -10),
        "occipital": (15, -95, 5), "insula": (38, 5, 5), "deep": (-20, 2, 4),
        "infratentorial": (20, -65, -35),
    }
    mm = np.array(list(points.values()), float).T
    labels = phantom_regions.region_labels(mm)
    assert [phantom_regions.REGIONS[i] for i in labels] == list(points)
    assert phantom_regions.region_labels(np.array([[0.0], [-28.0], [-25.0]]))[0] == (
        phantom_regions.REGION_ID["infratentorial"])  # the pons
    territories = {"aca": (5, 30, 45), "mca": (-55, -20, 20), "pca": (10, -90, 0),
                   "vertebrobasilar": (20, -65, -35)}
    mm = np.array(list(territories.values()), float).T
    got = phantom_regions.territory_labels(mm, phantom_regions.region_labels(mm))
    assert [phantom_regions.TERRITORIES[i] for i in got] == list(territories)
    thalamus = np.array([[10.0], [-18.0], [8.0]])
    assert phantom_regions.TERRITORIES[phantom_regions.territory_labels(
        thalamus, phantom_regions.region_labels(thalamus))[0]] == "pca"


def test_draw_site_follows_the_prior_weights():
    weights = phantom.default_config().lesions.tumour.location_p
    names, p = lesions.normalised(weights)
    rng = np.random.default_rng(0)
    draws = [lesions.draw_site(rng, weights) for _ in range(5000)]
    counts = np.array([draws.count(n) for n in names])
    assert stats.chisquare(counts, 5000 * p).pvalue > 0.01
    with pytest.raises(ValueError, match="weights"):
        lesions.normalised({"a": 0.0})


@pytest.fixture(scope="module")
def subject_maps(template):
    """The default config's maps of one healthy subject (anatomy + regions) [D, H, W]."""
    return phantom.make_subject(template, phantom_configs.get_config("default"), 3,
                                schema.HEALTHY, seed=0, with_anatomy=True)["anatomy"]


def test_lesions_land_in_the_site_they_drew(subject_maps):
    """Tumour centres in their lobe; lacunes in deep grey/white matter; territorial
    infarcts mostly in their territory; MS lesions at their site."""
    config = phantom.default_config()
    lc = config.lesions
    maps = subject_maps
    region, territory = maps["region"], maps["territory"]
    signals = phantom_signal.compartment_signals(phantom_signal.TISSUES, config.sequences)
    for seed in range(12):
        plan = lesions.plan_tumour(maps, np.random.default_rng(seed), lc.tumour)
        at = tuple(np.round(plan.centre).astype(int))
        assert phantom_regions.REGIONS[region[at]] in lesions.TUMOUR_SITES[plan.site]
    for site in ("lacunar", "mca", "pca"):
        stroke_config = ml_collections.ConfigDict(lc.stroke.to_dict())
        stroke_config.territory_p = {site: 1.0}
        lesion = lesions.make_stroke(maps, np.random.default_rng(1), stroke_config, signals,
                                     lc)
        inside = lesion.mask > 0
        assert lesion.info["site"] == site and inside.sum() > 0
        if site == "lacunar":
            assert np.mean(region[inside] == phantom_regions.REGION_ID["deep"]) > 0.5
            assert inside.sum() * 8e-3 < 4.5  # at most a 20 mm sphere (4.2 ml)
        else:
            assert np.mean(territory[inside] == phantom_regions.TERRITORY_ID[site]) > 0.4
    ms_config = ml_collections.ConfigDict(lc.ms.to_dict())
    for site in ("infratentorial", "juxtacortical"):
        ms_config.site_p = {name: float(name == site) for name in lc.ms.site_p}
        lesion = lesions.make_ms(maps, np.random.default_rng(2), ms_config, signals, lc)
        assert lesion.info["sites"][site] == lesion.info["count"]
        inside = lesion.mask > 0
        infratentorial = region[inside] == phantom_regions.REGION_ID["infratentorial"]
        assert infratentorial.mean() > (0.8 if site == "infratentorial" else -1.0)
        if site == "juxtacortical":
            assert infratentorial.mean() < 0.05
            assert np.median(maps["gm"][inside]) > 0.1  # against the cortex


def test_single_lesion_sites_are_spread_evenly_over_subjects():
    """Any ten consecutive tumour subjects hold each lobe within 1.5 of its share."""
    weights = phantom.default_config().lesions.tumour.location_p
    names, p = lesions.normalised(weights)
    sites = np.array([lesions.spread_site(i, weights) for i in range(1000)])
    counts = np.array([(sites == n).sum() for n in names])
    np.testing.assert_allclose(counts / 1000, p, atol=0.01)
    for start in range(990):
        window = sites[start:start + 10]
        for name, share in zip(names, p):
            assert abs((window == name).sum() - 10 * share) <= 1.5, (start, name)
