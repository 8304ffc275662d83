"""Intensity-threshold baseline: the normalised intensity is the anomaly score (no training).

Usage: --config=configs/threshold.py:<size>[,flair]
"""

from __future__ import annotations

from configs import common


def get_config(arg: str | None = None):
    size, modifiers = common.split_variant(arg)
    config = common.base_config(size)
    config.method = "threshold"
    if "flair" in modifiers:
        config.data.modalities = ("flair",)
    config.threshold_channels = None   # None = mean over all modalities
    config.eval.baseline = False       # this is the baseline
    return config
