"""The Python API: everything the command line does, from a notebook or another pipeline.

    import uadjax
    run = uadjax.load_run("runs/main")          # a trained and evaluated run folder
    maps = run.score(nib.load("scan.nii.gz"))   # arrays in the scan's own voxel space
    out = run.score_slices(batch, overrides={"ddpm.test_timesteps": (250,)})

`train`, `evaluate`, `prepare`, `phantom`, `predict` and `run_all` are the jobs the CLI runs
(`uadjax/main.py` calls these functions), on ml_collections configs built in Python
(`configs.ddpm.get_config("cpu")`, fields changed as needed). Errors are the exceptions the
CLI turns into one-line messages: `DataError` names the input file (or array) and the
problem, `CheckpointError` the run folder. See docs/api.md.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ml_collections
import nibabel as nib
import numpy as np

from uadjax import jobs, parallel, runs
from uadjax import prediction as predict_lib
from uadjax.checkpointing import CheckpointError
from uadjax.data import nifti
from uadjax.data.schema import DataError
from uadjax.inference.scoring import make_batch_scorer
from uadjax.methods import Method, get_method
from uadjax.prediction import PredictReport, ScanMaps
from uadjax.results import EvaluationResults

__all__ = [
    "CheckpointError", "DataError", "EvaluationResults", "PredictReport", "Run", "ScanMaps",
    "evaluate", "load_run", "phantom", "predict", "prepare", "run_all", "train",
]

# Config sections a test-time override may not touch: they define the networks and the
# data they were trained on.
FIXED_SECTIONS = ("method", "seed", "data", "model", "train", "stage_train",
                  "stage_statistics", "stage_workdirs", "encoder", "vqvae")


@dataclasses.dataclass
class Run:
    """A trained and evaluated run: its config, restored networks and calibration.

    Attributes:
      workdir: the run folder.
      config: the config it was trained with (`<workdir>/config.json`).
      models: stage name -> restored (EMA) networks of each stage the score reads.
      calibration: the evaluation's `calibration.json`: 'threshold' (the segmentation
        threshold selected on the lesion-validation volumes) and 'postprocess'.
    """

    workdir: str
    config: ml_collections.ConfigDict
    models: dict
    calibration: dict
    _scorers: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def method(self) -> Method:
        return get_method(self.config.method)

    @property
    def threshold(self) -> float:
        return float(self.calibration["threshold"])

    def score(self, volume, affine=None, brain_mask=None) -> ScanMaps:
        """Scores one scan held in memory, exactly as `predict` scores a file.

        Args:
          volume: a nibabel image, a NumPy array [X, Y, Z] (one-modality methods) or
            [X, Y, Z, M] (the run's modalities in `config.data.modalities` order), or a dict
            modality -> image or array.
          affine: [4, 4] voxel-to-world matrix in mm for arrays (default: a nibabel image's
            own; for a bare array the identity, i.e. 1 mm voxels).
          brain_mask: optional [X, Y, Z] mask (array or image) on the same grid; without one
            the non-zero voxels are the brain, as in `predict`.
        Returns:
          `ScanMaps`: anomaly [X, Y, Z], segmentation [X, Y, Z], reconstruction [X, Y, Z, C]
          in the input's voxel space.
        Raises:
          DataError: a missing modality, arrays of other shapes, NaN/Inf, a bad affine.
        """
        subject = self._subject(volume, affine, brain_mask)
        scorer = self._scorer(())
        return predict_lib.score_subject(subject, config=self.config, scorer=scorer,
                                         calibration=self.calibration,
                                         with_reconstruction=True)

    def score_slices(self, batch: dict, *, overrides: dict | None = None,
                     batch_index: int = 0) -> dict:
        """The jitted batch scorer, sharded over this process's devices, on preprocessed
        slices.

        Args:
          batch: 'image' [B, H, W, M] in the model's normalised range (as the shards hold
            them), optional 'brain_mask' [B, H, W] (default: everywhere).
          overrides: test-time config settings, dotted keys (e.g. {'diffusion.test_timesteps':
            (250,), 'eval.batch_size': 8}); each distinct set compiles once. The sections
            that define the networks and data (`FIXED_SECTIONS`) cannot be overridden.
          batch_index: the batch's key is fold_in(key(eval.seed), batch_index). (An
            evaluation keys each volume apart: its i-th batch gets fold_in(volume_key(
            key(eval.seed), subject_id), i), `inference.scoring.volume_key`.)
        Returns:
          The method's outputs as host arrays: 'score' [B, H, W], 'reconstruction'
          [B, H, W, C] where the method has one.
        """
        image = np.asarray(batch["image"], np.float32)
        n = image.shape[0]
        mask = np.asarray(batch.get("brain_mask", np.ones(image.shape[:3], np.uint8)))
        devices = parallel.local_mesh().size
        pad = -n % devices
        host = {"image": np.pad(image, [(0, pad)] + [(0, 0)] * 3),
                "brain_mask": np.pad(mask.astype(np.uint8), [(0, pad), (0, 0), (0, 0)]),
                "seg": np.zeros((n + pad, *image.shape[1:3]), np.uint8)}
        key = tuple(sorted((overrides or {}).items(), key=lambda kv: kv[0]))
        out = self._scorer(key, sharded=True)(host, batch_index)
        return {k: np.asarray(v)[:n] for k, v in out.items()}

    def _scorer(self, overrides: tuple, *, sharded: bool = False):
        cache_key = (overrides, sharded)
        if cache_key not in self._scorers:
            config = with_overrides(self.config, dict(overrides))
            if sharded:
                self._scorers[cache_key] = make_batch_scorer(
                    self.method.score_fn, self.models, config, parallel.local_mesh(),
                    seed=config.eval.seed)
            else:
                self._scorers[cache_key] = predict_lib.make_scan_scorer(config, self.models)
        return self._scorers[cache_key]

    def _subject(self, volume, affine, brain_mask) -> nifti.SubjectVolumes:
        modalities = tuple(self.config.data.modalities)
        if isinstance(volume, dict):
            missing = [m for m in modalities if m not in volume]
            if missing:
                raise DataError("<array>", f"missing modalities {missing}; this run reads "
                                           f"{list(modalities)}")
            parts = {m: volume[m] for m in modalities}
        else:
            data = _array(volume)
            if data.ndim == 4 and data.shape[-1] == len(modalities):
                parts = {m: _with_affine(volume, data[..., i]) for i, m in
                         enumerate(modalities)}
            elif len(modalities) == 1:
                parts = {modalities[0]: volume}
            else:
                raise DataError("<array>", f"this run reads {len(modalities)} modalities "
                                           f"{list(modalities)}: give [X, Y, Z, "
                                           f"{len(modalities)}] or a dict, not shape "
                                           f"{data.shape}")
        images = {}
        for m, part in parts.items():
            part_affine = _affine(part, affine)
            images[m] = nifti.array_volume(f"<{m} array>", _array(part), part_affine)
        ref = next(iter(images.values()))
        for vol in list(images.values())[1:]:
            nifti.check_same_grid(ref, vol, atol=self.config.data.affine_atol)
        mask = None
        if brain_mask is not None:
            mask = nifti.array_volume("<brain_mask array>", _array(brain_mask),
                                      _affine(brain_mask, ref.affine), label=True)
            nifti.check_same_grid(ref, mask, atol=self.config.data.affine_atol)
            nifti.check_brain_mask(mask)
        return nifti.SubjectVolumes(images=images, seg=None, brainmask=mask)


def _array(value) -> np.ndarray:
    return np.asarray(value.dataobj) if isinstance(value, nib.spatialimages.SpatialImage) \
        else np.asarray(value)


def _affine(value, affine) -> np.ndarray:
    if isinstance(value, nib.spatialimages.SpatialImage):
        return value.affine if affine is None else np.asarray(affine)
    return np.eye(4) if affine is None else np.asarray(affine)


def _with_affine(volume, data):
    """A channel of a 4D input, keeping a nibabel image's affine."""
    if isinstance(volume, nib.spatialimages.SpatialImage):
        return nib.Nifti1Image(np.ascontiguousarray(data), volume.affine)
    return data


