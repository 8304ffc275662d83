"""Benchmark: several methods, one dataset, one protocol, several seeds -> a leaderboard.

    python -m uadjax.benchmark --methods=all --size=cpu --budget=short --seeds=0,1,2
    ./launch.sh benchmark --methods=ddpm,ddpm+ens,pddpm,cddpm --seeds=0 --root=runs/bench
    ./launch.sh benchmark --methods=all --size=paper --dataset_dir=data/behrendt_t2

A method is `<config>[:<training modifiers>][+<test-time modifiers>]`: `ddpm`, `ddpm+ens`
(the DDPM run scored with the t ensemble), `mmccd:cyclic`, `disyre+multistep`; `all` is the
list in ENTRIES; `threshold` is the intensity-threshold baseline. Every run lives in
`<root>/<config>-<size>_<budget>[_<modifiers>]/seed<k>/`: what is trained is not trained
again, a half-trained run resumes, an evaluated one is read back. Evaluation uses the configured
protocol for every method (validation-selected threshold, oracle labelled separately).

Writes to `<root>/`: leaderboard.md, leaderboard.csv (one row per method, lesion kind and
metric), leaderboard.json, and figures: maps_<kind>.png (the same test subjects across
methods), pr_<kind>.png (pooled PR curves), speed_accuracy.png. Markdown cells are mean ±
std over seeds of the per-volume means; p is a paired permutation test of per-volume Dice
(averaged over seeds) between the best method of a lesion kind and each other one.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import importlib
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from uadjax import atomic, xla_flags

KINDS_ORDER = ("tumour", "stroke", "ms", "wmh")
EVAL_DIR = "eval_benchmark"
TIMING_FILE = "benchmark_timing.json"
PROTOCOL_FILE = "benchmark_protocol.json"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One leaderboard row: a training config, optional test-time modifiers, a label."""

    key: str                  # 'ddpm', 'ddpm+ens', 'mmccd:cyclic', 'threshold'
    config: str               # configs/<config>.py
    train_modifiers: str = ""  # 'cyclic', 'nopretrain', ...
    test_modifiers: str = ""  # 'ens', 'grid', 'multistep': evaluation only
    label: str = ""

    @property
    def is_baseline(self) -> bool:
        """The T2 threshold scored beside the DDPM runs (read from them, never run)."""
        return self.key == "threshold"

    @property
    def is_threshold(self) -> bool:
        """Any intensity-threshold row (untrained): the baseline or `threshold:<modality>`."""
        return self.is_baseline or self.config == "threshold"

    def name(self) -> str:
        return self.label or self.key


# The `all` list, in leaderboard order. The intensity threshold is read from the DDPM runs
# (evaluation scores it beside every method; it does not depend on the seed).
ENTRIES = (
    Entry("ddpm", "ddpm", label="DDPM"),
    Entry("ddpm+ens", "ddpm", test_modifiers="ens", label="DDPM-ENS"),
    Entry("pddpm", "pddpm", label="pDDPM"),
    Entry("cddpm", "cddpm", label="cDDPM"),
    Entry("cddpm+ens", "cddpm", test_modifiers="ens", label="cDDPM-ENS"),
    Entry("ae", "ae", label="AE"),
    Entry("vae", "vae", label="VAE"),
    Entry("dae", "dae", label="DAE"),
    Entry("disyre", "disyre", label="DISYRE"),
    Entry("maediff", "maediff", label="MAEDiff"),
    Entry("ldm", "ldm", label="LDM (Pinaya)"),
    Entry("mmccd", "mmccd", label="MMCCD"),
    Entry("mmccd:cyclic", "mmccd", train_modifiers="cyclic", label="Cyclic UNet"),
    Entry("threshold", "ddpm", label="intensity threshold"),
)

# Numbers the seed papers report on protocols this project reproduces (config size
# `paper`, the dataset prepared with its preset): Behrendt et al., cDDPM paper Table 1
# (BraTS21 and MSLUB on T2, ATLAS and WMH on T1; mean over their 5 folds, percent).
PAPER_SOURCE = "Behrendt et al. (cDDPM), Table 1"
PAPER_RESULTS = {
    # key: {(dataset, modality): (Dice, AUPRC)}
    "threshold": {("brats2021", "t2"): (19.69, 20.27), ("mslub", "t2"): (6.21, 4.23),
                  ("atlas", "t1"): (4.41, 1.71), ("wmh", "t1"): (9.38, 4.72)},
    "vae": {("brats2021", "t2"): (28.81, 25.72), ("mslub", "t2"): (6.16, 4.46),
            ("atlas", "t1"): (15.08, 15.27), ("wmh", "t1"): (5.23, 4.16)},
    "ae": {("brats2021", "t2"): (31.51, 28.80), ("mslub", "t2"): (7.23, 5.71),
           ("atlas", "t1"): (14.91, 14.76), ("wmh", "t1"): (4.53, 4.16)},
    "dae": {("brats2021", "t2"): (45.37, 49.38), ("mslub", "t2"): (3.88, 4.47),
            ("atlas", "t1"): (8.53, 12.45), ("wmh", "t1"): (7.31, 6.32)},
    "ddpm": {("brats2021", "t2"): (44.25, 49.98), ("mslub", "t2"): (4.80, 6.36),
             ("atlas", "t1"): (12.90, 15.67), ("wmh", "t1"): (10.03, 8.86)},
    "ddpm+ens": {("brats2021", "t2"): (44.50, 50.73), ("mslub", "t2"): (6.46, 6.31),
                 ("atlas", "t1"): (14.67, 17.56), ("wmh", "t1"): (9.63, 8.12)},
    "pddpm": {("brats2021", "t2"): (49.36, 54.70), ("mslub", "t2"): (9.40, 9.88),
              ("atlas", "t1"): (12.95, 17.37), ("wmh", "t1"): (8.03, 7.78)},
    "cddpm+ens": {("brats2021", "t2"): (53.37, 58.84), ("mslub", "t2"): (11.51, 11.13),
                  ("atlas", "t1"): (19.99, 22.21), ("wmh", "t1"): (9.88, 9.33)},
}
KIND_DATASETS = {"tumour": ("brats2021",), "ms": ("mslub",), "stroke": ("atlas",),
                 "wmh": ("wmh",)}


