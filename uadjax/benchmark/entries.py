"""Benchmark entries and protocol: what one leaderboard row trains and how its run is named.

An entry is `<config>[:<training modifiers>][+<test-time modifiers>]` (`ddpm`, `ddpm+ens`,
`mmccd:cyclic`); a protocol is what every run of one benchmark shares (size, budget,
dataset, overrides). `--methods=all` is `configs/benchmark.py`'s METHODS.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os

from configs import benchmark as benchmark_config

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
    def is_threshold(self) -> bool:
        """An intensity-threshold row (`threshold`, `threshold:<modality>`): an ordinary
        method with no training stage."""
        return self.config == "threshold"

    def name(self) -> str:
        return self.label or self.key


# The `--methods=all` list, in leaderboard order (configs/benchmark.py).
ENTRIES = tuple(Entry(**m) for m in benchmark_config.METHODS)


def parse_entry(text: str) -> Entry:
    """'ddpm', 'ddpm+ens', 'mmccd:cyclic', 'disyre:1mm+multistep' -> Entry (labels of the
    known keys are reused)."""
    known = {e.key: e for e in ENTRIES}
    if text in known:
        return known[text]
    head, _, test = text.partition("+")
    config, _, train = head.partition(":")
    if not config.isidentifier() or importlib.util.find_spec(f"configs.{config}") is None:
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
    threshold, not only the T2 one). `threshold` thresholds its config's modality (T2)."""
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


def protocol_steps(entry: Entry, protocol: Protocol) -> int:
    """Training steps per stage of `entry` under `protocol` (0 for the baseline)."""
    if entry.is_threshold:
        return 0
    return int(build_config(entry, protocol, 0).train.num_steps)