def with_overrides(config, overrides: dict) -> ml_collections.ConfigDict:
    """`config` with dotted-key test-time `overrides` applied (a copy).

    Raises:
      ValueError: a key the config lacks, or one in `FIXED_SECTIONS`.
    """
    if not overrides:
        return config
    config = config.copy_and_resolve_references()
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        if (parents or [leaf])[0] in FIXED_SECTIONS:
            raise ValueError(f"override {dotted!r}: {(parents or [leaf])[0]} defines the "
                             "trained networks or their data, not a test-time setting")
        node = config
        for name in parents:
            if name not in node:
                raise ValueError(f"override {dotted!r}: the config has no section {name!r}")
            node = node[name]
        if leaf not in node:
            raise ValueError(f"override {dotted!r}: the config has no key {leaf!r}")
        node[leaf] = value
    return config


def load_run(workdir: str) -> Run:
    """Loads a trained and evaluated run folder (`train` then `evaluate`).

    Raises:
      FileNotFoundError: not a run folder, or not evaluated yet (no calibration).
      RuntimeError: evaluated without lesion-validation volumes (no threshold).
      CheckpointError: a stage's checkpoints cannot be restored.
    """
    config, models, calibration = runs.load_run(workdir)
    return Run(workdir=str(workdir), config=config, models=models, calibration=calibration)


def phantom(config, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Generates (or finds) the built-in phantom of `config.data`; returns its folder."""
    return jobs.ensure_phantom(config, overwrite=overwrite, progress=progress)


def prepare(config, *, progress: bool = True) -> dict:
    """Prepares the slice shards of `config.data` (cached); returns the volumes index."""
    return jobs.ensure_shards(config, progress=progress)


def train(config, workdir: str, *, stages=None, progress: bool = True) -> bool:
    """Trains (or resumes) every stage, or the named `stages`; False if a stage stopped
    early (SIGTERM): rerun to resume."""
    return jobs.train(config, workdir, stages=stages, progress=progress)


def evaluate(config, workdir: str, *, out_dir: str | None = None,
             progress: bool = True) -> EvaluationResults:
    """Scores the evaluation splits, calibrates, measures, writes `<workdir>/eval` (or
    `out_dir`) and returns the results."""
    summary = jobs.evaluate(config, workdir, out_dir=out_dir, progress=progress)
    return EvaluationResults.from_json(summary, str(Path(out_dir or Path(workdir) / "eval")))


def predict(workdir: str, input_path: str, output_dir: str, *, brain_mask: str | None = None,
            overwrite: bool = False, progress: bool = True) -> PredictReport:
    """Writes the anomaly map, segmentation and overview of every scan of `input_path` (a
    file or a folder) to `output_dir`; a failing scan is reported and the others go on."""
    return predict_lib.predict_paths(workdir, input_path, output_dir, brain_mask=brain_mask,
                                     overwrite=overwrite, progress=progress)


def run_all(config, workdir: str, *, progress: bool = True) -> EvaluationResults | None:
    """The main job: phantom, shards, training, evaluation; None if training stopped early."""
    summary = jobs.run_all(config, workdir, progress=progress)
    return EvaluationResults.from_json(summary) if summary else None