def parse_entry(text: str) -> Entry:
    """'ddpm', 'ddpm+ens', 'mmccd:cyclic', 'disyre:1mm+multistep' -> Entry (labels of the
    known keys are reused)."""
    known = {e.key: e for e in ENTRIES}
    if text in known:
        return known[text]
    head, _, test = text.partition("+")
    config, _, train = head.partition(":")
    if not (Path(__file__).resolve().parents[1] / "configs" / f"{config}.py").is_file():
        raise ValueError(f"unknown method {text!r}: no configs/{config}.py (known: "
                         f"{', '.join(known)})")
    label = f"intensity threshold, {train.upper()}" if config == "threshold" and train else ""
    return Entry(text, config, train.replace("+", ","), test.replace("+", ","), label=label)


def parse_entries(text: str) -> list[Entry]:
    if text == "all":
        return list(ENTRIES)
    return [parse_entry(t.strip()) for t in text.split(",") if t.strip()]


def with_threshold_rows(entries: list[Entry], protocol) -> list[Entry]:
    """`entries` plus an intensity-threshold row for every modality a listed method reads
    that no listed threshold row covers (MMCCD reads FLAIR: its fair baseline is the FLAIR
    threshold, not only the T2 one). The `threshold` baseline covers the DDPM's modality."""
    covered = set()
    for e in entries:
        if e.is_threshold:
            covered.update(build_config(e, protocol, 0).data.modalities)
    extra = []
    for e in entries:
        if e.is_threshold:
            continue
        for modality in build_config(e, protocol, 0).data.modalities:
            if modality not in covered:
                covered.add(modality)
                extra.append(parse_entry(f"threshold:{modality}"))
    return [*entries, *extra]


@dataclasses.dataclass(frozen=True)
class Protocol:
    """What every run of one benchmark shares."""

    size: str = "cpu"          # config size: paper | cpu | tiny
    budget: str = "short"      # 'short' (configs' common modifier) or '' (full training)
    dataset_dir: str = ""      # NIfTI dataset folder; '' = the built-in phantom
    data_dir: str = ""         # shard folder ('' = the config's)
    overrides: tuple = ()      # (dotted key, value) applied to every config

    def config_arg(self, *modifiers: str) -> str:
        return ",".join(m for m in (self.size, self.budget, *modifiers) if m)


def build_config(entry: Entry, protocol: Protocol, seed: int, *, with_test: bool = True):
    config = importlib.import_module(f"configs.{entry.config}").get_config(
        protocol.config_arg(entry.train_modifiers, entry.test_modifiers if with_test else ""))
    config.seed = seed
    config.eval.seed = seed
    if protocol.dataset_dir:
        config.data.dataset_dir = protocol.dataset_dir
    if protocol.data_dir:
        config.data.data_dir = protocol.data_dir
    for key, value in protocol.overrides:
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise ValueError(f"--override {key}: the config has no key {leaf!r}")
        node[leaf] = _parse_value(value, node[leaf], key)
    return config


def _parse_value(text: str, current, key: str):
    """An override's text as the type of the value it replaces (bool, int, float, str)."""
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--override {key}={text}: expected true or false")
        return text.lower() in ("true", "1")
    if isinstance(current, int | float | str):
        try:
            return type(current)(text)
        except ValueError:
            raise ValueError(f"--override {key}={text}: expected {type(current).__name__}") \
                from None
    raise ValueError(f"--override {key}: only bool, int, float and str fields can be set here")


def run_dir(root: str, entry: Entry, protocol: Protocol, seed: int) -> str:
    name = f"{entry.config}-{protocol.config_arg(entry.train_modifiers)}".replace(",", "_")
    return os.path.join(root, name, f"seed{seed}")


def eval_dir(workdir: str, entry: Entry) -> str:
    mods = entry.test_modifiers.replace(",", "_")
    return os.path.join(workdir, EVAL_DIR + (f"_{mods}" if mods else ""))


# ------------------------------------------------------------------------------------------
# Running.

class TrainingStopped(RuntimeError):
    """Training stopped before its last step (SIGTERM): the benchmark stops too."""


def check_protocol(workdir: str, protocol: Protocol) -> None:
    """Records the dataset and overrides a run folder was made with, and refuses to reuse it
    under others (its results and checkpoints belong to that protocol)."""
    path = os.path.join(workdir, PROTOCOL_FILE)
    current = {"dataset_dir": protocol.dataset_dir, "data_dir": protocol.data_dir,
               "overrides": [list(o) for o in protocol.overrides]}
    saved = _read_json(path)
    if saved is None:
        if not os.path.exists(os.path.join(workdir, "config.json")) or not any(current.values()):
            os.makedirs(workdir, exist_ok=True)
            atomic.write_json(path, current)
            return
        saved = {"dataset_dir": "", "data_dir": "", "overrides": []}  # made before: phantom
    if saved != current:
        raise ValueError(f"{workdir} was made with {saved}, not {current}; use another --root")


