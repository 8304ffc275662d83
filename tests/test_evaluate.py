"""Evaluation on known synthetic score maps, reassembly, sweeps, and the tiny run's report."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score

from uadjax import protocol
from uadjax.data import schema
from uadjax.data.pipeline import make_eval_batches
from uadjax.inference import postprocess
from uadjax.inference.scoring import RecordRange, ScoredVolume, score_volume, volume_key
from uadjax.inference.sweep import sweep, weighted_mean


def _eval_cfg(**kw):
    cfg = ml_collections.ConfigDict({
        "erode_iterations": 0, "median_size": 0, "min_component_size": 0, "threshold_steps": 10,
        "fprs": (0.01, 0.1)})
    cfg.update(kw)
    return cfg


def _volume(sid, kind, seg, score, rng):
    shape = seg.shape
    return ScoredVolume(subject_id=sid, kind=kind, score=score.astype(np.float32),
                        image=rng.random((*shape, 1)).astype(np.float32),
                        brain_mask=np.ones(shape, bool), seg=seg.astype(bool))


def _lesion(shape, rng):
    seg = np.zeros(shape, bool)
    c = rng.integers(3, np.array(shape) - 3)
    seg[c[0] - 2:c[0] + 2, c[1] - 2:c[1] + 3, c[2] - 3:c[2] + 2] = True
    return seg


def _splits(score_of, rng, shape=(8, 16, 16)):
    splits = {schema.VAL_LESION: {}, schema.TEST_LESION: {}, schema.VAL_HEALTHY: {},
              schema.TEST_HEALTHY: {}}
    for split, n in ((schema.VAL_LESION, 3), (schema.TEST_LESION, 4)):
        for i in range(n):
            seg = _lesion(shape, rng)
            sid = f"{split}-{i}"
            splits[split][sid] = _volume(sid, "tumour", seg, score_of(seg), rng)
    for split in (schema.VAL_HEALTHY, schema.TEST_HEALTHY):
        for i in range(2):
            seg = np.zeros(shape, bool)
            sid = f"{split}-{i}"
            splits[split][sid] = _volume(sid, schema.HEALTHY, seg, score_of(seg), rng)
    return splits


def test_perfect_score_map_gives_perfect_metrics():
    rng = np.random.default_rng(0)
    splits = _splits(lambda seg: seg.astype(np.float32) * 0.8 + 0.1, rng)
    results, rows = protocol.evaluate_scores(splits, _eval_cfg(), spacing=(1, 1, 1))
    entry = results["kinds"]["tumour"]
    for source in ("val", "oracle"):
        pv = entry[source]["per_volume"]
        assert pv["dice"]["mean"] == pytest.approx(1.0)
        assert pv["ap"]["mean"] == pytest.approx(1.0)
        assert pv["auroc"]["mean"] == pytest.approx(1.0)
        assert pv["assd"]["mean"] == pytest.approx(0.0)
    assert entry["healthy_fp_volume_ml"]["mean"] == 0.0
    assert len([r for r in rows if r["threshold_source"] == "val"]) == 4


def test_noisy_score_map_matches_sklearn():
    rng = np.random.default_rng(1)
    splits = _splits(lambda seg: seg * 0.5 + rng.random(seg.shape).astype(np.float32), rng)
    results, _ = protocol.evaluate_scores(splits, _eval_cfg(), spacing=(2, 1, 1))
    entry = results["kinds"]["tumour"]
    threshold = entry["val"]["threshold"]
    test = splits[schema.TEST_LESION]
    dices = [f1_score(v.seg.ravel(), (v.score > threshold).ravel()) for v in test.values()]
    aps = [average_precision_score(v.seg.ravel(), v.score.ravel()) for v in test.values()]
    assert entry["val"]["per_volume"]["dice"]["mean"] == pytest.approx(np.mean(dices), abs=1e-6)
    assert entry["val"]["per_volume"]["ap"]["mean"] == pytest.approx(np.mean(aps), abs=1e-6)
    pooled_scores = np.concatenate([v.score.ravel() for v in test.values()])
    pooled_labels = np.concatenate([v.seg.ravel() for v in test.values()])
    assert entry["oracle"]["pooled"]["ap"] == pytest.approx(
        average_precision_score(pooled_labels, pooled_scores), abs=1e-6)
    # The oracle threshold is the best pooled Dice on the test set: no fair threshold beats it.
    assert entry["oracle"]["pooled"]["dice"] >= entry["val"]["pooled"]["dice"] - 1e-9
    # Label-free thresholds: the healthy validation false-positive rate is respected.
    healthy = np.concatenate([v.score.ravel() for v in splits[schema.VAL_HEALTHY].values()])
    for rate in (0.01, 0.1):
        assert np.mean(healthy > results["fpr_thresholds"][f"fpr@{rate:g}"]) <= rate


def test_fpr_thresholds_over_the_brain_or_every_voxel():
    """'all' counts the background too (Behrendt's _test_end): at the threshold at most a
    fraction r of every voxel of the post-processed healthy validation volumes lies above
    it, and more than r at or above it; the background zeros dilute the false positives,
    so the threshold is lower than over the brain."""
    rng = np.random.default_rng(4)
    splits = _splits(lambda seg: seg * 0.5 + rng.random(seg.shape).astype(np.float32), rng)
    for split in splits.values():
        for v in split.values():
            v.brain_mask[:, :4] = False  # some background
    brain, _ = protocol.evaluate_scores(splits, _eval_cfg(erode_iterations=1),
                                        spacing=(1, 1, 1))
    every, _ = protocol.evaluate_scores(splits, _eval_cfg(erode_iterations=1,
                                                          fpr_voxels="all"), spacing=(1, 1, 1))
    processed = protocol.postprocess_splits(splits, _eval_cfg(erode_iterations=1))
    healthy = np.concatenate([processed[sid].ravel() for sid in splits[schema.VAL_HEALTHY]])
    for rate in (0.01, 0.1):
        key = f"fpr@{rate:g}"
        threshold = every["fpr_thresholds"][key]
        assert np.mean(healthy > threshold) <= rate < np.mean(healthy >= threshold)
        assert threshold < brain["fpr_thresholds"][key]
    with pytest.raises(ValueError, match="fpr_voxels"):
        protocol.evaluate_scores(splits, _eval_cfg(fpr_voxels="background"), spacing=(1, 1, 1))


def test_postprocessing_switches_are_applied():
    rng = np.random.default_rng(2)
    splits = _splits(lambda seg: seg * 0.5 + rng.random(seg.shape).astype(np.float32), rng)
    cfg = _eval_cfg(erode_iterations=1, median_size=3)
    vol = next(iter(splits[schema.TEST_LESION].values()))
    processed = protocol.postprocess_volumes({"a": vol}, cfg)["a"]
    expected = postprocess.postprocess_scores(vol.score, vol.brain_mask, erode_iterations=1,
                                              median_size=3)
    np.testing.assert_array_equal(processed, expected)


def test_pooled_voxels_keep_everything_up_to_the_cap_and_a_uniform_sample_beyond():
    rng = np.random.default_rng(3)
    chunks = [(rng.random(n).astype(np.float32), rng.random(n) < 0.2) for n in (500, 700, 300)]
    exact = protocol.PooledVoxels(1500)
    for c in chunks:
        exact.add(*c)
    for got, want in zip(exact.arrays(), (np.concatenate([c[i] for c in chunks])
                                          for i in (0, 1)), strict=True):
        np.testing.assert_array_equal(got, want)  # all voxels, in order
    assert exact.rate == 1.0

    big = [(rng.random(20_000).astype(np.float32), rng.random(20_000) < 0.3) for _ in range(10)]
    sample = protocol.PooledVoxels(30_000, seed=0)
    for c in big:
        sample.add(*c)
    scores, labels = sample.arrays()
    assert scores.size <= 30_000 and sample.rate == 1 / 8  # 200k halved 3 times to 25k
    assert scores.size == pytest.approx(200_000 * sample.rate, rel=0.05)
    assert labels.mean() == pytest.approx(0.3, abs=0.02)  # uniform: the label rate holds
    # Every chunk is represented at the same rate (no bias to early or late volumes).
    assert np.quantile(scores, 0.9) == pytest.approx(0.9, abs=0.02)


def _stored(splits, tmp_path):
    """The same splits as lazy StoredSplit mappings over a VolumeStore on disk."""
    from uadjax.inference.volume_store import VolumeStore

    store = VolumeStore(tmp_path, {"test": 1})
    store.prepare()
    for split, vols in splits.items():
        for v in vols.values():
            store.save(split, v)
    return store, {split: store.split(split, {s: v.kind for s, v in vols.items()})
                   for split, vols in splits.items()}


def test_streamed_protocol_equals_the_in_memory_one(tmp_path):
    rng = np.random.default_rng(4)
    splits = _splits(lambda seg: seg * 0.5 + rng.random(seg.shape).astype(np.float32), rng)
    cfg = _eval_cfg(erode_iterations=1, median_size=3, min_component_size=2)
    want, want_rows = protocol.evaluate_scores(splits, cfg, spacing=(1, 1, 1))
    store, lazy = _stored(splits, tmp_path)
    processed = protocol.postprocess_splits(lazy, cfg, store.processed_dir / "m")
    got, got_rows = protocol.evaluate_scores(lazy, cfg, spacing=(1, 1, 1), scores=processed)
    assert got == want and got_rows == want_rows
    assert len(list((store.processed_dir / "m").glob("*.npy"))) == sum(map(len, splits.values()))
    assert protocol.calibrate(lazy, cfg, processed) == protocol.calibrate(
        splits, cfg, protocol.postprocess_splits(splits, cfg))
    assert protocol.reconstruction_summary(lazy) == protocol.reconstruction_summary(splits)


def test_protocol_past_the_pooled_voxel_cap_stays_close_to_exact():
    rng = np.random.default_rng(5)
    splits = _splits(lambda seg: seg * 0.7 + rng.random(seg.shape).astype(np.float32), rng,
                     shape=(8, 32, 32))
    exact, _ = protocol.evaluate_scores(splits, _eval_cfg(), spacing=(1, 1, 1))
    capped, _ = protocol.evaluate_scores(splits, _eval_cfg(max_pooled_voxels=8_000),
                                         spacing=(1, 1, 1))  # 4 x 8,192 voxels per pool
    a, b = exact["kinds"]["tumour"], capped["kinds"]["tumour"]
    assert a != b  # sampled, not exact
    assert b["oracle"]["pooled"]["ap"] == pytest.approx(a["oracle"]["pooled"]["ap"], abs=0.05)
    assert b["oracle"]["pooled"]["auroc"] == pytest.approx(a["oracle"]["pooled"]["auroc"],
                                                           abs=0.01)
    for source in ("val", "oracle"):
        assert b[source]["per_volume"]["dice"]["mean"] == pytest.approx(
            a[source]["per_volume"]["dice"]["mean"], abs=0.05)
    for rate in (0.01, 0.1):
        key = f"fpr@{rate:g}"
        assert capped["fpr_thresholds"][key] == pytest.approx(exact["fpr_thresholds"][key],
                                                              abs=0.05)


def test_score_volume_reassembles_its_records_like_a_loop():
    rng = np.random.default_rng(3)
    depth = {"a": 5, "b": 3}
    records = [{"image": rng.random((4, 4, 1)).astype(np.float32),
                "brain_mask": np.ones((4, 4), np.uint8), "seg": np.zeros((4, 4), np.uint8),
                "subject_id": sid.encode(), "kind": b"healthy", "slice_index": k}
               for sid in ("a", "b") for k in range(depth[sid])]
    calls = []

    def scorer(batch, i, subject_id):
        calls.append((i, subject_id))
        return {"score": batch["image"][..., 0] * 2.0}

    # b's records are 5..7 of the split; batches of 2: the second one padded.
    batches = make_eval_batches(RecordRange(records, 5, 3), batch_size=2)
    volume = score_volume(scorer, batches, subject_id="b", num_slices=3)
    expected = np.stack([records[5 + k]["image"][..., 0] * 2.0 for k in range(3)])
    np.testing.assert_array_equal(volume.score, expected)
    assert volume.kind == "healthy" and volume.score.shape == (3, 4, 4)
    assert calls == [(0, "b"), (1, "b")]  # the volume's own batch numbers and key
    with pytest.raises(RuntimeError, match="missing"):
        score_volume(scorer, make_eval_batches(RecordRange(records, 5, 2), batch_size=2),
                     subject_id="b", num_slices=3)
    with pytest.raises(RuntimeError, match="hold a slice of a"):
        score_volume(scorer, make_eval_batches(RecordRange(records, 4, 3), batch_size=2),
                     subject_id="b", num_slices=3)
    with pytest.raises(IndexError, match="outside a split of 8"):
        RecordRange(records, 6, 3)


def test_volume_key_depends_on_the_seed_and_the_subject_only():
    base = jax.random.key(0)
    a = jax.random.key_data(volume_key(base, "sub-0001"))
    assert np.array_equal(a, jax.random.key_data(volume_key(jax.random.key(0), "sub-0001")))
    assert not np.array_equal(a, jax.random.key_data(volume_key(base, "sub-0002")))
    assert not np.array_equal(a, jax.random.key_data(volume_key(jax.random.key(1),
                                                                "sub-0001")))


@pytest.mark.parametrize("chunk", [None, 2])
def test_sweep_matches_a_loop(chunk):
    xs = jnp.arange(5.0)
    keys = jax.random.split(jax.random.key(0), 5)

    def fn(variant):
        x, key = variant
        return {"y": x * jax.random.normal(key, (3,))}

    out = sweep(fn, (xs, keys), chunk_size=chunk)
    loop = [fn((xs[i], keys[i]))["y"] for i in range(5)]
    np.testing.assert_allclose(out["y"], np.stack(loop), rtol=1e-6)
    np.testing.assert_allclose(weighted_mean(out)["y"], np.mean(loop, axis=0), rtol=1e-6)
    w = jnp.array([1.0, 0, 0, 0, 3.0])
    np.testing.assert_allclose(weighted_mean(out, w)["y"], (loop[0] + 3 * loop[4]) / 4,
                               rtol=1e-6)


def test_tiny_run_report(tiny_run):
    eval_dir = os.path.join(tiny_run.workdir, "eval")
    with open(os.path.join(eval_dir, "results.json")) as f:
        results = json.load(f)
    assert set(results["results"]) == {"ddpm", "threshold"}
    assert results["timing"]["slices_scored"] > 0
    with open(os.path.join(eval_dir, "report.md")) as f:
        report = f.read()
    assert "| ddpm |" in report and "| threshold |" in report
    with open(os.path.join(eval_dir, "calibration.json")) as f:
        calibration = json.load(f)
    assert calibration["threshold"] >= 0


def test_volume_store_resume_counts_scored_volumes_not_temporary_files(tmp_path):
    from uadjax.inference.volume_store import VolumeStore

    rng = np.random.default_rng(6)
    volume = _volume("a", "tumour", _lesion((8, 16, 16), rng), rng.random((8, 16, 16)), rng)
    store = VolumeStore(tmp_path, {"id": 1})
    store.prepare()
    store.save("test_lesion", volume)
    (store.folder / "test_lesion" / ".b.npz.x1.tmp.npz").write_bytes(b"cut short")
    assert store.prepare() == 1  # same identity: kept, the temporary file not counted
    assert VolumeStore(tmp_path, {"id": 2}).prepare() == 0  # other identity: discarded
    assert not store.has("test_lesion", "a")
