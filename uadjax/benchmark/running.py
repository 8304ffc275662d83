"""Running a benchmark: train (resuming) and evaluate every entry and seed, read results back."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from uadjax import atomic
from uadjax.benchmark.entries import (
    PROTOCOL_FILE,
    TIMING_FILE,
    Entry,
    Protocol,
    build_config,
    eval_dir,
    run_dir,
)
from uadjax.results import RESULTS_FILE, EvaluationResults


class TrainingStopped(RuntimeError):
    """Training stopped before its last step (SIGTERM): the benchmark stops too."""


def check_protocol(workdir: str, protocol: Protocol) -> None:
    """Records the dataset and overrides a run folder was made with, and refuses to reuse it
    under others (its results and checkpoints belong to that protocol)."""
    path = os.path.join(workdir, PROTOCOL_FILE)
    current = {"dataset_dir": protocol.dataset_dir, "data_dir": protocol.data_dir,
               "overrides": [list(o) for o in protocol.overrides]}
    saved = read_json(path)
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
        timing = read_json(timing_path) or {}
        timing["train_seconds"] = (timing.get("train_seconds") or 0.0) + (
            time.perf_counter() - start)
        atomic.write_json(timing_path, timing)
    if not finished:
        raise TrainingStopped(f"training of {workdir} stopped early (SIGTERM); rerun the "
                              "same command to resume")
    jobs.evaluate(config, workdir, out_dir=out_dir, progress=False)


def record(workdir: str, out_dir: str) -> dict | None:
    """A finished run as the leaderboard reads it: {'results': its EvaluationResults, 'subjects':
    per-volume rows of subjects.csv, 'train_seconds' (None when trained elsewhere),
    'workdir', 'out_dir'}; None when it is not evaluated."""
    path = os.path.join(out_dir, RESULTS_FILE)
    if not os.path.exists(path):
        return None
    results = EvaluationResults.load(path)  # ResultsError: the file and the problem
    measured = (read_json(os.path.join(workdir, TIMING_FILE)) or {}).get("train_seconds")
    return {"results": results, "workdir": workdir, "out_dir": out_dir,
            "subjects": _read_subjects(os.path.join(out_dir, "subjects.csv")),
            "train_seconds": measured if measured is not None else logged_train_seconds(workdir),
            "train_seconds_estimated": measured is None}


def logged_train_seconds(workdir: str) -> float | None:
    """Training time of a run trained outside the benchmark, from its logs: for every stage,
    the steps between logged lines x batch size / the logged slices per second (compilation
    included, checkpoints and validation not). None without logs."""
    config = read_json(os.path.join(workdir, "config.json"))
    if not config:
        return None
    total, found = 0.0, False
    for log in sorted(Path(workdir).glob("*/metrics.jsonl")):
        stage = log.parent.name
        batch = {**config["train"], **(config.get("stage_train") or {}).get(stage, {}),
                 **(config.get("stage_statistics") or {}).get(stage, {})}["batch_size"]
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


def read_json(path):
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
    runnable = list(entries)
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
        records[entry.key].append(record)
    return {"records": records, "failures": failures}


def collect(entries, protocol, seeds, root) -> dict:
    """Records of the finished runs only (nothing is trained or evaluated)."""
    records = {e.key: [] for e in entries}
    for entry in entries:
        for seed in seeds:
            workdir = run_dir(root, entry, protocol, seed)
            found = record(workdir, eval_dir(workdir, entry))
            if found is not None:
                records[entry.key].append(found)
    return records
