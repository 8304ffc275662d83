"""Prediction: a trained run turns NIfTI scans into anomaly maps in the scans' own space.

For each input scan `<name>.nii(.gz)` it writes, atomically,
  <name>_anomaly.nii.gz       float32 anomaly map (post-processed score)
  <name>_segmentation.nii.gz  uint8 binary map at the threshold calibrated during evaluation
  <name>_overview.png         axial slices: input, anomaly map, segmentation outline
with exactly the input's shape and affine. Inputs of any voxel size and orientation are
brought to the training grid (reorient, resample, crop/pad, normalise) with the run's own
preprocessing config, and the maps are carried back. Existing outputs are skipped, so a
batch can be resumed; a failing file is reported and the others go on. With several
processes (jax.distributed) the scans are shared out: each is written by one process, and
process 0's report counts every host's scans.

Multi-modality models take a folder of `<subject>_<modality>.nii.gz` files.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from uadjax import atomic, parallel, runs
from uadjax.data import nifti, pipeline, preprocess
from uadjax.data.schema import DataError
from uadjax.inference import postprocess
from uadjax.inference.scoring import make_batch_scorer, score_volume
from uadjax.methods import get_method
from uadjax.progress import progress_bar

NIFTI_SUFFIXES = (".nii.gz", ".nii")
OUTPUT_TAGS = ("_anomaly", "_segmentation")
OUTPUT_SUFFIXES = ("_anomaly.nii.gz", "_segmentation.nii.gz", "_overview.png")


@dataclasses.dataclass
class PredictReport:
    written: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)
    failures: list = dataclasses.field(default_factory=list)   # (path, problem)

    @property
    def scans_written(self) -> int:
        return len(self.written) // len(OUTPUT_SUFFIXES)

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        lines = [(f"predict: {self.scans_written} scan(s) written, {len(self.skipped)} skipped "
                  f"(outputs exist), {len(self.failures)} failed")]
        lines += [f"  FAILED {path}: {problem}" for path, problem in self.failures]
        return "\n".join(lines)


def stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_scans(input_path: str, modalities) -> dict[str, dict[str, Path]]:
    """name -> {modality: path}. A file is one single-modality scan; a folder holds scans
    (single modality) or `<subject>_<modality>` files (several modalities)."""
    path = Path(input_path)
    if not path.exists():
        raise DataError(path, "input not found")
    if path.is_file():
        if len(modalities) != 1:
            raise DataError(path, f"this model needs {len(modalities)} modalities "
                                  f"{list(modalities)}: pass a folder of <subject>_<modality> files")
        return {stem(path): {modalities[0]: path}}
    files = sorted(p for p in path.iterdir() if p.name.endswith(NIFTI_SUFFIXES)
                   and not any(stem(p).endswith(tag) for tag in OUTPUT_TAGS))
    if len(modalities) == 1:
        return {stem(p): {modalities[0]: p} for p in files}
    scans: dict[str, dict[str, Path]] = {}
    for p in files:
        subject, _, modality = stem(p).rpartition("_")
        if modality in modalities and subject:
            scans.setdefault(subject, {})[modality] = p
    return scans


def volume_records(images: np.ndarray, brain_mask: np.ndarray) -> list[dict]:
    """One preprocessed volume ([D, H, W, M], [D, H, W]) as the records of an evaluation
    split, slice by slice, for `pipeline.make_eval_batches`."""
    empty = np.zeros(brain_mask.shape[1:], np.uint8)
    return [{"image": images[k], "brain_mask": brain_mask[k], "seg": empty, "slice_index": k,
             "subject_id": b"scan", "kind": b"unknown"} for k in range(images.shape[0])]


@dataclasses.dataclass
class ScanMaps:
    """The maps of one scan, in the scan's own voxel space (shape and affine of its input).

    Attributes:
      anomaly: [X, Y, Z] float32 post-processed anomaly score (0 outside the brain and
        outside the slices and crop box the model sees).
      segmentation: [X, Y, Z] uint8 0/1, the anomaly map at `threshold`.
      reconstruction: [X, Y, Z, C] float32 the method's healthy reconstruction in
        normalised intensity (0..1 for most methods), or None for methods without one.
      affine: [4, 4] voxel-to-world (mm) matrix of the input.
      threshold: the segmentation threshold calibrated by the run's evaluation.
      volume: the preprocessed input on the model grid (`PreprocessedVolume`, images
        [D, H, W, M]); `grid` holds the maps there ('anomaly', 'segmentation' [D, H, W]).
    """

    anomaly: np.ndarray
    segmentation: np.ndarray
    reconstruction: np.ndarray | None
    affine: np.ndarray
    threshold: float
    volume: preprocess.PreprocessedVolume
    grid: dict


def make_scan_scorer(config, models: dict):
    """The batch scorer prediction uses for a run's networks: one device of this process,
    the run's evaluation seed (so a scan's maps do not depend on the machine)."""
    return make_batch_scorer(get_method(config.method).score_fn, models, config,
                             parallel.local_mesh(1), seed=config.eval.seed)


def score_subject(subject: nifti.SubjectVolumes, *, config, scorer, calibration,
                  with_reconstruction: bool = False) -> ScanMaps:
    """Scores one loaded scan: preprocess onto the model grid, score every slice,
    post-process, threshold, and carry the maps back to the scan's voxels."""
    volume = preprocess.preprocess_subject(subject, config.data, subject_id="scan")
    batches = pipeline.make_eval_batches(volume_records(volume.images, volume.brain_mask),
                                         batch_size=config.eval.batch_size)
    scored = score_volume(scorer, batches, subject_id="scan",
                          num_slices=volume.images.shape[0],
                          keep_reconstruction=with_reconstruction)
    pp = calibration["postprocess"]
    score = postprocess.postprocess_scores(scored.score, volume.brain_mask,
                                           erode_iterations=pp["erode_iterations"],
                                           median_size=pp["median_size"])
    segmentation = postprocess.binarize(score, calibration["threshold"],
                                        min_component_size=pp["min_component_size"])
    geometry = volume.geometry
    reconstruction = None
    if with_reconstruction and scored.reconstruction is not None:
        reconstruction = np.stack(
            [preprocess.to_native(scored.reconstruction[..., c], geometry, order=1)
             for c in range(scored.reconstruction.shape[-1])], axis=-1).astype(np.float32)
    return ScanMaps(
        anomaly=preprocess.to_native(score.astype(np.float32), geometry, order=1),
        segmentation=preprocess.to_native(segmentation.astype(np.uint8), geometry, order=0),
        reconstruction=reconstruction, affine=np.asarray(geometry.original_affine),
        threshold=float(calibration["threshold"]), volume=volume,
        grid={"anomaly": score, "segmentation": segmentation})


