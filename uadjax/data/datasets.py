"""Adapters for the public datasets of the seed papers, and for any folder of NIfTI scans.

Each adapter is a `DatasetSpec`: where a dataset's files lie in its documented layout (glob
patterns with `{placeholders}` that capture the subject id), which label values its
segmentations hold and which count as lesion, and how to obtain it
(`instructions`, the role of TFDS's `MANUAL_DOWNLOAD_INSTRUCTIONS`: these datasets sit behind
registration walls, so the user downloads them and points `--source name=DIR` at the folder,
TFDS's `manual_dir`). `uadjax.data.dataset_folder` turns one or more sources into a dataset
folder (`docs/CONTRACTS.md`), which trains and evaluates like the phantom.

Pattern syntax (relative to the dataset root): `*` and `**` as in `pathlib.Path.glob`;
`{name}` matches one path component (or part of one) and is part of the subject id; a
placeholder repeated in one pattern must match the same text. A file key lists alternative
patterns, tried in order (BraTS 2020 ships one segmentation under another name).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from uadjax.data.schema import (
    HEALTHY,
    LESION_KINDS,
    TEST_HEALTHY,
    TEST_LESION,
    TRAIN,
    VAL_HEALTHY,
    VAL_LESION,
    DataError,
)

SEG, BRAINMASK = "seg", "brainmask"
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class DatasetSpec:
    """Where one dataset keeps its files and what its labels mean.

    Attributes:
      name: short name; subject ids become '<name>-<raw id>'.
      kind: 'healthy' or a lesion kind (`schema.LESION_KINDS`).
      files: key (modality, 'seg', 'brainmask') -> alternative glob patterns (see module).
      id_key: the key whose first pattern enumerates the subjects.
      labels: label values a segmentation may hold (None: any non-negative integer).
      lesion_labels: labels that are lesion (None: every label > 0).
      skull_stripped: images are already brain-only (else use an atlas mask or own masks).
      split_sizes: default split -> share of the subjects (normalised to the total).
      instructions: where to obtain the data and how to lay it out.
    """

    name: str
    kind: str
    files: dict
    id_key: str
    labels: tuple | None = None
    lesion_labels: tuple | None = None
    skull_stripped: bool = True
    split_sizes: dict = field(default_factory=dict)
    instructions: str = ""

    @property
    def modalities(self) -> tuple:
        return tuple(k for k in self.files if k not in (SEG, BRAINMASK))

    def check(self) -> None:
        """Raises ValueError when the spec itself is inconsistent."""
        if self.kind != HEALTHY and self.kind not in LESION_KINDS:
            raise ValueError(f"{self.name}: unknown kind {self.kind!r} "
                             f"(one of {(HEALTHY, *LESION_KINDS)})")
        if self.id_key not in self.files:
            raise ValueError(f"{self.name}: id_key {self.id_key!r} is not a file key")
        if not _PLACEHOLDER.search(self.files[self.id_key][0]):
            raise ValueError(f"{self.name}: pattern {self.files[self.id_key][0]!r} has no "
                             "{placeholder} for the subject id")
        wanted = set(_PLACEHOLDER.findall(self.files[self.id_key][0]))
        for key, alternatives in self.files.items():
            for pattern in alternatives:
                if set(_PLACEHOLDER.findall(pattern)) != wanted:
                    raise ValueError(f"{self.name}: pattern {pattern!r} ({key}) must use the "
                                     f"placeholders of the subject pattern: {sorted(wanted)}")
        if self.kind != HEALTHY and SEG not in self.files:
            raise ValueError(f"{self.name}: a lesion dataset needs a 'seg' pattern")


_HEALTHY_SPLITS = {TRAIN: 0.8, VAL_HEALTHY: 0.1, TEST_HEALTHY: 0.1}
_LESION_SPLITS = {VAL_LESION: 0.2, TEST_LESION: 0.8}

def _brats_spec(name: str, suffix: str, seg: tuple, instructions: str) -> DatasetSpec:
    """BraTS: one folder per case, '<case>_<modality><suffix>', labels 0, 1, 2, 4."""
    files = {m: (f"**/{{id}}/{{id}}_{m}{suffix}",) for m in ("t1", "t1ce", "t2", "flair")}
    return DatasetSpec(name=name, kind="tumour", id_key="t2", labels=(0, 1, 2, 4),
                       split_sizes=_LESION_SPLITS, files=files | {SEG: seg},
                       instructions=instructions)


SPECS = {
    "ixi": DatasetSpec(
        name="ixi", kind=HEALTHY, id_key="t2", skull_stripped=False,
        split_sizes=_HEALTHY_SPLITS,
        files={"t1": ("**/{id}-T1.nii.gz",), "t2": ("**/{id}-T2.nii.gz",),
               "pd": ("**/{id}-PD.nii.gz",)},
        instructions=(
            "IXI (healthy, T1/T2/PD, not skull-stripped; CC BY-SA 3.0): download IXI-T1.tar, "
            "IXI-T2.tar and IXI-PD.tar from https://brain-development.org/ixi-dataset/ and "
            "extract them into one folder (any sub-folders): files "
            "IXI002-Guys-0828-T1.nii.gz, IXI002-Guys-0828-T2.nii.gz, ... T1 is on another grid "
            "than T2/PD: use --register to combine it with them; use --atlas_mask "
            "--skull_strip (or your own masks) because IXI ships no brain masks.")),
    "camcan": DatasetSpec(
        name="camcan", kind=HEALTHY, id_key="t1", skull_stripped=False,
        split_sizes=_HEALTHY_SPLITS,
        files={"t1": ("**/{id}/anat/{id}_T1w.nii.gz",), "t2": ("**/{id}/anat/{id}_T2w.nii.gz",)},
        instructions=(
            "Cam-CAN (healthy, T1/T2, not skull-stripped): request access at "
            "https://camcan-archive.mrc-cbu.cam.ac.uk/dataaccess/ and download the BIDS "
            "anatomical release (cc700/mri/pipeline/release004/BIDS_20190411/anat): folders "
            "sub-CC110033/anat/sub-CC110033_T1w.nii.gz and _T2w.nii.gz. Point --source at the "
            "folder holding the sub-CC* folders (or any folder above it).")),
    "brats2021": _brats_spec(
        "brats2021", ".nii.gz", ("**/{id}/{id}_seg.nii.gz",),
        (
            "BraTS 2021 (glioma, T1/T1ce/T2/FLAIR, skull-stripped, 1 mm, SRI24 space): register "
            "at https://www.synapse.org/brats2021 (RSNA-ASNR-MICCAI BraTS 2021, Task 1) and "
            "extract BraTS2021_Training_Data.tar: folders BraTS2021_00000/"
            "BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz. Labels 1, 2, 4 (necrosis, "
            "oedema, enhancing tumour) are all lesion.")),
    # BraTS20_Training_355 ships its labels as W39_1998.09.19_Segm.nii.
    "brats2020": _brats_spec(
        "brats2020", ".nii*", ("**/{id}/{id}_seg.nii*", "**/{id}/*_Segm.nii*"),
        (
            "BraTS 2020 (glioma, T1/T1ce/T2/FLAIR, skull-stripped): register at "
            "https://www.med.upenn.edu/cbica/brats2020/registration.html and extract "
            "MICCAI_BraTS2020_TrainingData: folders BraTS20_Training_001/"
            "BraTS20_Training_001_{t1,t1ce,t2,flair,seg}.nii.gz (case 355's labels are named "
            "W39_1998.09.19_Segm.nii; found as well).")),
    "mslub": DatasetSpec(
        name="mslub", kind="ms", id_key="t2", labels=(0, 1), split_sizes=_LESION_SPLITS,
        skull_stripped=False,
        files={"t1": ("**/{id}/T1W.nii.gz",), "t1ce": ("**/{id}/T1WKS.nii.gz",),
               "t2": ("**/{id}/T2W.nii.gz",), "flair": ("**/{id}/FLAIR.nii.gz",),
               SEG: ("**/{id}/consensus_gt.nii.gz",),
               BRAINMASK: ("**/{id}/brainmask.nii.gz",)},
        instructions=(
            "MSLUB (multiple sclerosis, 30 patients, T1/T1ce/T2/FLAIR; CC BY): download the "
            "'3D MR image database of Multiple Sclerosis patients with white matter lesion "
            "segmentations' from http://lit.fe.uni-lj.si/tools.php?lang=eng (mirror: "
            "github.com/muschellij2/open_ms_data, cross_sectional/). Point --source at one "
            "variant folder (raw/, coregistered/ or coregistered_resampled/): patient01/"
            "{T1W,T1WKS,T2W,FLAIR,consensus_gt}.nii.gz, brainmask.nii.gz where provided. In "
            "raw/ the modalities are on different grids: use --register, or the coregistered "
            "variant.")),
    "atlas": DatasetSpec(
        name="atlas", kind="stroke", id_key="t1", labels=(0, 1), split_sizes=_LESION_SPLITS,
        skull_stripped=False,
        files={"t1": ("**/{id}/{ses}/anat/{id}_{ses}_space-MNI152NLin2009aSym_T1w.nii.gz",),
               SEG: (("**/{id}/{ses}/anat/"
                      "{id}_{ses}_space-MNI152NLin2009aSym_label-L_desc-T1lesion_mask.nii.gz"),)},
        instructions=(
            "ATLAS v2.0 (chronic stroke, T1, MNI152 2009a space, defaced, not skull-stripped): "
            "request the encrypted archive via https://fcon_1000.projects.nitrc.org/indi/"
            "retro/atlas.html, decrypt and extract: ATLAS_2/Training/R001/sub-r001s001/ses-1/"
            "anat/sub-r001s001_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz and "
            "..._label-L_desc-T1lesion_mask.nii.gz. Use --atlas_mask --skull_strip.")),
    "wmh": DatasetSpec(
        name="wmh", kind="wmh", id_key="flair", labels=(0, 1, 2), lesion_labels=(1,),
        split_sizes=_LESION_SPLITS, skull_stripped=False,
        files={"flair": ("**/{site}/{id}/pre/FLAIR.nii.gz",),
               "t1": ("**/{site}/{id}/pre/T1.nii.gz",),
               SEG: ("**/{site}/{id}/wmh.nii.gz",)},
        instructions=(
            "WMH Segmentation Challenge (white matter hyperintensities, FLAIR and T1 "
            "registered to FLAIR): register at https://wmh.isi.uu.nl/ and download the "
            "training (and test) data: <site>/<subject>/pre/{FLAIR,T1}.nii.gz and "
            "<site>/<subject>/wmh.nii.gz for the sites Utrecht, Singapore, GE3T (Amsterdam). "
            "Label 1 is WMH (lesion); label 2 ('other pathology') counts as background, as "
            "in the challenge's own evaluation, which ignores it.")),
}


def generic_spec(name: str, kind: str, patterns: dict, *, labels=None, lesion_labels=None,
                 skull_stripped: bool = True) -> DatasetSpec:
    """An adapter for any folder of NIfTI scans, from file-name patterns.

    Args:
      name: dataset name.
      kind: 'healthy' or a lesion kind.
      patterns: key -> pattern (or tuple of alternatives), e.g.
        {'t2': '{id}/{id}_T2.nii.gz', 'seg': '{id}/{id}_lesion.nii.gz'}; the first
        modality's pattern enumerates the subjects.
    """
    files = {k: (v,) if isinstance(v, str) else tuple(v) for k, v in patterns.items()}
    modalities = [k for k in files if k not in (SEG, BRAINMASK)]
    if not modalities:
        raise ValueError(f"{name}: give at least one modality pattern")
    spec = DatasetSpec(name=name, kind=kind, files=files, id_key=modalities[0],
                       labels=labels, lesion_labels=lesion_labels,
                       skull_stripped=skull_stripped,
                       split_sizes=_HEALTHY_SPLITS if kind == HEALTHY else _LESION_SPLITS,
                       instructions="a folder of NIfTI scans described by file-name patterns")
    spec.check()
    return spec


def get_spec(name: str) -> DatasetSpec:
    if name not in SPECS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(SPECS)} (or 'generic')")
    return SPECS[name]


# ----------------------------------------------------------------------------- discovery


def _pattern_regex(pattern: str) -> re.Pattern:
    """A glob pattern with {placeholders} -> regex over '/'-separated relative paths."""
    out, seen, i = [], set(), 0
    while i < len(pattern):
        match = _PLACEHOLDER.match(pattern, i)
        if match:
            name = match.group(1)
            out.append(f"(?P={name})" if name in seen else f"(?P<{name}>[^/]+?)")
            seen.add(name)
            i = match.end()
        elif pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


@dataclass(frozen=True)
class RawSubject:
    """One subject found in a source folder.

    Attributes:
      raw_id: the captured placeholders joined by '_' (e.g. 'BraTS2021_00000', 'Utrecht_0').
      files: key -> Path for every key found (missing keys are absent).
      problems: key -> why it could not be resolved (e.g. several files match).
    """

    raw_id: str
    files: dict
    problems: dict = field(default_factory=dict)


def _placeholders(pattern: str) -> list:
    """Placeholder names in order of first appearance."""
    return list(dict.fromkeys(_PLACEHOLDER.findall(pattern)))


def _index(paths: list, pattern: str, names: list) -> dict:
    """(placeholder values in `names` order) -> matching paths, for one pattern."""
    regex = _pattern_regex(pattern)
    out = {}
    for rel, path in paths:
        match = regex.match(rel)
        if match:
            out.setdefault(tuple(match.group(n) for n in names), []).append(path)
    return out


def discover(spec: DatasetSpec, root) -> list:
    """Finds the subjects of `spec` under `root`, sorted by raw id.

    The folder is listed once; every pattern is matched against that list (a glob per
    subject would walk the tree once per file).

    Raises:
      DataError: `root` is not a folder or holds no file matching the subject pattern.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, f"{spec.name}: source folder not found")
    paths = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file())
    id_pattern = spec.files[spec.id_key][0]
    names = _placeholders(id_pattern)
    indices = {key: [_index(paths, alt, names) for alt in alternatives]
               for key, alternatives in spec.files.items()}
    found = indices[spec.id_key][0]
    if not found:
        raise DataError(root, f"{spec.name}: no file matches {id_pattern!r} (expected layout: "
                              f"{spec.instructions})")
    subjects = []
    for values in sorted(found):
        files, problems = {}, {}
        for key, alternatives in spec.files.items():
            for alternative, index in zip(alternatives, indices[key], strict=True):
                matches = index.get(values, [])
                if len(matches) == 1:
                    files[key] = matches[0]
                    break
                if len(matches) > 1:
                    problems[key] = (f"{len(matches)} files match {alternative!r}: "
                                     + ", ".join(str(m) for m in matches[:3]))
                    break
        subjects.append(RawSubject(raw_id="_".join(values), files=files, problems=problems))
    return subjects


