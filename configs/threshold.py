"""Intensity-threshold baseline: the normalised intensity is the anomaly score (no training).

Usage: --config=configs/threshold.py:<size>[,t1|t2|pd|flair]
  a modality modifier thresholds that modality (default: the size's, T2); the benchmark
  adds one such row for every modality a listed method reads (MMCCD: FLAIR).
"""

from __future__ import annotations

from configs import common

MODALITIES = ("t1", "t2", "pd", "flair")


def get_config(arg: str | None = None):
    size, modifiers = common.parse_variant(arg, "threshold", MODALITIES)
    config = common.base_config(size)
    config.method = "threshold"
    chosen = [m for m in MODALITIES if m in modifiers]
    if len(chosen) > 1:
        raise ValueError(f"threshold config: one modality of {MODALITIES}, not {chosen}")
    if chosen:
        config.data.modalities = (chosen[0],)
    common.apply_common_modifiers(config, modifiers)
    config.threshold_channels = None   # None = mean over all modalities
    config.eval.baseline = False       # this is the baseline
    return config