def predict_scan(files: dict[str, Path], out_prefix: Path, *, config, scorer, calibration,
                 brain_mask: str | None = None) -> list[Path]:
    """Scores one scan and writes its maps next to `out_prefix`; returns the paths."""

    subject_files = nifti.SubjectFiles(
        subject_id=out_prefix.name, split="", kind="unknown", lesion_volume_ml=0.0,
        images={m: files[m] for m in config.data.modalities}, seg=None,
        brainmask=Path(brain_mask) if brain_mask else None)
    subject = nifti.load_subject(subject_files, atol=config.data.affine_atol)
    maps = score_subject(subject, config=config, scorer=scorer, calibration=calibration)
    anomaly_path, seg_path, png_path = output_paths(out_prefix)
    written, current = [], anomaly_path
    try:  # the three outputs of a scan appear together or not at all
        nifti.save_nifti_atomic(anomaly_path, maps.anomaly, maps.affine)
        written.append(anomaly_path)
        current = seg_path
        nifti.save_nifti_atomic(seg_path, maps.segmentation, maps.affine)
        written.append(seg_path)
        current = png_path
        save_overview(png_path, maps.volume.images[..., 0], maps.grid["anomaly"],
                      maps.grid["segmentation"], threshold=maps.threshold)
    except BaseException as err:
        for path in written:
            path.unlink(missing_ok=True)
        if isinstance(err, OSError) and not err.filename:  # gzip/zlib write errors
            err.filename = str(current)
        raise
    return [anomaly_path, seg_path, png_path]


def output_paths(out_prefix: Path) -> list[Path]:
    """The anomaly map, segmentation and overview written for `out_prefix` = <out>/<name>."""
    return [out_prefix.with_name(out_prefix.name + s) for s in OUTPUT_SUFFIXES]