def subject_id(dataset: str, raw_id: str) -> str:
    """'<dataset>-<raw id>' reduced to [A-Za-z0-9._-] (accents dropped, others -> '_').

    The id names files and folders, so it can never climb out of the output folder.
    """
    ascii_id = unicodedata.normalize("NFKD", raw_id).encode("ascii", "ignore").decode()
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", ascii_id).strip("._") or "subject"
    return f"{dataset}-{safe}"


# ----------------------------------------------------------------------------- splits


def split_counts(total: int, sizes: dict) -> dict:
    """Split -> number of subjects: `sizes` (counts or shares) scaled to `total`.

    Largest-remainder rounding, so the counts add up to `total`; a paper's counts are kept
    exactly when `total` equals their sum.
    """
    names = list(sizes)
    weights = [float(sizes[n]) for n in names]
    norm = sum(weights)
    if norm <= 0:
        raise ValueError(f"split sizes must be positive, got {sizes}")
    exact = [w * total / norm for w in weights]
    counts = [int(e) for e in exact]
    order = sorted(range(len(names)), key=lambda i: (counts[i] - exact[i], i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return dict(zip(names, counts, strict=True))


def assign_splits(raw_ids: list, sizes: dict, *, seed: int, fixed: dict | None = None):
    """Reproducible subject-level split.

    Subjects in `fixed` (raw id -> split, e.g. from the authors' split files) keep their
    split; the others are shuffled with `seed` (sorted ids first, so the result does not
    depend on the order of the file system) and dealt out by `split_counts`.

    Returns:
      raw id -> split.
    """
    fixed = dict(fixed or {})
    rest = sorted(r for r in raw_ids if r not in fixed)
    order = np.random.default_rng(seed).permutation(len(rest))
    counts = split_counts(len(rest), sizes) if rest else {}
    out, start = {}, 0
    for split, n in counts.items():
        for i in order[start:start + n]:
            out[rest[i]] = split
        start += n
    out.update({r: s for r, s in fixed.items() if r in set(raw_ids)})
    return out


def read_split_files(files: dict, raw_ids: list) -> tuple[dict, list]:
    """Subjects named in split files (the seed papers' CSV / TXT lists).

    Args:
      files: split -> path; every line naming a raw id (as a whole token, so 'IXI002'
        does not match 'IXI0021') puts that subject in the split.
      raw_ids: the subjects found.

    Returns:
      (raw id -> split, warnings); a subject named for two splits keeps the first (in the
      order of `files`) and is reported.
    """
    tokens = {}
    for raw_id in raw_ids:
        tokens[raw_id] = re.compile(rf"(?<![A-Za-z0-9]){re.escape(raw_id)}(?![A-Za-z0-9])")
    assigned, warnings = {}, []
    for split, path in files.items():
        path = Path(path)
        if not path.is_file():
            raise DataError(path, "split file not found")
        text = path.read_text(errors="replace")
        for raw_id, token in tokens.items():
            if token.search(text):
                if raw_id in assigned and assigned[raw_id] != split:
                    warnings.append(f"{raw_id} is listed for {assigned[raw_id]} and {split} "
                                    f"({path.name}); kept in {assigned[raw_id]}")
                    continue
                assigned[raw_id] = split
    return assigned, warnings


@dataclass(frozen=True)
class Preset:
    """A seed paper's data recipe: per-dataset split sizes, offline steps, data config.

    Attributes:
      split_sizes: dataset name -> {split: count} (the paper's numbers).
      modalities: default modalities.
      spatial: `spatial.SpatialOptions` field overrides.
      data_config: the `configs/data.py` variant that does the online part.
      note: what is and is not reproduced.
    """

    split_sizes: dict
    modalities: tuple
    spatial: dict
    data_config: str
    note: str


PRESETS = {
    "behrendt": Preset(
        split_sizes={
            "ixi": {TRAIN: 358, VAL_HEALTHY: 44, TEST_HEALTHY: 158},
            "brats2021": {VAL_LESION: 100, TEST_LESION: 1151},
            "mslub": {VAL_LESION: 10, TEST_LESION: 20},
            "atlas": {VAL_LESION: 175, TEST_LESION: 480},
            "wmh": {VAL_LESION: 15, TEST_LESION: 45},
        },
        modalities=("t2",),
        spatial={"register": True, "spacing": (1.0, 1.0, 1.0), "n4": True,
                 "atlas_mask": True, "skull_strip": True, "curvature_flow": True},
        data_config="behrendt",
        note=("Behrendt et al. (pDDPM / cDDPM): IXI healthy training (fold sizes 358 / 44 / "
              "158), BraTS21 and MSLUB (T2) or ATLAS and WMH (T1) evaluation; 1 mm, affine "
              "registration to a template, brain mask, N4, CurvatureFlow smoothing (their "
              "reader's), then 96 x 96 x 50 at 2 mm with brain p1-p99 scaling. Differences: "
              "ICBM 2009c instead of SRI24, atlas brain masks instead of HD-BET for IXI/MSLUB. "
              "Pass the authors' "
              "fold CSVs with --split_file to use their exact subjects.")),
    "mmccd": Preset(
        split_sizes={"brats2021": {TRAIN: 974, VAL_LESION: 138, TEST_LESION: 139}},
        modalities=("flair", "t2"),
        spatial={},
        data_config="mmccd_brats",
        note=("MMCCD: BraTS 2021 training set, 974 training / 139 test subjects (the authors' "
              "lists via --split_file), tumour-free slices 70-89 of training subjects at "
              "128 x 128, [-3, 3] scaling. The 138 subjects outside the authors' lists become "
              "the lesion-validation set for the threshold. The paper scores one "
              "max-tumour slice per test subject; uadjax scores all 20 slices.")),
    "disyre": Preset(
        split_sizes={"camcan": {TRAIN: 603, VAL_HEALTHY: 50},
                     "brats2020": {VAL_LESION: 37, TEST_LESION: 332},
                     "atlas": {VAL_LESION: 66, TEST_LESION: 589}},
        modalities=("t2",),
        spatial={"register": True, "spacing": (1.0, 1.0, 1.0), "atlas_mask": True,
                 "skull_strip": True},
        data_config="disyre_upd",
        note=("DISYRE: CamCAN healthy training (603 / 50), BraTS 2020 and ATLAS v2 evaluation, "
              "registered at 1 mm (the UPD study's pipeline), quantile scaling over the volume, "
              "foreground crop, 128 px training patches (configs/disyre.py:paper,1mm). The "
              "paper has no lesion-validation set; ours (37 / 66 subjects) selects the "
              "threshold, the rest match the paper's test counts.")),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


def with_split_sizes(spec: DatasetSpec, sizes: dict | None) -> DatasetSpec:
    return spec if not sizes else replace(spec, split_sizes=dict(sizes))
