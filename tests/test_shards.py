"""NIfTI -> TFDS ArrayRecord shards -> records, volumes.json and volume reassembly."""

import json
import sys

import numpy as np
import pytest
from helpers_data import prepare_tiny

from uadjax.data import builder, nifti, preprocess
from uadjax.data.schema import RECORD_KEYS, SPLITS, TRAIN


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_tiny(tmp_path_factory.mktemp("shards"))


def _preprocessed(dataset_dir, config, sid):
    entry = next(e for e in nifti.read_manifest(dataset_dir)["subjects"] if e["id"] == sid)
    return preprocess.preprocess_files(
        nifti.subject_files(dataset_dir, entry, config.modalities), config)


def test_report_and_layout(prepared):
    _, data_dir, _, report = prepared
    assert report.ok, report.summary()
    assert report.output_dir == data_dir / "uadjax_slices" / "tiny_t1_t2_16x20" / "1.0.0"
    names = sorted(p.name for p in report.output_dir.iterdir())
    assert "volumes.json" in names and "dataset_info.json" in names
    for split in SPLITS:
        assert any(n.startswith(f"uadjax_slices-{split}.array_record") for n in names)
    assert report.num_subjects == {"train": 3, "val_healthy": 1, "val_lesion": 1,
                                   "test_lesion": 1, "test_healthy": 1}
    assert sorted(p.name for p in data_dir.iterdir()) == ["uadjax_slices"]
    assert "tensorflow" not in sys.modules


def test_records_equal_preprocessed_volume(prepared):
    dataset_dir, data_dir, config, _ = prepared
    vol = _preprocessed(dataset_dir, config, "sub-0005")
    source = builder.load_split(data_dir, config, "val_lesion")
    assert len(source) == vol.num_slices
    for i in (0, 5, vol.num_slices - 1):
        record = source[i]
        assert set(record) == set(RECORD_KEYS)
        np.testing.assert_array_equal(record["image"], vol.images[i])
        np.testing.assert_array_equal(record["brain_mask"], vol.brain_mask[i].astype(np.uint8))
        np.testing.assert_array_equal(record["seg"], vol.seg[i])
        assert record["image"].dtype == np.float32 and record["seg"].dtype == np.uint8
        assert record["slice_index"] == i
        assert record["subject_id"] == b"sub-0005" and record["kind"] == b"tumour"


def test_fast_source_equals_tfds_data_source(prepared):
    _, data_dir, config, _ = prepared
    for split in (TRAIN, "test_lesion"):
        fast = builder.load_split(data_dir, config, split)
        reference = builder.load_tfds_source(data_dir, config, split)
        assert len(fast) == len(reference)
        for i in range(len(fast)):
            a, b = fast[i], reference[i]
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
            assert a["image"].dtype == b["image"].dtype == np.float32
            assert a["slice_index"].dtype == np.int32


def test_eval_splits_reassemble_into_volumes(prepared):
    dataset_dir, data_dir, config, _ = prepared
    index = builder.load_volumes_index(data_dir, config)
    for split in SPLITS[1:]:
        source = builder.load_split(data_dir, config, split)
        spans = builder.volume_records(index, split)
        assert sum(n for _, _, n in spans) == len(source)
        for sid, offset, n in spans:
            stack = np.stack([source[offset + i]["image"] for i in range(n)])
            vol = _preprocessed(dataset_dir, config, sid)
            np.testing.assert_array_equal(stack, vol.images)
            seg = np.stack([source[offset + i]["seg"] for i in range(n)])
            np.testing.assert_array_equal(seg, vol.seg)


def test_train_split_holds_filtered_slices_only(prepared):
    dataset_dir, data_dir, config, _ = prepared
    index = builder.load_volumes_index(data_dir, config)
    source = builder.load_split(data_dir, config, TRAIN)
    train = [e for e in index["subjects"] if e["split"] == TRAIN]
    assert len(source) == sum(len(e["train_slice_indices"]) for e in train)
    records = [source[i] for i in range(len(source))]
    for entry in train:
        vol = _preprocessed(dataset_dir, config, entry["id"])
        expected = preprocess.training_slice_indices(
            vol, min_brain_fraction=config.min_brain_fraction, lesion_free_only=True)
        got = [int(r["slice_index"]) for r in records
               if r["subject_id"].decode() == entry["id"]]
        assert got == expected.tolist() == entry["train_slice_indices"]
    assert all(r["seg"].sum() == 0 for r in records)  # Lesion-free, tumour subject included.
    assert all(r["brain_mask"].mean() >= config.min_brain_fraction for r in records)
    assert any(r["subject_id"] == b"sub-0003" for r in records)


def test_volumes_json_contents(prepared):
    _, data_dir, config, _ = prepared
    path = builder.builder_dir(data_dir, config) / "volumes.json"
    index = json.loads(path.read_text())
    assert index == builder.load_volumes_index(data_dir, config)
    assert index["config_name"] == "tiny_t1_t2_16x20"
    assert index["preprocess"]["modalities"] == ["t1", "t2"]
    entry = next(e for e in index["subjects"] if e["id"] == "sub-0005")
    assert entry["split"] == "val_lesion" and entry["kind"] == "tumour"
    assert entry["lesion_volume_ml"] > 0 and entry["lesion_voxels"] > 0
    geometry = preprocess.VolumeGeometry.from_dict(entry["geometry"])
    assert geometry.original_shape == (20, 24, 16)
    assert index["splits"]["val_lesion"] == entry["num_slices"]


def test_reprepare_replaces_previous_version(prepared, tmp_path):
    dataset_dir, _, config, _ = prepared
    other = tmp_path / "data"
    first = builder.prepare_dataset(dataset_dir, other, config, progress=False)
    second = builder.prepare_dataset(dataset_dir, other, config, progress=False)
    assert first.output_dir == second.output_dir
    assert len(builder.load_split(other, config, "test_lesion")) == 16
    assert sorted(p.name for p in other.iterdir()) == ["uadjax_slices"]


def test_load_split_rejects_other_settings_under_the_same_name(prepared):
    _, data_dir, config, _ = prepared
    other = preprocess.PreprocessConfig.from_config({**config.to_dict(), "percentiles": [2, 98]})
    assert other.builder_config_name == config.builder_config_name
    with pytest.raises(ValueError, match="percentiles"):
        builder.load_split(data_dir, other, TRAIN)


def test_load_split_unprepared_config(prepared):
    data_dir = prepared[1]
    with pytest.raises(FileNotFoundError, match="not prepared"):
        builder.load_split(data_dir, preprocess.PreprocessConfig(dataset="other"), TRAIN)
