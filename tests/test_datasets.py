"""Dataset adapters on small files written under each dataset's documented names and layout.

The layouts below are spelled out file by file (not derived from the adapters' patterns), so
a pattern that drifts from the documented layout fails here.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers_data import DEFAULT_AFFINE, make_subject_arrays

from data_prep import datasets as cli
from uadjax.data import builder, dataset_folder, datasets, nifti
from uadjax.data.preprocess import PreprocessConfig
from uadjax.data.schema import DataError

SHAPE = (20, 24, 16)


def write(path, data, affine=DEFAULT_AFFINE, dtype=None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(data if dtype is None else np.asarray(data).astype(dtype))
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def write_subject(root, names: dict, *, lesion: bool, seed: int, labels=None,
                  affine=DEFAULT_AFFINE):
    """Writes one subject: names = {modality or 'seg' or 'brainmask': relative path}."""
    mods = [k for k in names if k not in ("seg", "brainmask")]
    images, brain, seg = make_subject_arrays(SHAPE, modalities=mods, lesion=lesion, seed=seed)
    for key, rel in names.items():
        if key == "seg":
            data = seg if labels is None else labels(seg, brain)
            write(root / rel, data, affine, np.uint8)
        elif key == "brainmask":
            write(root / rel, brain, affine, np.uint8)
        else:
            write(root / rel, images[key], affine)
    return images, brain, seg


def brats_seg(seg, brain):
    """BraTS labels: oedema 2 around, necrosis 1 and enhancing 4 inside the lesion."""
    out = seg.astype(np.uint8) * 2
    core = np.argwhere(seg)
    if len(core):
        out[tuple(core[0])] = 1
        out[tuple(core[-1])] = 4
    return out


# Documented layouts: dataset -> (subject raw ids, id -> {key: relative path}, seg labels).
LAYOUTS = {
    "brats2021": (["BraTS2021_00000", "BraTS2021_00002", "BraTS2021_00003"],
                  lambda i: {m: f"BraTS2021_Training_Data/{i}/{i}_{m}.nii.gz"
                             for m in ("t1", "t1ce", "t2", "flair", "seg")}, brats_seg),
    "brats2020": (["BraTS20_Training_001", "BraTS20_Training_355"],
                  lambda i: {m: f"MICCAI_BraTS2020_TrainingData/{i}/{i}_{m}.nii.gz"
                             for m in ("t1", "t1ce", "t2", "flair")}
                  | {"seg": (f"MICCAI_BraTS2020_TrainingData/{i}/W39_1998.09.19_Segm.nii"
                             if i.endswith("355") else
                             f"MICCAI_BraTS2020_TrainingData/{i}/{i}_seg.nii.gz")}, brats_seg),
    "ixi": (["IXI002-Guys-0828", "IXI012-HH-1211", "IXI013-HH-1212"],
            lambda i: {"t1": f"IXI-T1/{i}-T1.nii.gz", "t2": f"IXI-T2/{i}-T2.nii.gz",
                       "pd": f"IXI-PD/{i}-PD.nii.gz"}, None),
    "camcan": (["sub-CC110033", "sub-CC110037"],
               lambda i: {"t1": f"BIDS_20190411/anat/{i}/anat/{i}_T1w.nii.gz",
                          "t2": f"BIDS_20190411/anat/{i}/anat/{i}_T2w.nii.gz"}, None),
    "mslub": (["patient01", "patient02"],
              lambda i: {"t1": f"coregistered/{i}/T1W.nii.gz",
                         "t1ce": f"coregistered/{i}/T1WKS.nii.gz",
                         "t2": f"coregistered/{i}/T2W.nii.gz",
                         "flair": f"coregistered/{i}/FLAIR.nii.gz",
                         "seg": f"coregistered/{i}/consensus_gt.nii.gz",
                         "brainmask": f"coregistered/{i}/brainmask.nii.gz"}, None),
    "atlas": (["sub-r001s001", "sub-r040s027"],
              lambda i: {"t1": f"ATLAS_2/Training/R{i[5:8]}/{i}/ses-1/anat/"
                               f"{i}_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz",
                         "seg": f"ATLAS_2/Training/R{i[5:8]}/{i}/ses-1/anat/{i}_ses-1_space-"
                                "MNI152NLin2009aSym_label-L_desc-T1lesion_mask.nii.gz"}, None),
    "wmh": (["Utrecht/0", "Singapore/50", "GE3T/100"],
            lambda i: {"flair": f"training/{i}/pre/FLAIR.nii.gz",
                       "t1": f"training/{i}/pre/T1.nii.gz", "seg": f"training/{i}/wmh.nii.gz"},
            lambda seg, brain: (seg + 2 * (brain & ~seg.astype(bool) & (np.arange(
                SHAPE[0])[:, None, None] < 3))).astype(np.uint8)),
}
EXPECTED_IDS = {"atlas": ["sub-r001s001_ses-1", "sub-r040s027_ses-1"],
                "wmh": ["GE3T_100", "Singapore_50", "Utrecht_0"]}


def write_layout(root, name, skip=()):
    raw_ids, names, labels = LAYOUTS[name]
    spec = datasets.get_spec(name)
    truth = {}
    for n, raw in enumerate(raw_ids):
        files = {k: v for k, v in names(raw).items() if (raw, k) not in skip}
        truth[raw] = write_subject(root, files, lesion=spec.kind != "healthy", seed=n,
                                   labels=labels)
    return truth


def modality_of(name):
    return "t2" if "t2" in datasets.get_spec(name).modalities else "t1"


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_adapter_finds_every_subject_in_the_documented_layout(tmp_path, name):
    write_layout(tmp_path / "raw", name)
    spec = datasets.get_spec(name)
    subjects = datasets.discover(spec, tmp_path / "raw")
    raw_ids = EXPECTED_IDS.get(name, sorted(LAYOUTS[name][0]))
    assert [s.raw_id for s in subjects] == sorted(raw_ids)
    for s in subjects:
        assert not s.problems
        assert set(s.files) == set(spec.files)  # every documented file was found
    report = dataset_folder.build_dataset_folder(
        [dataset_folder.Source(spec, tmp_path / "raw")], tmp_path / "out",
        modalities=(modality_of(name),), progress=False)
    assert not report.failures, report.summary()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(manifest["subjects"]) == len(raw_ids)
    for entry in manifest["subjects"]:
        assert entry["kind"] == spec.kind and entry["id"].startswith(f"{name}-")
        files = nifti.subject_files(tmp_path / "out", entry, (modality_of(name),))
        assert files.images[modality_of(name)].is_file()
        if spec.kind != "healthy":
            seg = nifti.load_label(files.seg).data
            assert entry["lesion_volume_ml"] > 0 and set(np.unique(seg)) <= {0, 1}


def test_brats_labels_all_count_as_lesion_and_the_seg_is_written_binary(tmp_path):
    truth = write_layout(tmp_path / "raw", "brats2021")
    dataset_folder.build_dataset_folder(
        [dataset_folder.Source(datasets.get_spec("brats2021"), tmp_path / "raw")],
        tmp_path / "out", modalities=("t2", "flair"), progress=False)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    for entry in manifest["subjects"]:
        seg = nib.load(str(tmp_path / "out" / entry["files"]["seg"])).get_fdata()
        np.testing.assert_array_equal(seg, truth[entry["raw_id"]][2])  # labels 1, 2, 4 -> 1
        assert Path(entry["files"]["t2"]).is_absolute()  # images are not copied


def test_wmh_other_pathology_label_is_not_lesion(tmp_path):
    truth = write_layout(tmp_path / "raw", "wmh")
    dataset_folder.build_dataset_folder(
        [dataset_folder.Source(datasets.get_spec("wmh"), tmp_path / "raw")], tmp_path / "out",
        modalities=("flair", "t1"), progress=False)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    entry = next(e for e in manifest["subjects"] if e["raw_id"] == "Utrecht_0")
    raw = nib.load(str(tmp_path / "raw/training/Utrecht/0/wmh.nii.gz")).get_fdata()
    assert (raw == 2).any()
    seg = nib.load(str(tmp_path / "out" / entry["files"]["seg"])).get_fdata()
    np.testing.assert_array_equal(seg, truth["Utrecht/0"][2])


def test_brats_dataset_folder_prepares_into_shards(tmp_path):
    write_layout(tmp_path / "raw", "brats2021")
    status = cli.main(["--out", str(tmp_path / "out"), "--source",
                       f"brats2021={tmp_path / 'raw'}", "--modalities", "t1,t1ce,t2,flair",
                       "--shards", str(tmp_path / "shards"), "--data_config",
                       "configs/data.py:tiny", "--quiet", "--jobs", "1"])
    assert status == 0
    config = PreprocessConfig(dataset="brats2021", modalities=("t1", "t1ce", "t2", "flair"),
                              image_size=(16, 16), target_spacing=(3.0, 3.0, 3.0))
    index = builder.load_volumes_index(tmp_path / "shards", config)
    assert len(index["subjects"]) == 3 and not index["failures"]
    kinds = {s["kind"] for s in index["subjects"]}
    assert kinds == {"tumour"}
    record = builder.load_split(tmp_path / "shards", config, index["subjects"][0]["split"])[0]
    assert record["image"].shape == (16, 16, 4)


# ----------------------------------------------------------------------------- splits


def test_split_counts_keep_paper_sizes_and_scale_otherwise():
    sizes = {"train": 358, "val_healthy": 44, "test_healthy": 158}
    assert datasets.split_counts(560, sizes) == sizes
    scaled = datasets.split_counts(581, sizes)
    assert sum(scaled.values()) == 581 and scaled["train"] == 371
    assert sum(datasets.split_counts(7, {"a": 1, "b": 1, "c": 1}).values()) == 7


def test_splits_are_reproducible_and_seed_dependent():
    ids = [f"s{i:03d}" for i in range(40)]
    sizes = {"train": 0.8, "val_healthy": 0.1, "test_healthy": 0.1}
    a = datasets.assign_splits(ids, sizes, seed=0)
    assert a == datasets.assign_splits(list(reversed(ids)), sizes, seed=0)
    assert a != datasets.assign_splits(ids, sizes, seed=1)
    assert sorted(a.values()).count("train") == 32


def test_split_files_fix_subjects_and_report_conflicts(tmp_path):
    ids = ["IXI002-Guys-0828", "IXI0021-Guys-0000", "IXI012-HH-1211", "IXI013-HH-1212"]
    (tmp_path / "train.csv").write_text("img_path\n/Train/ixi/t2/IXI002-Guys-0828-T2.nii.gz\n"
                                        "/Train/ixi/t2/IXI012-HH-1211-T2.nii.gz\n")
    (tmp_path / "test.csv").write_text("img_path\n/Train/ixi/t2/IXI012-HH-1211-T2.nii.gz\n")
    fixed, warnings = datasets.read_split_files(
        {"train": tmp_path / "train.csv", "test_healthy": tmp_path / "test.csv"}, ids)
    assert fixed == {"IXI002-Guys-0828": "train", "IXI012-HH-1211": "train"}
    assert len(warnings) == 1 and "IXI012-HH-1211" in warnings[0]
    splits = datasets.assign_splits(ids, {"val_healthy": 1}, seed=0, fixed=fixed)
    assert splits["IXI002-Guys-0828"] == "train" and splits["IXI013-HH-1212"] == "val_healthy"


def test_preset_sizes_reach_the_manifest(tmp_path):
    write_layout(tmp_path / "ixi", "ixi")
    write_layout(tmp_path / "brats", "brats2021")
    status = cli.main(["--out", str(tmp_path / "out"), "--preset", "behrendt", "--no_spatial",
                       "--source", f"ixi={tmp_path / 'ixi'}",
                       "--source", f"brats2021={tmp_path / 'brats'}", "--quiet", "--jobs", "1"])
    assert status == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    splits = {(e["source"], e["split"]) for e in manifest["subjects"]}
    # 3 IXI subjects at 358:44:158 -> 2 train, 1 test; 3 BraTS at 100:1151 -> all test.
    assert splits == {("ixi", "train"), ("ixi", "test_healthy"), ("brats2021", "test_lesion")}
    assert manifest["provenance"]["preset"] == "behrendt"
    rows = (tmp_path / "out" / "splits.csv").read_text().splitlines()
    assert rows[0] == "subject_id,raw_id,source,split,kind" and len(rows) == 7
    assert "ixi-IXI002-Guys-0828,IXI002-Guys-0828,ixi," in "\n".join(rows)


# ----------------------------------------------------------------------------- bad input


def build(tmp_path, spec, modalities=("t2",), **kwargs):
    return dataset_folder.build_dataset_folder(
        [dataset_folder.Source(spec, tmp_path / "raw")], tmp_path / "out",
        modalities=modalities, progress=False, **kwargs)


def failed(report):
    return {f["subject"]: f for f in report.failures}


def test_missing_modality_for_some_subjects_is_reported_and_others_go_on(tmp_path):
    write_layout(tmp_path / "raw", "brats2021", skip={("BraTS2021_00002", "flair")})
    report = build(tmp_path, datasets.get_spec("brats2021"), ("t2", "flair"))
    bad = failed(report)
    assert list(bad) == ["brats2021-BraTS2021_00002"]
    assert "no 'flair' file" in bad["brats2021-BraTS2021_00002"]["problem"]
    assert sum(report.num_subjects.values()) == 2


def test_lesion_subject_without_segmentation_fails(tmp_path):
    write_layout(tmp_path / "raw", "mslub", skip={("patient02", "seg")})
    report = build(tmp_path, datasets.get_spec("mslub"))
    assert "no segmentation" in failed(report)["mslub-patient02"]["problem"]


def test_modalities_on_different_grids_need_registration(tmp_path):
    write_layout(tmp_path / "raw", "ixi")
    t1 = tmp_path / "raw/IXI-T1/IXI012-HH-1211-T1.nii.gz"
    write(t1, np.ones((20, 24, 18), np.float32))
    report = build(tmp_path, datasets.get_spec("ixi"), ("t2", "t1"))
    assert "another voxel grid" in failed(report)["ixi-IXI012-HH-1211"]["problem"]
    assert "--register" in failed(report)["ixi-IXI012-HH-1211"]["problem"]


@pytest.mark.parametrize("labels, message", [
    (lambda seg, brain: seg * 3, "unexpected label values [3]"),
    (lambda seg, brain: seg * 0.5, "non-integer values"),
])
def test_unexpected_label_values_fail_with_the_values(tmp_path, labels, message):
    truth = write_layout(tmp_path / "raw", "brats2021")
    i = LAYOUTS["brats2021"][0][0]
    seg = truth[i][2]
    write(tmp_path / f"raw/BraTS2021_Training_Data/{i}/{i}_seg.nii.gz", labels(seg, None),
          dtype=np.float32)
    report = build(tmp_path, datasets.get_spec("brats2021"))
    problem = failed(report)[f"brats2021-{i}"]["problem"]
    assert message in problem
    assert sum(report.num_subjects.values()) == 2


def test_four_d_files(tmp_path):
    images, _, _ = make_subject_arrays(SHAPE, modalities=("t2",))
    raw = tmp_path / "raw"
    write(raw / "a/a_T2.nii.gz", images["t2"][..., None])  # one volume: accepted
    write(raw / "b/b_T2.nii.gz", np.stack([images["t2"]] * 3, -1))  # three: refused
    spec = datasets.generic_spec("mine", "healthy", {"t2": "{id}/{id}_T2.nii.gz"})
    report = build(tmp_path, spec)
    assert list(failed(report)) == ["mine-b"]
    assert "4D file with 3 volumes" in failed(report)["mine-b"]["problem"]


def test_spaces_non_ascii_paths_and_colliding_ids(tmp_path):
    raw = tmp_path / "my scans" / "Zürich cohort"
    images, _, _ = make_subject_arrays(SHAPE, modalities=("t2",))
    for sid in ("sub ü1", "sub_u1", "sub-2"):
        write(raw / sid / f"{sid} T2.nii.gz", images["t2"])
    spec = datasets.generic_spec("zh", "healthy", {"t2": "{id}/{id} T2.nii.gz"})
    report = dataset_folder.build_dataset_folder(
        [dataset_folder.Source(spec, raw)], tmp_path / "out folder", modalities=("t2",),
        progress=False)
    manifest = json.loads((tmp_path / "out folder" / "manifest.json").read_text())
    ids = sorted(e["id"] for e in manifest["subjects"])
    assert ids == ["zh-sub-2", "zh-sub_u1"]  # 'sub ü1' -> 'sub_u1' collides with 'sub_u1'
    assert "duplicate subject id" in failed(report)["zh-sub_u1"]["problem"]


def test_subject_ids_cannot_escape_the_output_folder():
    """Ids keep to [A-Za-z0-9._-] (every printable ASCII character, whitespace, control
    characters, accents and other scripts tried), never start with a dot, and stay inside
    the output folder."""
    hostile = ["../../etc", "/abs/path", "a/../../b", "..", "\u00e9\u00e8/..\\x", "a\x00b",
               "tab\there", "new\nline", "\u4e2d\u6587", "$(rm -rf)", "a:b*c?d", "CON", ".hidden",
               "".join(chr(c) for c in range(32, 127))]
    for raw in hostile:
        sid = datasets.subject_id("d", raw)
        assert re.fullmatch(r"[A-Za-z0-9._-]+", sid), (raw, sid)
        assert "/" not in sid and "\\" not in sid and not sid.startswith(".")
        assert Path("/out", sid).resolve().parent == Path("/out")
    assert datasets.subject_id("d", "sub-01_A.b") == "d-sub-01_A.b"  # kept as given
    assert datasets.subject_id("d", "s\u00fcb \u00e91") == "d-sub_e1"  # accents dropped


@pytest.mark.parametrize("dtype, scale", [(np.uint16, 65000.0), (np.int16, 32000.0),
                                          (np.uint8, 250.0)])
def test_integer_images_are_prepared_without_overflow(tmp_path, dtype, scale):
    """Near the top of their range, integer files give the slices of the same values in float."""
    images, _, _ = make_subject_arrays(SHAPE, modalities=("t2",))
    img = np.round(images["t2"] / images["t2"].max() * scale)
    slices = {}
    for name, stored in (("int", dtype), ("float", np.float32)):
        for sid in ("s1", "s2"):
            write(tmp_path / name / sid / f"{sid}_t2.nii.gz", img, dtype=stored)
        spec = datasets.generic_spec(name, "healthy", {"t2": "{id}/{id}_t2.nii.gz"})
        dataset_folder.build_dataset_folder([dataset_folder.Source(spec, tmp_path / name)],
                                            tmp_path / f"out_{name}", modalities=("t2",),
                                            progress=False)
        config = PreprocessConfig(dataset=name, image_size=(16, 20), min_brain_fraction=0.1,
                                  target_spacing=(2.0, 2.0, 2.0))
        report = builder.prepare_dataset(tmp_path / f"out_{name}", tmp_path / "shards", config,
                                         progress=False)
        assert not report.failures
        index = builder.load_volumes_index(tmp_path / "shards", config)
        source = builder.load_split(tmp_path / "shards", config, index["subjects"][0]["split"])
        slices[name] = np.stack([source[i]["image"] for i in range(len(source))])
    assert np.isfinite(slices["int"]).all() and slices["int"].max() > 0.99
    np.testing.assert_allclose(slices["int"], slices["float"], atol=1e-6)


def test_nan_voxels_fail_the_subject_at_preparation_naming_the_file(tmp_path):
    images, _, _ = make_subject_arrays(SHAPE, modalities=("t2",))
    bad = images["t2"].copy()
    bad[3, 3, 3] = np.nan
    write(tmp_path / "raw/s1/s1_t2.nii.gz", bad)
    write(tmp_path / "raw/s2/s2_t2.nii.gz", images["t2"])
    spec = datasets.generic_spec("nan", "healthy", {"t2": "{id}/{id}_t2.nii.gz"})
    build(tmp_path, spec)
    config = PreprocessConfig(dataset="nan", image_size=(16, 20), min_brain_fraction=0.1)
    report = builder.prepare_dataset(tmp_path / "out", tmp_path / "shards", config,
                                     progress=False)
    assert [f["subject"] for f in report.failures] == ["nan-s1"]
    assert "NaN" in report.failures[0]["problem"] and "s1_t2" in report.failures[0]["path"]


def test_voxel_sizes_and_orientations_differ_across_subjects(tmp_path):
    images, _, _ = make_subject_arrays(SHAPE, modalities=("t2",))
    lps = np.diag([-2.0, -2.0, 2.5, 1.0])
    ras_fine = np.diag([1.0, 1.0, 1.2, 1.0])
    permuted = np.array([[0, 0, 1.5, 0], [1.5, 0, 0, 0], [0, 1.5, 0, 0], [0, 0, 0, 1.0]])
    for sid, affine, data in (("a", lps, images["t2"]), ("b", ras_fine, images["t2"]),
                              ("c", permuted, images["t2"].transpose(1, 2, 0))):
        write(tmp_path / "raw" / sid / f"{sid}_t2.nii.gz", data, affine)
    spec = datasets.generic_spec("geo", "healthy", {"t2": "{id}/{id}_t2.nii.gz"})
    assert not build(tmp_path, spec).failures
    config = PreprocessConfig(dataset="geo", image_size=(16, 16), target_spacing=(2.0, 2.0, 2.0),
                              min_brain_fraction=0.05)
    report = builder.prepare_dataset(tmp_path / "out", tmp_path / "shards", config,
                                     progress=False)
    assert not report.failures
    index = builder.load_volumes_index(tmp_path / "shards", config)
    assert {s["id"] for s in index["subjects"]} == {"geo-a", "geo-b", "geo-c"}


def test_empty_source_and_unknown_modality_are_user_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["--out", str(tmp_path / "o"), "--source", f"ixi={tmp_path / 'empty'}",
                     "--quiet"]) == 2
    assert "no file matches" in capsys.readouterr().err
    write_layout(tmp_path / "raw", "camcan")
    assert cli.main(["--out", str(tmp_path / "o"), "--source", f"camcan={tmp_path / 'raw'}",
                     "--modalities", "flair", "--quiet"]) == 2
    assert "camcan has no ['flair']" in capsys.readouterr().err
    with pytest.raises(DataError, match="source folder not found"):
        datasets.discover(datasets.get_spec("ixi"), tmp_path / "nowhere")


def test_cli_exit_status_one_when_some_subjects_fail(tmp_path, capsys):
    write_layout(tmp_path / "raw", "camcan", skip={("sub-CC110037", "t2")})
    status = cli.main(["--out", str(tmp_path / "o"), "--source", f"camcan={tmp_path / 'raw'}",
                       "--quiet", "--jobs", "2"])
    assert status == 1
    out = capsys.readouterr()
    assert "FAILED camcan-sub-CC110037" in out.out and "1 subject(s) failed" in out.err


def test_rerun_reuses_finished_subjects(tmp_path):
    write_layout(tmp_path / "raw", "wmh")
    build(tmp_path, datasets.get_spec("wmh"), ("flair",))
    record = tmp_path / "out/wmh-Utrecht_0/wmh-Utrecht_0.json"
    seg = tmp_path / "out/wmh-Utrecht_0/wmh-Utrecht_0_seg.nii.gz"
    stamps = (record.stat().st_mtime_ns, seg.stat().st_mtime_ns)
    os.remove(tmp_path / "out/manifest.json")
    report = build(tmp_path, datasets.get_spec("wmh"), ("flair",))
    assert not report.failures and (tmp_path / "out/manifest.json").is_file()
    assert (record.stat().st_mtime_ns, seg.stat().st_mtime_ns) == stamps
    # Other modalities asked for: the subject is redone, not reused without its T1.
    report = build(tmp_path, datasets.get_spec("wmh"), ("flair", "t1"))
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert not report.failures and all("t1" in e["files"] for e in manifest["subjects"])


def test_every_adapter_is_consistent_and_documented():
    listing = cli.list_datasets()
    for name, spec in datasets.SPECS.items():
        spec.check()
        assert name in listing and spec.instructions
    for name in datasets.PRESETS:
        assert name in listing
    with pytest.raises(ValueError, match="placeholders"):
        datasets.generic_spec("x", "healthy", {"t2": "{id}/t2.nii.gz", "seg": "{sid}/seg.nii"})


# ----------------------------------------------------------------------------- spatial steps


def test_ixi_with_registration_atlas_mask_skull_strip_and_n4(tmp_path):
    """Whole-head template stand-ins under IXI names, T1 on its own grid: the behrendt
    preset's spatial steps (at 3 mm to stay fast) give every output on one template grid."""
    from scipy import ndimage

    from uadjax.data import spatial
    from uadjax.data.phantom_template import load_template

    template = load_template()
    rng = np.random.default_rng(0)
    for n, raw in enumerate(("IXI002-Guys-0828", "IXI012-HH-1211")):
        for mod, vol, shape in (("T2", template.t2, (60, 70, 44)),
                                ("T1", template.t1, (56, 72, 50))):
            angle = np.deg2rad(rng.uniform(-5, 5))
            rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle),
                                 np.cos(angle), 0], [0, 0, 1]])
            affine = np.eye(4)
            affine[:3, :3] = rotation @ np.diag([3.0, 3.0, 3.5])
            affine[:3, 3] = -affine[:3, :3] @ (np.array(shape) / 2) + [n, 2.0, -1.0]
            to_t = np.linalg.inv(template.affine) @ affine
            img = ndimage.affine_transform(vol, to_t[:3, :3], to_t[:3, 3], output_shape=shape,
                                           order=1)
            write(tmp_path / f"raw/IXI-{mod}/{raw}-{mod}.nii.gz", img.astype(np.float32),
                  affine)
    args = ["--out", str(tmp_path / "out"), "--preset", "behrendt", "--spacing", "3",
            "--source", f"ixi={tmp_path / 'raw'}", "--modalities", "t2,t1", "--quiet",
            "--jobs", "1"]
    assert cli.main(args) == 0
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["spatial"]["register"] and manifest["spatial"]["n4"]
    for entry in manifest["subjects"]:
        files = nifti.subject_files(tmp_path / "out", entry, ("t2", "t1"))
        subject = nifti.load_subject(files)  # every output on one grid (checked there)
        mask = subject.brainmask.data > 0
        expected = spatial.from_sitk(spatial.template_brain_mask((3.0, 3.0, 3.0)))[0] > 0
        assert mask.shape == expected.shape
        assert 2 * (mask & expected).sum() / (mask.sum() + expected.sum()) > 0.9
        for vol in subject.images.values():
            assert np.all(vol.data[~mask] == 0) and vol.data[mask].mean() > 0
        np.testing.assert_allclose(np.abs(np.diag(subject.reference.affine)[:3]), 3.0)
    record = tmp_path / "out/ixi-IXI002-Guys-0828/ixi-IXI002-Guys-0828.json"
    stamp = record.stat().st_mtime_ns
    assert cli.main(args) == 0 and record.stat().st_mtime_ns == stamp  # reused, not redone