def run_one(entry: Entry, protocol: Protocol, seed: int, root: str) -> dict:
    """Trains (resuming) and evaluates one entry and seed; returns its `record`."""
    workdir = run_dir(root, entry, protocol, seed)
    out_dir = eval_dir(workdir, entry)
    check_protocol(workdir, protocol)
    if not os.path.exists(os.path.join(out_dir, "results.json")):
        os.makedirs(workdir, exist_ok=True)
        # The runs' own output (shard preparation, results tables) goes to a log per run, so
        # the console shows one progress line per run.
        with open(os.path.join(workdir, "benchmark.log"), "a", encoding="utf-8") as log, \
                contextlib.redirect_stdout(log):
            _train_and_evaluate(build_config(entry, protocol, seed), workdir, out_dir)
    return record(workdir, out_dir)


def _train_and_evaluate(config, workdir: str, out_dir: str) -> None:
    """Trains what is not trained yet (adding the wall time to benchmark_timing.json when
    any step was trained here) and evaluates into `out_dir`."""
    from uadjax import jobs

    timing_path = os.path.join(workdir, TIMING_FILE)
    steps_before = trained_steps(workdir)
    start = time.perf_counter()
    finished = jobs.train(config, workdir, progress=False)
    if trained_steps(workdir) != steps_before:
        timing = _read_json(timing_path) or {}
        timing["train_seconds"] = (timing.get("train_seconds") or 0.0) + (
            time.perf_counter() - start)
        atomic.write_json(timing_path, timing)
    if not finished:
        raise TrainingStopped(f"training of {workdir} stopped early (SIGTERM); rerun the "
                              "same command to resume")
    jobs.evaluate(config, workdir, out_dir=out_dir, progress=False)


def record(workdir: str, out_dir: str) -> dict | None:
    """A finished run as the leaderboard reads it: {'results': results.json, 'subjects':
    per-volume rows of subjects.csv, 'train_seconds' (None when trained elsewhere),
    'workdir', 'out_dir'}; None when it is not evaluated."""
    results = _read_json(os.path.join(out_dir, "results.json"))
    if results is None:
        return None
    measured = (_read_json(os.path.join(workdir, TIMING_FILE)) or {}).get("train_seconds")
    return {"results": results, "workdir": workdir, "out_dir": out_dir,
            "subjects": _read_subjects(os.path.join(out_dir, "subjects.csv")),
            "train_seconds": measured if measured is not None else logged_train_seconds(workdir),
            "train_seconds_estimated": measured is None}


def logged_train_seconds(workdir: str) -> float | None:
    """Training time of a run trained outside the benchmark, from its logs: for every stage,
    the steps between logged lines x batch size / the logged slices per second (compilation
    included, checkpoints and validation not). None without logs."""
    config = _read_json(os.path.join(workdir, "config.json"))
    if not config:
        return None
    total, found = 0.0, False
    for log in sorted(Path(workdir).glob("*/metrics.jsonl")):
        stage = log.parent.name
        batch = {**config["train"], **(config.get("stage_train") or {}).get(stage, {})}[
            "batch_size"]
        previous = 0
        for line in log.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            if entry.get("split") == "train" and entry.get("slices_per_s"):
                # max(0, .): a resumed run logs steps again from its checkpoint
                total += max(entry["step"] - previous, 0) * batch / entry["slices_per_s"]
                previous, found = entry["step"], True
    return total if found else None


