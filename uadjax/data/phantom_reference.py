"""Published measurements the phantom is calibrated against (docs/phantom.md names each).

One place for every anchor: the calibration benchmark prints the phantom beside them and
the tests check the generator's draws against them.
"""

from __future__ import annotations

# FLAIR intensity thresholding, best possible Dice (threshold chosen on the test set, Dice
# pooled over all test voxels): Meissen, Kaissis & Rueckert, BrainLes 2021, Table 2.
# target: the band the default phantom must land in, per evaluation grid (mm).
THRESHOLD_TARGETS = {
    ("tumour", "flair"): {"dataset": "BraTS", "published": 0.738,
                          "target": {2: (0.64, 0.84), 3: (0.64, 0.84)}},
    ("ms", "flair"): {"dataset": "MSLUB", "published": 0.613, "target": {2: (0.50, 0.72)}},
}

ANCHORS = {
    "tumour": {"volume_ml_text": "-"},
    "ms": {"volume_ml_text": "-", "count_text": "-"},
    "stroke": {"volume_ml_text": "-"},
}