@pytest.mark.slow
def test_adapter_folder_trains_and_evaluates_like_the_phantom(tmp_path):
    """IXI (healthy) + MSLUB (ms) under their real names -> dataset folder -> a tiny DDPM run
    with its shards built on first use -> per-kind results."""
    from configs import ddpm
    from uadjax import jobs

    for n in range(8):
        raw = f"IXI{n + 2:03d}-Guys-{n:04d}"
        write_subject(tmp_path / "ixi", {"t2": f"IXI-T2/{raw}-T2.nii.gz"}, lesion=False, seed=n)
    for n in range(4):
        folder = f"raw/patient{n + 1:02d}"
        write_subject(tmp_path / "mslub", {"t2": f"{folder}/T2W.nii.gz",
                                           "seg": f"{folder}/consensus_gt.nii.gz"},
                      lesion=True, seed=10 + n)
    assert cli.main(["--out", str(tmp_path / "folder"), "--source", f"ixi={tmp_path / 'ixi'}",
                     "--source", f"mslub={tmp_path / 'mslub'}", "--quiet", "--jobs", "1"]) == 0
    config = ddpm.get_config("tiny")
    config.data.dataset_dir = str(tmp_path / "folder")
    config.data.dataset = "ixi_mslub"
    config.data.data_dir = str(tmp_path / "shards")
    config.train.num_steps = 1
    config.train.val_every_steps = 0
    jobs.run_all(config, str(tmp_path / "run"), progress=False)
    results = json.loads((tmp_path / "run/eval/results.json").read_text())["results"]["ddpm"]
    assert list(results["kinds"]) == ["ms"]
    assert results["kinds"]["ms"]["num_test"] == 3
