"""Phantom dataset: determinism, lesion masks, tissue contrasts, realism, files on disk."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from configs import phantom as phantom_configs
from data_prep import phantom as phantom_cli
from uadjax.data import phantom, phantom_signal, schema
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
    ti = phantom_signal.null_inversion_time(2569.0, 1e9)
    assert ti == pytest.approx(2569.0 * np.log(2.0))


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
