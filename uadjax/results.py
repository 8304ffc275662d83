"""The typed schema of results.json: written by the evaluation, read by everything else.

`EvaluationResults.to_json()` is the file's content and `EvaluationResults.load(path)` reads
it back, checking every field: a renamed or missing key is a `ResultsError` naming the file
and the key, never a silent NaN in a leaderboard. Files written before the schema had a
version (the same layout) load as version 0.

Layout, per evaluated method (`results[name].kinds[kind]`): the counts, the Dice of the
threshold selection on the validation volumes, and one `ThresholdMetrics` per threshold
source ('val' = selected on the lesion-validation volumes, 'oracle' = best on the test volumes
themselves, 'fpr@r' = at false-positive rate r on healthy validation volumes).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from uadjax import atomic

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
VAL, ORACLE = "val", "oracle"


class ResultsError(ValueError):
    """A results.json that does not have the schema's layout."""


def _require(data: dict, key: str, where: str):
    if not isinstance(data, dict):
        raise ResultsError(f"{where}: expected an object, got {type(data).__name__}")
    if key not in data:
        raise ResultsError(f"{where}: missing key {key!r} (found {sorted(data)})")
    return data[key]


def is_threshold_source(key: str) -> bool:
    return key in (VAL, ORACLE) or key.startswith("fpr@")


@dataclasses.dataclass
class ThresholdMetrics:
    """Metrics at one threshold: per-volume summaries ({metric: {'mean', 'std', 'n', ...}})
    and pooled values ({metric: value}) over the test volumes of a kind."""

    threshold: float
    per_volume: dict[str, dict[str, float]]
    pooled: dict[str, float]

    def mean(self, metric: str) -> float:
        """The per-volume mean of `metric` (NaN when it was not computed)."""
        return float(self.per_volume.get(metric, {}).get("mean", math.nan))

    def to_json(self) -> dict:
        return {"threshold": self.threshold, "per_volume": self.per_volume,
                "pooled": self.pooled}

    @classmethod
    def from_json(cls, data: dict, where: str) -> ThresholdMetrics:
        return cls(threshold=float(_require(data, "threshold", where)),
                   per_volume=dict(_require(data, "per_volume", where)),
                   pooled=dict(_require(data, "pooled", where)))


@dataclasses.dataclass
class KindResults:
    """One lesion kind of one method."""

    num_test: int
    num_val: int
    thresholds: dict[str, ThresholdMetrics] = dataclasses.field(default_factory=dict)
    val_dice_at_selection: float | None = None
    healthy_fp_volume_ml: dict[str, float] | None = None
    pr_curve: dict[str, list] | None = None
    warning: str | None = None

    def at(self, source: str = VAL) -> ThresholdMetrics | None:
        return self.thresholds.get(source)

    def mean(self, metric: str, source: str = VAL) -> float:
        """Per-volume mean of `metric` at `source`'s threshold (NaN when absent)."""
        at = self.at(source)
        return at.mean(metric) if at is not None else math.nan

    def to_json(self) -> dict:
        out: dict[str, Any] = {"num_test": self.num_test, "num_val": self.num_val}
        if self.val_dice_at_selection is not None:
            out["val_dice_at_selection"] = self.val_dice_at_selection
        if self.warning is not None:
            out["warning"] = self.warning
        for source, metrics in self.thresholds.items():
            out[source] = metrics.to_json()
            if source == VAL and self.healthy_fp_volume_ml is not None:
                out["healthy_fp_volume_ml"] = self.healthy_fp_volume_ml
        if self.healthy_fp_volume_ml is not None and VAL not in self.thresholds:
            out["healthy_fp_volume_ml"] = self.healthy_fp_volume_ml
        if self.pr_curve is not None:
            out["pr_curve"] = self.pr_curve
        return out

    @classmethod
    def from_json(cls, data: dict, where: str) -> KindResults:
        known = {"num_test", "num_val", "val_dice_at_selection", "healthy_fp_volume_ml",
                 "pr_curve", "warning"}
        unknown = [k for k in data if k not in known and not is_threshold_source(k)]
        if unknown:
            raise ResultsError(f"{where}: unknown keys {unknown}")
        return cls(num_test=int(_require(data, "num_test", where)),
                   num_val=int(_require(data, "num_val", where)),
                   thresholds={k: ThresholdMetrics.from_json(v, f"{where}.{k}")
                               for k, v in data.items() if is_threshold_source(k)},
                   val_dice_at_selection=data.get("val_dice_at_selection"),
                   healthy_fp_volume_ml=data.get("healthy_fp_volume_ml"),
                   pr_curve=data.get("pr_curve"), warning=data.get("warning"))