def trained_steps(workdir: str) -> int:
    """Sum over the run's stages of the latest checkpoint step (0 before any training)."""
    total = 0
    for directory in Path(workdir).glob("*/checkpoints"):
        steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()]
        total += max(steps, default=0)
    return total


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _read_subjects(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


class Progress:
    """One line per run: what it is, elapsed time, and an estimate of what remains (the
    mean time of the runs done so far in this invocation times the runs left)."""

    def __init__(self, total: int, stream=None):
        self.total, self.done, self.durations = total, 0, []
        self.start = time.perf_counter()
        self.stream = stream or sys.stdout

    def begin(self, what: str) -> float:
        eta = (f"about {_duration(np.mean(self.durations) * (self.total - self.done))} left"
               if self.durations else "estimating what remains")
        print(f"[{self.done + 1}/{self.total}] {what}: started, "
              f"{_duration(time.perf_counter() - self.start)} elapsed, {eta}",
              file=self.stream, flush=True)
        return time.perf_counter()

    def end(self, what: str, started: float, status: str) -> None:
        took = time.perf_counter() - started
        self.done += 1
        if took > 1.0:  # a run read back from disk says nothing about the time of the others
            self.durations.append(took)
        print(f"[{self.done}/{self.total}] {what}: {status} in {_duration(took)}",
              file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    seconds = round(float(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def run_benchmark(entries: list[Entry], protocol: Protocol, seeds: list[int], root: str, *,
                  stream=None) -> dict:
    """Runs every (entry, seed) not done yet (seed-major, so a partial leaderboard already
    has every method once) and returns {entry key: [record per seed]} plus failures."""
    runnable = [e for e in entries if not e.is_baseline]
    if any(e.is_baseline for e in entries) and not any(e.config == "ddpm" and not
                                                       e.test_modifiers for e in runnable):
        runnable.insert(0, parse_entry("ddpm"))  # the threshold baseline is read from it
    progress = Progress(len(runnable) * len(seeds), stream)
    records: dict[str, list] = {e.key: [] for e in entries}
    failures = []
    for seed, entry in [(seed, entry) for seed in seeds for entry in runnable]:
        what = f"{entry.name()} seed {seed}"
        started = progress.begin(what)
        try:
            record = run_one(entry, protocol, seed, root)
        except TrainingStopped as err:  # preempted: stop here, the rerun resumes
            failures.append(f"{what}: {err}")
            progress.end(what, started, "STOPPED (SIGTERM)")
            break
        except Exception as err:  # noqa: BLE001 - one failed run must not stop the others
            failures.append(f"{what}: {type(err).__name__}: {err}")
            progress.end(what, started, f"FAILED ({type(err).__name__}: {err})")
            continue
        progress.end(what, started, "done")
        if entry.key in records:
            records[entry.key].append(record)
        if entry.key == "ddpm" and "threshold" in records:  # the baseline is scored beside it
            records["threshold"].append(record)
    return {"records": records, "failures": failures}


# ------------------------------------------------------------------------------------------
# Leaderboard.

def _results_of(entry: Entry, record: dict) -> dict:
    res = record["results"]["results"]
    return res.get("threshold" if entry.is_baseline else record["results"]["method"],
                   {"kinds": {}})  # no baseline when eval.baseline is off


def _kinds(records: dict) -> list[str]:
    found = {kind for recs in records.values() for r in recs
             for kind in r["results"]["results"][r["results"]["method"]]["kinds"]}
    return [k for k in KINDS_ORDER if k in found] + sorted(found - set(KINDS_ORDER))


def _mean_std(values) -> dict:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(np.mean(values)),
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, "n": len(values)}


def _kind_metrics(kind_entry: dict) -> dict:
    """The per-volume means of one run for one lesion kind (None where not computed)."""
    val = kind_entry.get("val", {}).get("per_volume", {})
    oracle = kind_entry.get("oracle", {}).get("per_volume", {})
    return {"dice": val.get("dice", {}).get("mean"), "auprc": val.get("ap", {}).get("mean"),
            "auroc": val.get("auroc", {}).get("mean"),
            "dice_oracle": oracle.get("dice", {}).get("mean"),
            "healthy_fp_ml": kind_entry.get("healthy_fp_volume_ml", {}).get("mean")}


def network_evaluations_per_volume(entry: Entry, protocol: Protocol, record: dict) -> float:
    """Forward passes of the method's networks per scored volume (0 for the baseline)."""
    from uadjax.methods import get_method

    if entry.is_baseline:
        return 0.0
    config = build_config(entry, protocol, 0)
    per_slice = sum(get_method(config.method).network_evaluations(config).values())
    timing = record["results"]["timing"]
    return per_slice * timing["slices_scored"] / max(timing["volumes_scored"], 1)


def paired_permutation_p(a: np.ndarray, b: np.ndarray, *, resamples: int = 9999,
                         seed: int = 0) -> float:
    """Two-sided p of the mean paired difference a - b (scipy's permutation test, sign
    flips of the pairs)."""
    from scipy.stats import permutation_test

    if len(a) < 2 or np.allclose(a, b):
        return 1.0
    res = permutation_test((a, b), lambda x, y, axis: np.mean(x - y, axis=axis),
                           permutation_type="samples", n_resamples=resamples,
                           alternative="two-sided", random_state=seed, vectorized=True)
    return float(res.pvalue)


def per_volume_dice(entry: Entry, records: list[dict], kind: str) -> dict[str, float]:
    """subject -> Dice at the validation-selected threshold, averaged over seeds."""
    method = "threshold" if entry.is_baseline else None
    by_subject: dict[str, list] = {}
    for record in records:
        name = method or record["results"]["method"]
        for row in record["subjects"]:
            if row["method"] == name and row["kind"] == kind and row["threshold_source"] == "val":
                by_subject.setdefault(row["subject_id"], []).append(float(row["dice"]))
    return {s: float(np.mean(v)) for s, v in by_subject.items()}


def leaderboard(entries: list[Entry], protocol: Protocol, records: dict,
                datasets: dict | None = None) -> dict:
    """The aggregated leaderboard (JSON-ready): per entry, per kind the metrics' mean ± std
    over seeds, the permutation-test p against the best entry of the kind, the paper's
    number where one applies; reconstruction quality, times and network evaluations."""
    kinds = _kinds(records)
    rows = []
    for entry in entries:
        recs = records.get(entry.key, [])
        if not recs:
            rows.append({"key": entry.key, "label": entry.name(), "seeds": 0})
            continue
        row = {"key": entry.key, "label": entry.name(), "seeds": len(recs),
               "kinds": {}, "reconstruction": None}
        for kind in kinds:
            per_run = [_kind_metrics(_results_of(entry, r)["kinds"].get(kind, {})) for r in recs]
            row["kinds"][kind] = {m: _mean_std([p[m] for p in per_run])
                                  for m in ("dice", "auprc", "auroc", "dice_oracle",
                                            "healthy_fp_ml")}
            paper = paper_number(entry, kind, protocol, datasets)
            if paper:
                row["kinds"][kind]["paper"] = paper
        recon = [r["results"].get("reconstruction") for r in recs]
        if not entry.is_baseline and all(recon):
            row["reconstruction"] = {
                **{k: _mean_std([q["healthy"][k]["mean"] for q in recon])
                   for k in ("ssim", "psnr", "l1")},
                "l1_ratio": {kind: _mean_std([q["l1_ratio"].get(kind) for q in recon])
                             for kind in kinds}}
        if not entry.is_baseline:
            row["train_seconds"] = _mean_std([r["train_seconds"] for r in recs])
            row["train_seconds_estimated"] = any(r.get("train_seconds_estimated") for r in recs)
            row["seconds_per_volume"] = _mean_std(
                [r["results"]["timing"]["seconds_per_volume"] for r in recs])
            row["network_evaluations_per_volume"] = network_evaluations_per_volume(
                entry, protocol, recs[0])
        rows.append(row)
    for kind in kinds:
        scored = [(r, r["kinds"][kind]["dice"]["mean"]) for r in rows
                  if r.get("kinds") and math.isfinite(r["kinds"][kind]["dice"]["mean"])]
        if not scored:
            continue
        best_row = max(scored, key=lambda t: t[1])[0]
        best = per_volume_dice(_entry_of(entries, best_row), records[best_row["key"]], kind)
        for row, _ in scored:
            row["kinds"][kind]["best"] = row is best_row
            if row is best_row:
                continue
            other = per_volume_dice(_entry_of(entries, row), records[row["key"]], kind)
            common = sorted(set(best) & set(other))
            if common:  # no shared test subjects: nothing to pair
                row["kinds"][kind]["p_vs_best"] = paired_permutation_p(
                    np.array([best[s] for s in common]), np.array([other[s] for s in common]))
    return {"protocol": dataclasses.asdict(protocol), "kinds": kinds, "rows": rows}


def _entry_of(entries, row) -> Entry:
    return next(e for e in entries if e.key == row["key"])


def paper_number(entry: Entry, kind: str, protocol: Protocol, datasets: dict | None):
    """{'dice', 'auprc', 'source'} when a seed paper reports `entry` on this kind's dataset
    under the protocol reproduced here (paper size, the dataset's own source), else None."""
    if protocol.size != "paper" or not datasets or entry.key not in PAPER_RESULTS:
        return None
    for dataset in KIND_DATASETS.get(kind, ()):
        for modality in datasets.get("modalities", ()):
            if dataset in datasets.get("kinds", {}).get(kind, ()):
                found = PAPER_RESULTS[entry.key].get((dataset, modality))
                if found:
                    return {"dice": found[0], "auprc": found[1], "source": PAPER_SOURCE}
    return None


def dataset_sources(dataset_dir: str) -> dict | None:
    """{'modalities': [...], 'kinds': {kind: [source dataset, ...]}} of a prepared dataset
    folder's test subjects (None for the phantom)."""
    if not dataset_dir:
        return None
    manifest = _read_json(os.path.join(dataset_dir, "manifest.json")) or {}
    kinds: dict[str, set] = {}
    for subject in manifest.get("subjects", []):
        if subject.get("split") == "test_lesion":
            kinds.setdefault(subject.get("kind"), set()).add(subject.get("source"))
    return {"modalities": manifest.get("modalities", []),
            "kinds": {k: sorted(v) for k, v in kinds.items()}}


def _cell(stat: dict, scale: float = 100.0, digits: int = 1) -> str:
    if not stat or not stat.get("n"):
        return "-"
    mean = scale * stat["mean"]
    if stat["n"] == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def _p_cell(kind_stats: dict) -> str:
    if kind_stats.get("best"):
        return "best"
    p = kind_stats.get("p_vs_best")
    return "-" if p is None else (f"{p:.3f}" if p >= 0.001 else "<0.001")


def to_markdown(board: dict) -> str:
    """Three tables: detection per lesion kind; reconstruction quality; cost."""
    kinds, rows = board["kinds"], [r for r in board["rows"] if r.get("seeds")]
    has_paper = any("paper" in r["kinds"][k] for r in rows for k in kinds)
    head = ["method", "seeds"]
    for kind in kinds:
        head += [f"{kind} Dice", "p", "AUPRC", "AUROC", "Dice (oracle)", "healthy FP ml"]
        head += ["paper Dice / AUPRC"] if has_paper else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], str(r["seeds"])]
        for kind in kinds:
            k = r["kinds"][kind]
            dice = _cell(k["dice"])
            cells += [f"**{dice}**" if k.get("best") else dice, _p_cell(k), _cell(k["auprc"]),
                      _cell(k["auroc"]), _cell(k["dice_oracle"]),
                      _cell(k["healthy_fp_ml"], scale=1.0)]
            if has_paper:
                paper = k.get("paper")
                cells.append(f"{paper['dice']:.1f} / {paper['auprc']:.1f}" if paper else "-")
        lines.append("| " + " | ".join(cells) + " |")
    out = ["### Detection", "\n".join(lines)]
    recon_rows = [r for r in rows if r.get("reconstruction")]
    if recon_rows:
        head = ["method", "SSIM (%)", "PSNR (dB)", "L1 (e-3)"] + [f"L1 ratio {k}" for k in kinds]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in recon_rows:
            q = r["reconstruction"]
            lines.append("| " + " | ".join(
                [r["label"], _cell(q["ssim"]), _cell(q["psnr"], 1.0, 2), _cell(q["l1"], 1000.0, 2)]
                + [_cell(q["l1_ratio"][k], 1.0, 2) for k in kinds]) + " |")
        out += ["### Reconstruction of healthy test subjects", "\n".join(lines)]
    head = ["method", "training (min)", "inference (s / volume)", "network evaluations / volume"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "seconds_per_volume" not in r:
            continue
        approx = "~" if r.get("train_seconds_estimated") and r["train_seconds"]["n"] else ""
        lines.append(f"| {r['label']} | {approx}{_cell(r['train_seconds'], 1 / 60)} | "
                     f"{_cell(r['seconds_per_volume'], 1.0, 2)} | "
                     f"{r['network_evaluations_per_volume']:.0f} |")
    out += ["### Cost", "\n".join(lines)]
    return "\n\n".join(out)


def to_csv(board: dict) -> str:
    """Long format: method, kind ('' for per-method figures), metric, mean, std, n."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["method", "kind", "metric", "mean", "std", "n"])
    for r in board["rows"]:
        if not r.get("seeds"):
            continue
        for kind, stats in r["kinds"].items():
            for metric in ("dice", "auprc", "auroc", "dice_oracle", "healthy_fp_ml"):
                s = stats[metric]
                writer.writerow([r["label"], kind, metric, s["mean"], s["std"], s["n"]])
            if "p_vs_best" in stats:
                writer.writerow([r["label"], kind, "p_vs_best_dice", stats["p_vs_best"], "", ""])
        for metric in ("train_seconds", "seconds_per_volume"):
            if metric in r:
                s = r[metric]
                writer.writerow([r["label"], "", metric, s["mean"], s["std"], s["n"]])
        if "network_evaluations_per_volume" in r:
            writer.writerow([r["label"], "", "network_evaluations_per_volume",
                             r["network_evaluations_per_volume"], "", ""])
        if r.get("reconstruction"):
            for metric in ("ssim", "psnr", "l1"):
                s = r["reconstruction"][metric]
                writer.writerow([r["label"], "", metric, s["mean"], s["std"], s["n"]])
            for kind, s in r["reconstruction"]["l1_ratio"].items():
                writer.writerow([r["label"], kind, "l1_ratio", s["mean"], s["std"], s["n"]])
    return buf.getvalue()


# ------------------------------------------------------------------------------------------
# Figures.

def save_figures(root: str, entries: list[Entry], records: dict, board: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    present = [e for e in entries if records.get(e.key)]
    for kind in board["kinds"]:
        examples = {e.key: _examples(records[e.key][0], kind) for e in present
                    if not e.is_threshold}
        examples = {k: v for k, v in examples.items() if v is not None}
        if examples:
            first = next(iter(examples.values()))
            n = len(first["ids"])
            fig, axes = plt.subplots(len(examples) + 1, n, squeeze=False,
                                     figsize=(max(1.9 * n, 4.0), 1.9 * (len(examples) + 1)))
            for c in range(n):
                axes[0, c].imshow(np.rot90(first["image"][c]), cmap="gray", vmin=0, vmax=1)
                if first["seg"][c].any():
                    axes[0, c].contour(np.rot90(first["seg"][c]), levels=[0.5], colors="lime",
                                       linewidths=0.6)
                axes[0, c].set_title(f"{first['ids'][c]} z={first['slice'][c]}", fontsize=6)
            axes[0, 0].set_ylabel("input + truth", fontsize=7)
            for r, (key, ex) in enumerate(examples.items(), start=1):
                vmax = max(float(np.percentile(ex["score"], 99.5)), 1e-6)
                for c in range(min(n, len(ex["ids"]))):
                    axes[r, c].imshow(np.rot90(ex["score"][c]), cmap="inferno", vmin=0, vmax=vmax)
                axes[r, 0].set_ylabel(_entry_of(entries, {"key": key}).name(), fontsize=7)
            for ax in axes.ravel():
                ax.set_xticks([])
                ax.set_yticks([])
            fig.suptitle(f"anomaly maps, {kind}: the same test subjects across methods", fontsize=8)
            fig.tight_layout()
            written.append(_save(fig, os.path.join(root, f"maps_{kind}.png")))
        fig, ax = plt.subplots(figsize=(4.2, 4.2))
        for e in present:
            curve = _results_of(e, records[e.key][0])["kinds"].get(kind, {}).get("pr_curve")
            if curve is None and e.is_baseline:
                continue
            if curve:
                ax.plot(curve["recall"], curve["precision"], label=e.name(), lw=1)
        ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1))
        ax.set_title(f"pooled in-brain PR curves: {kind} (first seed)", fontsize=8)
        ax.legend(fontsize=6)
        fig.tight_layout()
        written.append(_save(fig, os.path.join(root, f"pr_{kind}.png")))
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for r in board["rows"]:
        if "seconds_per_volume" not in r:
            continue
        dice = [r["kinds"][k]["dice"]["mean"] for k in board["kinds"]]
        dice = [d for d in dice if math.isfinite(d)]
        if dice:
            x, y = r["seconds_per_volume"]["mean"], 100 * float(np.mean(dice))
            ax.scatter(x, y, s=18)
            ax.annotate(r["label"], (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set(xlabel="inference time (s / volume, log)", ylabel="Dice, mean over lesion kinds (%)")
    ax.set_title("speed against accuracy", fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, os.path.join(root, "speed_accuracy.png")))
    return written


def _examples(record: dict, kind: str):
    from uadjax.evaluate import EXAMPLES_FILE

    path = os.path.join(record["out_dir"], EXAMPLES_FILE)
    if not os.path.exists(path):
        return None
    with np.load(path, allow_pickle=False) as data:
        if f"{kind}/ids" not in data:
            return None
        return {name: data[f"{kind}/{name}"] for name in ("ids", "slice", "image", "seg", "score")}


def _save(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path


def machine() -> dict:
    """Where the leaderboard was computed: CPU model and count, accelerators, versions."""
    import platform

    import jax

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cpus": os.cpu_count(), "devices": sorted({str(d.device_kind) for d in
                                                                   jax.devices()}),
            "platform": jax.default_backend(), "jax": jax.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


def write_leaderboard(root: str, entries, protocol, records, *, command: str = "") -> dict:
    """leaderboard.{md,csv,json} and the figures under `root`; returns the board."""
    board = leaderboard(entries, protocol, records, dataset_sources(protocol.dataset_dir))
    board["command"] = command
    board["machine"] = machine()
    if not protocol.dataset_dir:  # the built-in phantom: which generator made it
        from uadjax.data import phantom

        board["phantom_generator"] = phantom.GENERATOR_VERSION
    board["figures"] = [os.path.basename(p) for p in save_figures(root, entries, records, board)]
    atomic.write_json(os.path.join(root, "leaderboard.json"), board)
    atomic.write_text(os.path.join(root, "leaderboard.csv"), to_csv(board))
    figures = "\n\n".join(f"![{name}]({name})" for name in board["figures"])
    atomic.write_text(os.path.join(root, "leaderboard.md"),
                      f"# uadjax leaderboard\n\n{provenance(board)}\n\n{to_markdown(board)}"
                      f"\n\n{LEGEND}\n\n{figures}\n")
    return board


def provenance(board: dict) -> str:
    m = board.get("machine", {})
    devices = ", ".join(m.get("devices", []))
    generator = board.get("phantom_generator")
    data = (f" on the phantom of generator {generator} (docs/phantom.md)"
            if generator is not None else "")
    return (f"`{board.get('command', '')}`: {m.get('cpus')} cores of {m.get('cpu')}, JAX "
            f"{m.get('jax')} on its {m.get('platform')} backend ({devices}), {m.get('date')}"
            f"{data}.")


README_START = "<!-- leaderboard:start (generated by python -m uadjax.benchmark --readme) -->"
README_END = "<!-- leaderboard:end -->"


def publish(root: str, target: str, readme: str | None = None) -> None:
    """Copies the leaderboard and its figures to `target` (e.g. docs/leaderboard, to commit)
    and, with `readme`, replaces the README's generated section (between README_START and
    README_END) by the leaderboard, with figure links relative to the README."""
    import shutil

    board = json.loads(Path(root, "leaderboard.json").read_text(encoding="utf-8"))
    os.makedirs(target, exist_ok=True)
    names = ["leaderboard.md", "leaderboard.csv", "leaderboard.json", *board["figures"]]
    names += [n for n in ("budget_curve.md", "budget_curve.json", "budget_curve.png")
              if os.path.isfile(os.path.join(root, n))]
    for name in names:
        shutil.copyfile(os.path.join(root, name), os.path.join(target, name))
    if not readme:
        return
    text = Path(readme).read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme}: no generated section ({README_START} ... {README_END})")
    rel = os.path.relpath(target, os.path.dirname(os.path.abspath(readme)) or ".")
    figures = " ".join(f"[{name}]({rel}/{name})" for name in board["figures"])
    section = (f"{README_START}\n{provenance(board)} Full leaderboard with figures: "
               f"[{rel}/leaderboard.md]({rel}/leaderboard.md) (CSV and JSON beside it).\n\n"
               f"{to_markdown(board)}\n\n{LEGEND}\n\n"
               f"![speed against accuracy]({rel}/speed_accuracy.png)\n\nFigures: {figures}\n"
               f"{README_END}")
    head, rest = text.split(README_START, 1)
    atomic.write_text(readme, head + section + rest.split(README_END, 1)[1])


LEGEND = (
    "Per-volume means, then mean ± std over seeds, in percent (FP in ml, PSNR in dB). Dice "
    "and AUPRC at the threshold selected on the lesion-validation volumes of each kind; "
    "`Dice (oracle)` at the best threshold on the test volumes themselves (not a fair "
    "score, for comparison with papers that report it); healthy FP = false-positive volume "
    "on healthy test subjects at the validation threshold. p: paired permutation test of "
    "per-volume Dice (seed-averaged) against the best method of the lesion kind (bold). "
    "Reconstruction: SSIM, PSNR, L1 inside the brain on healthy test subjects; L1 ratio = "
    "L1 on the kind's test subjects / L1 on healthy ones (cDDPM Table 2). Inference time: "
    "wall time of scoring per volume (data loading included, compilation not); training "
    "time marked ~ is estimated from the training logs of a run trained before the "
    "benchmark (steps x batch / logged slices per second).")


# ------------------------------------------------------------------------------------------
# Budget curve.

def protocol_steps(entry: Entry, protocol: Protocol) -> int:
    """Training steps per stage of `entry` under `protocol` (0 for the baseline)."""
    if entry.is_threshold:
        return 0
    return int(build_config(entry, protocol, 0).train.num_steps)


def budget_curve(entries: list[Entry], by_budget: dict) -> dict:
    """{'rows': one per (method, budget, lesion kind): steps, seeds and the mean ± std over
    seeds of per-volume Dice and AUPRC at the validation-selected threshold}."""
    rows = []
    for protocol, records in by_budget.items():
        kinds = _kinds(records)
        for entry in entries:
            recs = records.get(entry.key, [])
            for kind in kinds:
                metrics = [_kind_metrics(_results_of(entry, r)["kinds"][kind]) for r in recs
                           if kind in _results_of(entry, r)["kinds"]]
                if not metrics:
                    continue
                rows.append({"method": entry.name(), "budget": protocol.budget or "full",
                             "steps": protocol_steps(entry, protocol), "kind": kind,
                             "seeds": len(metrics),
                             "dice": _mean_std(m["dice"] for m in metrics),
                             "auprc": _mean_std(m["auprc"] for m in metrics)})
    return {"rows": rows}


def budget_curve_markdown(curve: dict) -> str:
    lines = ["| method | lesion | budget | steps per stage | seeds | Dice | AUPRC |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(curve["rows"], key=lambda r: (r["method"], r["kind"], r["steps"])):
        lines.append(f"| {r['method']} | {r['kind']} | {r['budget']} | {r['steps']} | "
                     f"{r['seeds']} | {_cell(r['dice'])} | {_cell(r['auprc'])} |")
    return "\n".join(lines)


def save_budget_figure(root: str, curve: dict) -> str:
    """budget_curve.png: Dice and AUPRC against steps, one line per method, per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in KINDS_ORDER if any(r["kind"] == k for r in curve["rows"])]
    fig, axes = plt.subplots(2, max(len(kinds), 1), figsize=(4.2 * max(len(kinds), 1), 6.5),
                             squeeze=False)
    methods = sorted({r["method"] for r in curve["rows"]})
    for col, kind in enumerate(kinds):
        for row, metric in enumerate(("dice", "auprc")):
            ax = axes[row, col]
            for method in methods:
                pts = sorted((r["steps"], 100 * r[metric]["mean"], 100 * r[metric]["std"])
                             for r in curve["rows"] if r["method"] == method
                             and r["kind"] == kind)
                if not pts:
                    continue
                steps, mean, std = (np.array(v) for v in zip(*pts))
                if (steps == 0).all():  # the baseline: no training, a level line
                    ax.axhline(mean[0], ls="--", lw=1, color="grey", label=method)
                    continue
                ax.errorbar(steps, mean, yerr=std, marker="o", capsize=2, label=method)
            ax.set_xscale("log")
            ax.set_title(f"{kind}: {'Dice' if metric == 'dice' else 'AUPRC'} (%)", fontsize=9)
            ax.set_xlabel("training steps per stage")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, os.path.join(root, "budget_curve.png"))


