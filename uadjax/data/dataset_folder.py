"""Public datasets (in their own layouts) -> one dataset folder in the uadjax format.

    sources (BraTS, IXI, ... folders) --discover--> subjects --split--> checked, optionally
    registered / bias-corrected / skull-stripped NIfTIs --> <out>/manifest.json

The dataset folder (`docs/CONTRACTS.md`) then trains and evaluates like the phantom: its
shards are built by `uadjax.data.builder` with a `configs/data.py` variant. Files that need
no change are not copied: the manifest names them by absolute path. A subject is written
only when it is complete: its derived files first (atomically), then its record
`<out>/<id>/<id>.json`, which a rerun reuses (so an interrupted preparation resumes), and
the manifest last (with `splits.csv`, one row per subject). Failures are collected per subject and the others go on.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from uadjax import atomic
from uadjax.data import datasets, nifti
from uadjax.data.schema import (
    HEALTHY,
    TEST_HEALTHY,
    TEST_LESION,
    TRAIN,
    VAL_HEALTHY,
    VAL_LESION,
    DataError,
)
from uadjax.progress import progress_bar

MANIFEST_VERSION = 1
SPLITS_CSV = "splits.csv"
HEALTHY_SPLITS = (TRAIN, VAL_HEALTHY, TEST_HEALTHY)
LESION_SPLITS = (TRAIN, VAL_LESION, TEST_LESION)  # train: lesion-free slices only (MMCCD)


@dataclass(frozen=True)
class Source:
    """One dataset to read: its adapter and the folder the user downloaded it to."""

    spec: datasets.DatasetSpec
    root: Path
    split_files: dict = field(default_factory=dict)  # split -> authors' list of subjects


@dataclass
class FolderReport:
    """What `build_dataset_folder` did."""

    out_dir: Path
    num_subjects: dict = field(default_factory=dict)  # (source, split) -> count
    failures: list = field(default_factory=list)  # [{"subject", "path", "problem"}]
    warnings: list = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"dataset folder {self.out_dir} ({self.seconds:.1f} s)"]
        for (source, split), n in sorted(self.num_subjects.items()):
            lines.append(f"  {source} {split}: {n} subjects")
        lines += [f"  warning: {w}" for w in self.warnings]
        lines += [f"  FAILED {f['subject']}: {f['path']}: {f['problem']}" for f in self.failures]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- checks


def check_header(path: Path) -> tuple:
    """Shape and affine from the header alone (no voxel data read).

    Returns:
      (shape [3], affine [4, 4]); a 4D file with one volume counts as 3D.

    Raises:
      DataError: as `nifti.open_nifti`: missing, empty or unreadable file, not 3D (4D with
        several volumes, 2D, 5D), a zero-sized axis, an absurd voxel size, or an image too
        large for memory.
    """
    _, shape, affine = nifti.open_nifti(path)
    return shape, affine


def binary_lesion(data: np.ndarray, spec: datasets.DatasetSpec, path) -> np.ndarray:
    """Label map -> uint8 lesion mask, checking the labels against the dataset's.

    Raises:
      DataError: non-integer values (an interpolated label map), negative values, or
        values the dataset does not define (listed in the message).
    """
    data = np.asarray(data)
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)):
            raise DataError(path, "label map holds NaN/Inf values")
        if np.any(data != np.round(data)):
            raise DataError(path, "label map holds non-integer values (resampled with "
                                  "linear interpolation?); labels must be whole numbers")
    values = np.unique(data)
    if values.size and values[0] < 0:
        raise DataError(path, f"negative label values {values[values < 0][:5].tolist()}")
    if spec.labels is not None:
        unexpected = sorted(set(values.astype(np.int64).tolist()) - set(spec.labels))
        if unexpected:
            raise DataError(path, f"unexpected label values {unexpected[:10]} ({spec.name} "
                                  f"labels are {list(spec.labels)})")
    if spec.lesion_labels is None:
        return (data > 0).astype(np.uint8)
    return np.isin(data, spec.lesion_labels).astype(np.uint8)


def _voxel_ml(affine: np.ndarray) -> float:
    return float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0


# ----------------------------------------------------------------------------- one subject


@dataclass(frozen=True)
class SubjectTask:
    """Everything one worker needs for one subject (picklable)."""

    spec: datasets.DatasetSpec
    raw: datasets.RawSubject
    subject_id: str
    split: str
    modalities: tuple
    spatial: object  # spatial.SpatialOptions or None
    out_dir: Path
    overwrite: bool


def _record_path(task: SubjectTask) -> Path:
    return task.out_dir / task.subject_id / f"{task.subject_id}.json"


def _resolve(task: SubjectTask) -> dict:
    """key -> input path for the requested modalities, seg and brain mask."""
    raw, spec = task.raw, task.spec
    for key, problem in raw.problems.items():
        if key in task.modalities or key in (datasets.SEG, datasets.BRAINMASK):
            raise DataError(task.out_dir / task.subject_id, problem)
    files = {}
    for mod in task.modalities:
        if mod not in raw.files:
            raise DataError(raw.files[spec.id_key].parent,
                            f"subject {raw.raw_id} has no '{mod}' file "
                            f"(expected {spec.files[mod][0]!r})")
        files[mod] = raw.files[mod]
    if spec.kind != HEALTHY and datasets.SEG not in raw.files:
        raise DataError(raw.files[spec.id_key].parent,
                        f"subject {raw.raw_id} has no segmentation "
                        f"(expected {spec.files[datasets.SEG][0]!r})")
    for key in (datasets.SEG, datasets.BRAINMASK):
        if key in raw.files:
            files[key] = raw.files[key]
    return files


def _needs_spatial(options) -> bool:
    return options is not None and any(
        (options.register, options.n4, options.atlas_mask, options.skull_strip))


def _derived(task: SubjectTask, key: str) -> Path:
    return task.out_dir / task.subject_id / f"{task.subject_id}_{key}.nii.gz"


def _process_in_place(task: SubjectTask, files: dict) -> dict:
    """No spatial step: check headers and labels; copy nothing but a relabelled seg."""
    ref_key = task.modalities[0]
    ref_shape, ref_affine = check_header(files[ref_key])
    out = {}
    for key, path in files.items():
        shape, affine = check_header(path) if key != ref_key else (ref_shape, ref_affine)
        if shape != ref_shape or not np.allclose(affine, ref_affine, atol=nifti.AFFINE_ATOL,
                                                  rtol=0):
            raise DataError(path, f"{key} is on another voxel grid than {ref_key} "
                                  f"(shape {shape} vs {ref_shape}); use --register")
        out[key] = str(path.resolve())
    lesion_ml = 0.0
    if datasets.SEG in files:
        seg = nifti.load_nifti(files[datasets.SEG])
        lesion = binary_lesion(seg.data, task.spec, seg.path)
        lesion_ml = float(lesion.sum()) * _voxel_ml(seg.affine)
        if not np.array_equal(lesion, seg.data):  # other labels than 0/1: write the mask
            path = _derived(task, datasets.SEG)
            nifti.save_nifti_atomic(path, lesion, seg.affine, seg.header)
            out[datasets.SEG] = str(path.relative_to(task.out_dir))
    return {"files": out, "lesion_volume_ml": lesion_ml}


def _process_spatial(task: SubjectTask, files: dict) -> dict:
    """Registration / N4 / atlas mask / skull strip; every output written to the folder."""
    from uadjax.data import spatial  # SimpleITK only when these steps are asked for.

    images = {mod: nifti.load_nifti(files[mod]) for mod in task.modalities}
    seg = None
    if datasets.SEG in files:
        raw = nifti.load_nifti(files[datasets.SEG])
        seg = dataclasses.replace(raw, data=binary_lesion(raw.data, task.spec, raw.path))
    mask = nifti.load_label(files[datasets.BRAINMASK]) if datasets.BRAINMASK in files else None
    outputs = spatial.standardise_subject(images, seg, mask, task.spatial)
    out, lesion_ml = {}, 0.0
    for key, (data, affine) in outputs.items():
        path = _derived(task, key)
        nifti.save_nifti_atomic(path, data, affine)
        out[key] = str(path.relative_to(task.out_dir))
        if key == datasets.SEG:
            lesion_ml = float(np.count_nonzero(data)) * _voxel_ml(affine)
    return {"files": out, "lesion_volume_ml": lesion_ml}


def process_subject(task: SubjectTask) -> dict:
    """Checks (and transforms) one subject; returns its manifest entry.

    Raises:
      DataError: anything wrong with this subject's files.
    """
    record = _record_path(task)
    if record.is_file() and not task.overwrite:
        entry = json.loads(record.read_text())
        if (entry.get("split") == task.split and entry.get("spatial") == _options_dict(task)
                and entry.get("modalities") == list(task.modalities)):
            return entry
    files = _resolve(task)
    if _needs_spatial(task.spatial):
        result = _process_spatial(task, files)
    else:
        result = _process_in_place(task, files)
    entry = {"id": task.subject_id, "split": task.split, "kind": task.spec.kind,
             "source": task.spec.name, "raw_id": task.raw.raw_id,
             "lesion_volume_ml": round(result["lesion_volume_ml"], 4),
             "files": result["files"], "spatial": _options_dict(task),
             "modalities": list(task.modalities)}
    atomic.write_json(record, entry)  # last: the subject is complete
    return entry


def _options_dict(task: SubjectTask):
    if not _needs_spatial(task.spatial):
        return None
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(task.spatial).items()}


def _run_task(task: SubjectTask):
    """Worker entry: (entry, None) or (None, failure)."""
    try:
        return process_subject(task), None
    except DataError as err:
        return None, {"subject": task.subject_id, "path": err.path, "problem": err.problem}
    except Exception as err:  # noqa: BLE001 - one subject's crash must not stop the rest.
        return None, {"subject": task.subject_id, "path": str(task.raw.files.get(
            task.spec.id_key, task.out_dir)), "problem": f"{type(err).__name__}: {err}"}


# ----------------------------------------------------------------------------- the folder


def plan_subjects(sources: list, modalities: tuple, *, seed: int, spatial, out_dir: Path,
                  overwrite: bool = False) -> tuple[list, list, list]:
    """Discovers every source, assigns splits, names subjects.

    Returns:
      (tasks, failures, warnings); duplicate subject ids fail (the first one is kept).

    Raises:
      DataError: a source folder is missing or empty, a split file is missing, or a
        modality is not one the dataset has.
    """
    tasks, failures, warnings, seen = [], [], [], {}
    for source in sources:
        spec = source.spec
        missing = [m for m in modalities if m not in spec.modalities]
        if missing:
            raise DataError(source.root, f"{spec.name} has no {missing} images (it has "
                                         f"{list(spec.modalities)})")
        subjects = datasets.discover(spec, source.root)
        raw_ids = [s.raw_id for s in subjects]
        fixed, split_warnings = datasets.read_split_files(source.split_files, raw_ids)
        warnings += [f"{spec.name}: {w}" for w in split_warnings]
        allowed = HEALTHY_SPLITS if spec.kind == HEALTHY else LESION_SPLITS
        for split in {*spec.split_sizes, *source.split_files}:
            if split not in allowed:
                raise DataError(source.root, f"{spec.name} ({spec.kind}) cannot fill split "
                                             f"{split!r} (allowed: {list(allowed)})")
        if source.split_files and len(fixed) < len(raw_ids):
            warnings.append(f"{spec.name}: {len(raw_ids) - len(fixed)} subjects are in no "
                            "split file; they are split by the default sizes")
        splits = datasets.assign_splits(raw_ids, spec.split_sizes, seed=seed, fixed=fixed)
        for raw in subjects:
            sid = datasets.subject_id(spec.name, raw.raw_id)
            if sid in seen:
                failures.append({"subject": sid, "path": str(raw.files[spec.id_key]),
                                 "problem": f"duplicate subject id (also {seen[sid]})"})
                continue
            seen[sid] = str(raw.files[spec.id_key])
            tasks.append(SubjectTask(spec=spec, raw=raw, subject_id=sid, split=splits[raw.raw_id],
                                     modalities=tuple(modalities), spatial=spatial,
                                     out_dir=out_dir, overwrite=overwrite))
    return tasks, failures, warnings


def build_dataset_folder(sources: list, out_dir, *, modalities, spatial=None, seed: int = 0,
                         name: str = "", jobs: int = 1, overwrite: bool = False,
                         progress: bool = True, provenance: dict | None = None) -> FolderReport:
    """Writes `<out_dir>/manifest.json` (and derived NIfTIs) for one or more sources.

    Args:
      sources: `Source`s; subject ids become '<dataset>-<raw id>'.
      out_dir: the dataset folder to write (created; earlier subjects are reused).
      modalities: channel order, e.g. ('t2',); every source must have them.
      spatial: `spatial.SpatialOptions` or None (no registration, N4 or masking).
      seed: split seed.
      name: dataset name (default: the source names joined by '_').
      jobs: worker processes (registration and N4 take seconds per subject).
      overwrite: redo subjects already written.
      progress: tqdm bar.
      provenance: extra facts for the manifest (e.g. the preset).

    Returns:
      The `FolderReport`.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks, failures, warnings = plan_subjects(sources, tuple(modalities), seed=seed,
                                              spatial=spatial, out_dir=out_dir,
                                              overwrite=overwrite)
    entries = []
    bar = progress_bar(total=len(tasks), desc=f"dataset {out_dir.name}", disable=not progress)
    if jobs > 1 and len(tasks) > 1:
        # spawn, not fork: the parent may have started JAX's threads (forking them is unsafe).
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            for entry, failure in pool.map(_run_task, tasks, chunksize=1):
                (entries.append(entry) if entry else failures.append(failure))
                bar.update()
    else:
        for task in tasks:
            entry, failure = _run_task(task)
            (entries.append(entry) if entry else failures.append(failure))
            bar.update()
    bar.close()
    manifest = {
        "dataset": name or "_".join(s.spec.name for s in sources),
        "version": MANIFEST_VERSION, "seed": seed, "modalities": list(modalities),
        "sources": [{"name": s.spec.name, "root": str(Path(s.root).absolute()),
                     "split_files": {k: str(v) for k, v in s.split_files.items()},
                     "split_sizes": s.spec.split_sizes} for s in sources],
        "spatial": None if spatial is None else dataclasses.asdict(spatial),
        "provenance": provenance or {},
        "subjects": entries, "failures": failures, "warnings": warnings,
    }
    write_splits_csv(out_dir / SPLITS_CSV, entries)
    atomic.write_json(out_dir / "manifest.json", manifest, indent=1)
    report = FolderReport(out_dir=out_dir, failures=failures, warnings=warnings,
                          seconds=time.perf_counter() - start)
    for entry in entries:
        key = (entry["source"], entry["split"])
        report.num_subjects[key] = report.num_subjects.get(key, 0) + 1
    return report


def write_splits_csv(path: Path, entries: list) -> None:
    """One row per subject (id, raw id, source, split, kind): the split as a file to cite,
    compare or pass back as `--split_file` lists."""
    rows = ["subject_id,raw_id,source,split,kind"]
    rows += [",".join(str(e[k]) for k in ("id", "raw_id", "source", "split", "kind"))
             for e in sorted(entries, key=lambda e: e["id"])]
    atomic.write_text(path, "\n".join(rows) + "\n")


def default_jobs() -> int:
    return max(1, min(8, (os.cpu_count() or 1)))
