"""grain pipelines: training batches, augmentation, sharding, save/restore, eval batches."""

import grain
import numpy as np
import pytest
from helpers_data import prepare_tiny
from scipy import ndimage

from uadjax.data import builder, pipeline
from uadjax.data.pipeline import AugmentConfig

H, W, M = 12, 10, 2


def _records(n, seed=0):
    """n in-memory slice records; slice_index = position, brain = a centred rectangle."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((H, W), np.uint8)
    mask[3:9, 2:8] = 1
    return [{
        "image": (rng.uniform(0.2, 1.0, (H, W, M)) * mask[..., None]).astype(np.float32),
        "brain_mask": mask.copy(),
        "seg": np.zeros((H, W), np.uint8),
        "subject_id": f"sub-{i // 5:04d}".encode(),
        "slice_index": np.int32(i),
        "kind": b"healthy",
    } for i in range(n)]


@pytest.fixture(scope="module")
def records():
    return _records(37)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_train_batches_static_shapes_and_keys(records):
    it = pipeline.make_train_iterator(records, batch_size=8, seed=0,
                                      augment_config=AugmentConfig())
    for batch in _take(it, 6):  # 6 * 8 > 37: crosses an epoch boundary.
        assert set(batch) == {"image", "brain_mask", "seg", "slice_index"}
        assert batch["image"].shape == (8, H, W, M) and batch["image"].dtype == np.float32
        assert batch["brain_mask"].shape == (8, H, W) and batch["brain_mask"].dtype == np.uint8
        assert batch["seg"].dtype == np.uint8
        assert batch["slice_index"].shape == (8,) and batch["slice_index"].dtype == np.int32


def test_one_epoch_sees_each_record_at_most_once_in_shuffled_order(records):
    it = pipeline.make_train_iterator(records, batch_size=8, seed=3, augment_config=None,
                                      num_epochs=1)
    seen = np.concatenate([b["slice_index"] for b in it])
    assert len(seen) == 32 and len(set(seen.tolist())) == 32  # drop_remainder: 37 // 8.
    assert seen.tolist() != sorted(seen.tolist())


def test_same_seed_same_batches_other_seed_differs(records):
    aug = AugmentConfig(gamma_p=1.0, noise_p=1.0, bias_p=1.0)

    def make(seed):
        return pipeline.make_train_iterator(records, batch_size=4, seed=seed,
                                            augment_config=aug)

    _assert_same(_take(make(1), 5), _take(make(1), 5))
    assert not np.array_equal(next(make(1))["slice_index"], next(make(2))["slice_index"])


def test_restore_gives_the_uninterrupted_next_batches(records):
    aug = AugmentConfig(gamma_p=0.5, noise_p=0.5, bias_p=0.5)
    it = pipeline.make_train_iterator(records, batch_size=4, seed=7, augment_config=aug)
    _take(it, 11)  # Past the first epoch (37 // 4 = 9 batches).
    state = it.get_state()
    expected = _take(it, 4)
    restored = pipeline.make_train_iterator(records, batch_size=4, seed=7, augment_config=aug)
    restored.set_state(state)
    _assert_same(_take(restored, 4), expected)


def test_orbax_save_restore_with_grain_checkpoint_handlers(records, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    aug = AugmentConfig()
    it = pipeline.make_train_iterator(records, batch_size=4, seed=2, augment_config=aug)
    _take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(
            data_iter=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
        expected = _take(it, 2)
        restored = pipeline.make_train_iterator(records, batch_size=4, seed=2,
                                                augment_config=aug)
        manager.restore(3, args=ocp.args.Composite(
            data_iter=grain.checkpoint.CheckpointRestore(restored)))
    _assert_same(_take(restored, 2), expected)


@pytest.mark.parametrize("augment", [False, True])
def test_process_parts_concatenate_to_the_single_process_batches(records, augment):
    """3 processes x 2 rows read disjoint records and, put together (as
    `make_array_from_process_local_data` does), give the batches of one process with 6
    rows, augmentation included: a multi-host run trains on the same data as a single one."""
    aug = (AugmentConfig(gamma_p=0.7, bias_p=0.7, noise_p=0.7, blur_p=0.7, ghost_p=0.7)
           if augment else None)
    single = _take(pipeline.make_train_iterator(records, batch_size=6, seed=3,
                                                augment_config=aug), 6)
    parts = [_take(pipeline.make_train_iterator(records, batch_size=2, seed=3,
                                                augment_config=aug, process_index=p,
                                                process_count=3), 6) for p in range(3)]
    for step in range(6):
        for key in pipeline.TRAIN_KEYS:
            joined = np.concatenate([parts[p][step][key] for p in range(3)])
            np.testing.assert_array_equal(joined, single[step][key])
        ids = [set(parts[p][step]["slice_index"].tolist()) for p in range(3)]
        assert not (ids[0] & ids[1]) and not (ids[1] & ids[2])


def test_augmentation_changes_only_brain_pixels(records):
    batch = pipeline.stack_train_records(records[:16])
    config = AugmentConfig(gamma_p=1.0, bias_p=1.0, noise_p=1.0, blur_p=1.0, ghost_p=1.0)
    out = pipeline.augment_batch(batch, np.random.default_rng(0), config)
    brain = batch["brain_mask"].astype(bool)
    np.testing.assert_array_equal(out["image"][~brain], batch["image"][~brain])
    assert np.mean(out["image"][brain] != batch["image"][brain]) > 0.9
    for key in ("brain_mask", "seg", "slice_index"):
        np.testing.assert_array_equal(out[key], batch[key])
    again = pipeline.augment_batch(batch, np.random.default_rng(0), config)
    np.testing.assert_array_equal(again["image"], out["image"])


@pytest.mark.parametrize("config", [AugmentConfig(enabled=False), None,
                                    AugmentConfig(gamma_p=0.0, bias_p=0.0, noise_p=0.0)])
def test_augmentation_can_be_switched_off(records, config):
    plain = pipeline.make_train_iterator(records, batch_size=4, seed=5, augment_config=None)
    other = pipeline.make_train_iterator(records, batch_size=4, seed=5, augment_config=config)
    _assert_same(_take(plain, 3), _take(other, 3))


def test_each_augmentation_alone_matches_its_definition(records):
    batch = pipeline.stack_train_records(records[:4])
    brain = batch["brain_mask"].astype(bool)[..., None]
    gamma = pipeline.augment_batch(batch, np.random.default_rng(1), AugmentConfig(
        gamma_p=1.0, bias_p=0.0, noise_p=0.0, gamma_range=(2.0, 2.0)))
    x = batch["image"][0][brain[0, ..., 0]]  # [N, M]
    lo, hi = x.min(axis=0), x.max(axis=0)
    expected = lo + (hi - lo) * ((x - lo) / (hi - lo)) ** 2.0
    np.testing.assert_allclose(gamma["image"][0][brain[0, ..., 0]], expected, rtol=1e-5)
    bias = pipeline.augment_batch(batch, np.random.default_rng(1), AugmentConfig(
        gamma_p=0.0, bias_p=1.0, noise_p=0.0))
    ratio = bias["image"][brain[..., 0]] / batch["image"][brain[..., 0]]
    np.testing.assert_allclose(ratio[:, 0], ratio[:, 1], rtol=1e-5)  # Same field per channel.
    assert np.all(ratio > np.exp(-0.3 * 9)) and np.all(ratio < np.exp(0.3 * 9))


def test_blur_and_ghosting_alone_match_their_definitions(records):
    """Blur: scipy's Gaussian filter at the drawn sigma, copied into the brain. Ghosting in
    closed form: scaling every n-th line of the centred spectrum (n dividing H/2) by 1 - s
    and restoring the central one is x - s (P x - mean_rows x), where P averages the n
    copies of x shifted by H/n rows (the ghosts)."""
    batch = pipeline.stack_train_records(records[:4])
    brain = batch["brain_mask"].astype(bool)
    blur = pipeline.augment_batch(batch, np.random.default_rng(2), AugmentConfig(
        gamma_p=0.0, bias_p=0.0, noise_p=0.0, blur_p=1.0, blur_sigma=(0.8, 0.8)))
    for k in range(4):
        expected = ndimage.gaussian_filter(batch["image"][k], sigma=(0.8, 0.8, 0.0),
                                           mode="reflect")
        np.testing.assert_allclose(blur["image"][k][brain[k]], expected[brain[k]], rtol=1e-5)
        np.testing.assert_array_equal(blur["image"][k][~brain[k]],
                                      batch["image"][k][~brain[k]])
    rng = np.random.default_rng(3)
    x = rng.random((12, 10, 2))
    for count, s in ((2, 0.7), (3, 1.0), (6, 0.5)):  # divisors of H / 2 = 6
        ghosts = np.mean([np.roll(x, m * 12 // count, axis=0) for m in range(count)], axis=0)
        expected = x - s * (ghosts - x.mean(axis=0, keepdims=True))
        np.testing.assert_allclose(pipeline.ghosting(x, count, 0, s), expected, atol=1e-12)
    np.testing.assert_allclose(pipeline.ghosting(x, 5, 1, 0.0), x, atol=1e-12)
    ghost = pipeline.augment_batch(batch, np.random.default_rng(4), AugmentConfig(
        gamma_p=0.0, bias_p=0.0, noise_p=0.0, ghost_p=1.0))
    assert np.mean(ghost["image"][brain] != batch["image"][brain]) > 0.9
    np.testing.assert_array_equal(ghost["image"][~brain], batch["image"][~brain])


def test_augmentation_presets_follow_each_repository():
    """Behrendt's pDDPM repository (DDPM, pDDPM) augments nothing; the cDDPM one gamma 0.5,
    bias 0.25, blur 0.25 (std up to 2 mm) and ghosting 0.5, not for the SparK stage."""
    from configs import cddpm, ddpm, pddpm
    from uadjax import train_state

    for config in (ddpm.get_config("paper"), pddpm.get_config("paper")):
        assert not AugmentConfig.from_config(config.data.augment).enabled
    config = cddpm.get_config("paper")
    aug = AugmentConfig.from_config(config.data.augment)
    assert (aug.gamma_p, aug.bias_p, aug.blur_p, aug.ghost_p, aug.noise_p) == (
        0.5, 0.25, 0.25, 0.5, 0.0)
    assert aug.blur_sigma == (0.0, 1.0)  # 2 mm at the paper's 2 mm pixels
    assert aug.gamma_range == pytest.approx((np.exp(-0.3), np.exp(0.3)))
    assert not train_state.stage_config(config, "pretrain").train.augment
    assert train_state.stage_config(config, "diffusion").train.augment


def test_eval_batches_cover_every_slice_once_in_order(records):
    batches = list(pipeline.make_eval_batches(records, batch_size=8))
    assert len(batches) == 5
    for batch in batches:
        assert batch["image"].shape == (8, H, W, M) and batch["valid"].dtype == bool
        assert batch["subject_id"].dtype == np.dtype("S64")
    valid = np.concatenate([b["valid"] for b in batches])
    index = np.concatenate([b["slice_index"] for b in batches])[valid]
    np.testing.assert_array_equal(index, np.arange(37))
    assert valid.sum() == 37 and not valid[37:].any()
    last = batches[-1]
    assert np.all(last["image"][5:] == 0) and np.all(last["slice_index"][5:] == -1)
    assert last["subject_id"][4] == b"sub-0007" and last["subject_id"][5] == b""
    np.testing.assert_array_equal(batches[1]["image"][3], records[11]["image"])


def test_pipelines_on_real_shards(tmp_path):
    _, data_dir, config, _ = prepare_tiny(tmp_path)
    train = builder.load_split(data_dir, config, "train")
    it = pipeline.make_train_iterator(train, batch_size=4, seed=0,
                                      augment_config=AugmentConfig())
    batch = next(it)
    assert batch["image"].shape == (4, 16, 20, 2)
    test = builder.load_split(data_dir, config, "test_lesion")
    batches = list(pipeline.make_eval_batches(test, batch_size=6))
    valid = np.concatenate([b["valid"] for b in batches])
    assert valid.sum() == len(test) == 16 and len(valid) == 18
    slices = np.concatenate([b["slice_index"] for b in batches])[valid]
    np.testing.assert_array_equal(slices, np.arange(16))
    assert {s for b in batches for s in b["subject_id"][b["valid"]]} == {b"sub-0006"}