def write_budget_curve(root: str, entries, by_budget: dict, *, command: str = "") -> dict:
    """budget_curve.{json,md,png} under `root`."""
    curve = budget_curve(entries, by_budget)
    curve["command"] = command
    if not next(iter(by_budget)).dataset_dir:
        from uadjax.data import phantom

        curve["phantom_generator"] = phantom.GENERATOR_VERSION
    atomic.write_json(os.path.join(root, "budget_curve.json"), curve)
    if curve["rows"]:
        save_budget_figure(root, curve)
    atomic.write_text(os.path.join(root, "budget_curve.md"),
                      f"# Budget curve\n\n`{command}`\n\n{budget_curve_markdown(curve)}\n\n"
                      "Per-volume means at the validation-selected threshold, mean ± std "
                      "over seeds, in percent.\n\n![budget curve](budget_curve.png)\n")
    return curve


def main(argv=None) -> int:
    xla_flags.set_cpu_flags()
    parser = argparse.ArgumentParser(
        prog="python -m uadjax.benchmark",
        description="Train, evaluate and rank methods on one dataset over seeds.")
    parser.add_argument("--methods", default="all", help="'all' or a comma list: ddpm, "
                        "ddpm+ens, pddpm, cddpm, mmccd:cyclic, threshold, ...")
    parser.add_argument("--size", default="cpu", choices=("paper", "cpu", "tiny"))
    parser.add_argument("--budget", default="short",
                        help="'short' (300 steps per stage), 'medium' (1,000), 'long' "
                        "(3,000) or 'full' (the config's own), or a comma list: the "
                        "leaderboard is the first budget's, and a list adds the budget "
                        "curve (budget_curve.{md,json,png})")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--root", default="runs/benchmark")
    parser.add_argument("--dataset_dir", default="", help="prepared NIfTI dataset folder "
                        "(default: the built-in phantom)")
    parser.add_argument("--data_dir", default="", help="shard folder (default: the config's)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run, e.g. eval.batch_size=32")
    parser.add_argument("--aggregate_only", action="store_true",
                        help="only rebuild the leaderboard from finished runs")
    parser.add_argument("--publish", default="", help="also copy the leaderboard and its "
                        "figures to this folder (e.g. docs/leaderboard)")
    parser.add_argument("--readme", default="", help="with --publish: regenerate this "
                        "README's leaderboard section")
    args = parser.parse_args(argv)
    try:
        entries = parse_entries(args.methods)
        overrides = tuple(tuple(o.split("=", 1)) for o in args.override)
        if any(len(o) != 2 for o in overrides):
            raise ValueError("--override takes KEY=VALUE")
        budgets = [b.strip() for b in args.budget.split(",") if b.strip()]
        if not budgets or len(set(budgets)) != len(budgets):
            raise ValueError(f"--budget {args.budget!r}: give distinct budgets")
        protocols = [Protocol(size=args.size, budget="" if b == "full" else b,
                              dataset_dir=args.dataset_dir, data_dir=args.data_dir,
                              overrides=overrides) for b in budgets]
        protocol = protocols[0]
        entries = with_threshold_rows(entries, protocol)
        seeds = [int(s) for s in args.seeds.split(",")]
        for entry in entries:  # bad modifiers or overrides: refuse before any run starts
            for p in protocols:
                build_config(entry, p, seeds[0])
    except (ValueError, KeyError, AttributeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    os.makedirs(args.root, exist_ok=True)
    given = argv if argv is not None else sys.argv[1:]
    command = "python -m uadjax.benchmark " + " ".join(  # the flags that shape the runs
        a for a in given if not a.startswith(("--aggregate_only", "--publish", "--readme")))
    by_budget, failures = {}, []
    for p in protocols:
        if args.aggregate_only:
            by_budget[p] = collect(entries, p, seeds, args.root)
        else:
            out = run_benchmark(entries, p, seeds, args.root)
            by_budget[p] = out["records"]
            failures += out["failures"]
    records = by_budget[protocol]
    if len(protocols) > 1:
        write_budget_curve(args.root, entries, by_budget, command=command)
    if not any(records.values()):
        print("error: no run finished; nothing to rank", file=sys.stderr)
        for failure in failures:
            print(f"  FAILED {failure}", file=sys.stderr)
        return 2
    write_leaderboard(args.root, entries, protocol, records, command=command)
    if args.publish:
        publish(args.root, args.publish, args.readme or None)
    print((Path(args.root) / "leaderboard.md").read_text(encoding="utf-8"))
    for failure in failures:
        print(f"FAILED {failure}")
    return 1 if failures else 0


def collect(entries, protocol, seeds, root) -> dict:
    """Records of the finished runs only (nothing is trained or evaluated)."""
    records = {e.key: [] for e in entries}
    for entry in entries:
        source = parse_entry("ddpm") if entry.is_baseline else entry
        for seed in seeds:
            workdir = run_dir(root, source, protocol, seed)
            found = record(workdir, eval_dir(workdir, source))
            if found is not None:
                records[entry.key].append(found)
    return records


if __name__ == "__main__":
    sys.exit(main())