def save_overview(path: Path, image, score, segmentation, *, threshold: float) -> None:
    """Six axial slices through the brain: input with segmentation outline, anomaly map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = image.shape[0]
    picks = np.linspace(depth * 0.2, depth * 0.8, 6).astype(int)
    fig, axes = plt.subplots(2, len(picks), figsize=(2 * len(picks), 4.2), squeeze=False)
    vmax = max(float(np.percentile(score, 99.9)), threshold, 1e-6)
    for c, k in enumerate(picks):
        axes[0, c].imshow(np.rot90(image[k]), cmap="gray", vmin=0, vmax=1)
        if segmentation[k].any():
            axes[0, c].contour(np.rot90(segmentation[k]), levels=[0.5], colors="r",
                               linewidths=0.7)
        axes[1, c].imshow(np.rot90(score[k]), cmap="inferno", vmin=0, vmax=vmax)
        axes[0, c].set_title(f"z={k}", fontsize=7)
        for r in range(2):
            axes[r, c].axis("off")
    fig.suptitle(f"input + segmentation (red) / anomaly map (threshold {threshold:.3g})",
                 fontsize=8)
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def predict_paths(workdir: str, input_path: str, output_dir: str, *,
                  brain_mask: str | None = None, overwrite: bool = False,
                  progress: bool = True) -> PredictReport:
    """Runs `predict_scan` on one file or every scan of a folder."""

    config, models, calibration = runs.load_run(workdir)
    scans = find_scans(input_path, tuple(config.data.modalities))
    if not scans:
        raise DataError(input_path, f"no NIfTI scans ({' or '.join(NIFTI_SUFFIXES)}) of the "
                                    f"modalities {list(config.data.modalities)} found")
    out = Path(output_dir)
    atomic.check_writable(out)
    scorer = make_scan_scorer(config, models)
    report = PredictReport()
    # With several processes each takes every process_count-th scan: each scan's outputs
    # are written by exactly one of them.
    mine = parallel.share(sorted(scans.items()))
    with parallel.together("uadjax: predict scans done"):  # one host failing stops them all
        for name, files in progress_bar(mine, disable=not progress, desc="predict"):
            _predict_one(name, files, out, report, config=config, scorer=scorer,
                         calibration=calibration, brain_mask=brain_mask, overwrite=overwrite,
                         input_path=input_path, total=len(mine))
    return gather_reports(report) if jax.process_count() > 1 else report


def _predict_one(name, files, out: Path, report: PredictReport, *, config, scorer, calibration,
                 brain_mask, overwrite, input_path, total) -> None:
    """One scan of `predict_paths` into `report`: written, skipped or failed (an output
    folder that takes no more files raises OutputError)."""
    prefix = out / name
    if not overwrite and all(t.exists() for t in output_paths(prefix)):
        report.skipped.append(name)
        return
    missing = [m for m in config.data.modalities if m not in files]
    if missing:
        report.failures.append((str(Path(input_path) / name), f"missing modalities {missing}"))
        return
    try:
        report.written.extend(predict_scan(files, prefix, config=config, scorer=scorer,
                                           calibration=calibration, brain_mask=brain_mask))
    except OSError as err:
        if atomic.is_write_error(err) and _under(err.filename, out):
            raise OutputError(err, report, total) from err
        report.failures.append((str(next(iter(files.values()))), str(err)))
    except (DataError, ValueError) as err:
        report.failures.append((str(next(iter(files.values()))), str(err)))


def gather_reports(report: PredictReport) -> PredictReport:
    """Several processes: process 0 returns every host's reports merged (all the scans),
    the others their own (gathered over the jax.distributed collectives: no shared folder
    needed)."""
    parts = parallel.gather_json({"written": [str(p) for p in report.written],
                                  "skipped": report.skipped,
                                  "failures": [list(f) for f in report.failures]})
    if jax.process_index() != 0:
        return report
    merged = PredictReport()
    for part in parts:
        merged.written.extend(Path(w) for w in part["written"])
        merged.skipped.extend(part["skipped"])
        merged.failures.extend(tuple(f) for f in part["failures"])
    return merged


class OutputError(OSError):
    """The output folder stopped taking files (disk full, read-only, permissions): the
    batch stops, since every further scan would fail the same way."""

    def __init__(self, err: OSError, report: PredictReport, total: int):
        """`total`: the scans of this process (its share when there are several)."""
        done = report.scans_written + len(report.skipped)
        super().__init__(err.errno, f"cannot write {err.filename}: {err.strerror}. "
                                    f"{done} of {total} scans are complete; no partial outputs "
                                    "were left. Rerun the same command once there is space "
                                    "(or permission): finished scans are skipped.")
        self.filename = err.filename

    def __str__(self) -> str:
        return self.strerror


def _under(path, folder: Path) -> bool:
    if not path:
        return False
    return Path(path).resolve().is_relative_to(folder.resolve())
