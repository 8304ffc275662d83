"""The jobs behind the command line and `uadjax.api`: phantom, shards, train, evaluate, run
(prediction is `uadjax.prediction`).

Each job takes the run's ConfigDict; paths in `config.data` are relative to the current
directory unless absolute. Every job is idempotent: finished work (phantom, shards, trained
stages) is found and reused, so rerunning a killed job resumes it.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import jax

from uadjax import parallel
from uadjax.data import builder, pipeline, schema
from uadjax.trainer import TrainData


def phantom_dir(config) -> Path:
    d = config.data
    return Path(d.phantom_dir) / f"{d.phantom_variant}-seed{d.phantom_seed}"


def ensure_phantom(config, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Generates the built-in phantom if `config.data.dataset_dir` is unset (cached)."""
    if config.data.dataset_dir:
        return Path(config.data.dataset_dir)
    from configs import phantom as phantom_configs
    from uadjax.data import phantom

    out = phantom_dir(config)
    start = time.perf_counter()
    # The folder is our own cache: a phantom made with another config, seed or generator
    # version is replaced.
    phantom_config = phantom_configs.get_config(config.data.phantom_variant)
    overwrite = overwrite or phantom.is_stale_cache(out, phantom_config,
                                                    config.data.phantom_seed)
    generated = overwrite or not (out / "manifest.json").is_file()
    phantom.generate_dataset(out, phantom_config, seed=config.data.phantom_seed,
                             progress=progress, overwrite=overwrite)
    if generated:
        print(f"phantom: {out} ({time.perf_counter() - start:.1f} s)")
    return out


def dataset_dir(config) -> Path:
    return Path(config.data.dataset_dir) if config.data.dataset_dir else phantom_dir(config)


def ensure_shards(config, *, progress: bool = True) -> dict:
    """Prepares the slice shards for `config.data` unless they exist for the same dataset.

    Returns the volumes index (`volumes.json`). Subjects that fail are reported and skipped;
    preparation stops only if no training subject is left. With several processes,
    process 0 prepares first and the others wait for it (on a shared file system they then
    find its shards; hosts with their own disks prepare their own copy).
    """
    if jax.process_count() == 1:
        return _ensure_shards(config, progress=progress)
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        index = _ensure_shards(config, progress=progress)
        multihost_utils.sync_global_devices("uadjax: shards prepared")
        return index
    multihost_utils.sync_global_devices("uadjax: shards prepared")
    return _ensure_shards(config, progress=False)


def _ensure_shards(config, *, progress: bool) -> dict:
    source = dataset_dir(config).resolve()
    if not config.data.dataset_dir or not (source / "manifest.json").is_file():
        # The built-in phantom is checked every time: a cached one made with another
        # config, seed or generator version is regenerated (the shards follow its mtime).
        ensure_phantom(config, progress=progress)
    try:
        index = builder.load_volumes_index(config.data.data_dir, config.data)
        prepared = builder.builder_dir(config.data.data_dir, config.data) / "volumes.json"
        fresh = prepared.stat().st_mtime >= (source / "manifest.json").stat().st_mtime
        if index.get("dataset_dir") == str(source) and fresh:
            return index
    except FileNotFoundError:
        pass
    start = time.perf_counter()
    report = builder.prepare_dataset(source, config.data.data_dir, config.data,
                                     progress=progress)
    print(report.summary())
    print(f"shards: {time.perf_counter() - start:.1f} s")
    if report.failures:
        print(f"WARNING: {len(report.failures)} subject(s) skipped (listed above)")
    if not report.num_records.get(schema.TRAIN):
        raise schema.DataError(Path(source) / "manifest.json", "no training subject could be "
                               "prepared (the failures are listed above)")
    return builder.load_volumes_index(config.data.data_dir, config.data)


def make_train_data(config, stage) -> TrainData:
    """Training batches (this process's share) and a healthy-validation batch factory.

    A stage may read another split (`config.train.data_split`, e.g. 'val_healthy' for a
    calibration stage) and switch augmentation off (`config.train.augment = False`); both
    default to the training split with `config.data.augment`.
    """
    ensure_shards(config)
    identity = data_identity(config)
    split = config.train.data_split
    train_source = builder.load_split(config.data.data_dir, config.data, split)
    augment = config.data.augment if config.train.augment else None
    iterator = pipeline.make_train_iterator(
        train_source, batch_size=parallel.local_batch_size(config.train.batch_size),
        seed=config.seed, augment_config=augment,
        process_index=jax.process_index(), process_count=jax.process_count())
    try:
        val_source = builder.load_split(config.data.data_dir, config.data, schema.VAL_HEALTHY)
    except KeyError:
        return TrainData(train_iter=iterator, identity=identity)
    val_batches = pipeline.make_eval_batches(
        val_source, batch_size=parallel.local_batch_size(config.train.batch_size))
    num = min(int(config.train.val_batches), len(val_batches))
    stride = max(len(val_batches) // max(num, 1), 1)

    def val_iter():
        return (val_batches[i * stride] for i in range(num))

    return TrainData(train_iter=iterator, val_batches=val_iter, identity=identity)


def data_identity(config) -> dict | None:
    """{'dataset_dir', 'manifest_sha256'} of the dataset a run trains on (None without a
    manifest): the phantom's manifest carries its generator version, config and seed."""
    manifest = dataset_dir(config).resolve() / "manifest.json"
    if not manifest.is_file():
        return None
    return {"dataset_dir": str(manifest.parent),
            "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()}


def train(config, workdir: str, *, stages=None, progress: bool = True) -> bool:
    """Trains the configured stages; False if a stage stopped early (SIGTERM)."""
    from uadjax import trainer as train_lib

    ensure_shards(config, progress=progress)
    return train_lib.train(config, workdir, make_data=make_train_data, stages=stages,
                           progress=progress)


def evaluate(config, workdir: str, *, out_dir: str | None = None, progress: bool = True) -> dict:
    from uadjax import evaluation as evaluate_lib

    ensure_shards(config, progress=progress)
    return evaluate_lib.run_evaluation(config, workdir, out_dir=out_dir, progress=progress)


def run_all(config, workdir: str, *, progress: bool = True) -> dict:
    """The main job: phantom -> shards -> train -> evaluate -> report."""
    start = time.perf_counter()
    ensure_shards(config, progress=progress)
    if not train(config, workdir, progress=progress):
        print("training stopped before its last step; rerun the same command to resume")
        return {}
    results = evaluate(config, workdir, progress=progress)
    print(f"total: {time.perf_counter() - start:.0f} s; report: "
          f"{os.path.join(workdir, 'eval', 'report.md')}")
    return results