@dataclasses.dataclass
class MethodResults:
    """Every lesion kind of one scored method, and the label-free thresholds."""

    kinds: dict[str, KindResults]
    fpr_thresholds: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return {"kinds": {k: v.to_json() for k, v in self.kinds.items()},
                "fpr_thresholds": self.fpr_thresholds}

    @classmethod
    def from_json(cls, data: dict, where: str) -> MethodResults:
        kinds = _require(data, "kinds", where)
        return cls(kinds={k: KindResults.from_json(v, f"{where}.kinds.{k}")
                          for k, v in kinds.items()},
                   fpr_thresholds=dict(data.get("fpr_thresholds", {})))


@dataclasses.dataclass
class EvaluationResults:
    """One evaluation of one run: results.json.

    Attributes:
      method: the evaluated method; `results[method]` are its results, other entries the
        baselines scored beside it (e.g. 'threshold').
      checkpoints: stage -> {'step', 'latest_step', 'fell_back', 'selection' ('latest' |
        'best_val'), 'val_loss' (of a best_val step), 'trained_steps', 'num_steps',
        'finished_steps'} (`runs.load_models_and_steps`).
      reconstruction: healthy SSIM / PSNR / L1 and per-kind L1 ratios, or None.
      calibration: the prediction threshold and the post-processing (calibration.json).
      timing: 'score_seconds', 'compile_seconds', 'slices_scored', 'slices_per_second',
        'volumes_scored', 'seconds_per_volume', 'metric_seconds', and (since multi-host
        evaluation) 'processes', 'slices_per_volume' (mean over every evaluation volume),
        'per_process' (each process's score_seconds, compile_seconds, volumes and slices).
    """

    method: str
    modalities: list[str]
    checkpoints: dict[str, dict]
    reconstruction: dict | None
    spacing_mm: list
    results: dict[str, MethodResults]
    calibration: dict
    timing: dict
    schema_version: int = SCHEMA_VERSION

    def of(self, name: str | None = None) -> MethodResults:
        """The results of `name` (default: the evaluated method)."""
        name = name or self.method
        if name not in self.results:
            raise ResultsError(f"no results for {name!r} (have {sorted(self.results)})")
        return self.results[name]

    def to_json(self) -> dict:
        return {"method": self.method, "modalities": list(self.modalities),
                "checkpoints": self.checkpoints, "reconstruction": self.reconstruction,
                "spacing_mm": self.spacing_mm,
                "results": {k: v.to_json() for k, v in self.results.items()},
                "calibration": self.calibration, "timing": self.timing,
                "schema_version": self.schema_version}

    @classmethod
    def from_json(cls, data: dict, where: str = RESULTS_FILE) -> EvaluationResults:
        version = int(data.get("schema_version", 0)) if isinstance(data, dict) else -1
        if version > SCHEMA_VERSION:
            raise ResultsError(f"{where}: schema version {version} is newer than this "
                               f"uadjax reads ({SCHEMA_VERSION}); update uadjax")
        timing = dict(_require(data, "timing", where))
        for key in ("slices_scored", "volumes_scored", "seconds_per_volume"):
            _require(timing, key, f"{where}.timing")
        return cls(method=str(_require(data, "method", where)),
                   modalities=list(_require(data, "modalities", where)),
                   checkpoints=dict(_require(data, "checkpoints", where)),
                   reconstruction=_require(data, "reconstruction", where),
                   spacing_mm=list(_require(data, "spacing_mm", where)),
                   results={k: MethodResults.from_json(v, f"{where}.results.{k}")
                            for k, v in _require(data, "results", where).items()},
                   calibration=dict(_require(data, "calibration", where)),
                   timing=timing, schema_version=version)

    def save(self, path: str | Path) -> None:
        atomic.write_json(str(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> EvaluationResults:
        """Reads and checks a results.json; ResultsError names the file and the problem."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ResultsError(f"{path}: cannot read results ({err})") from err
        return cls.from_json(data, str(path))
