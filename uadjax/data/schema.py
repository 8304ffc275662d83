"""Names shared by every part of the data path: modalities, splits, lesion kinds, record keys.

Data travels one way: NIfTI volumes -> preprocessed volumes -> slice records -> batches.
A slice record (one axial slice of one subject) holds:

  image        [H, W, M] float32   normalised intensities, M modalities in the builder's order
  brain_mask   [H, W]    uint8     1 inside the brain
  seg          [H, W]    uint8     1 inside a lesion (all zeros for healthy subjects)
  subject_id   str
  slice_index  int32               index of the slice in the preprocessed volume
  kind         str                 'healthy' or a lesion kind

Batches from the grain pipelines carry the same keys with a leading batch axis.
"""

from __future__ import annotations

MODALITIES = ("t1", "t1ce", "t2", "pd", "flair")  # t1ce: contrast-enhanced T1 (BraTS)
# Lesion kinds of real datasets; 'wmh': white matter hyperintensities (WMH challenge).
LESION_KINDS = ("tumour", "ms", "stroke", "wmh")
PHANTOM_LESION_KINDS = ("tumour", "ms", "stroke")  # what the built-in phantom can simulate
HEALTHY = "healthy"

# Subject-level splits written by the phantom and by the dataset adapters.
TRAIN = "train"
VAL_HEALTHY = "val_healthy"
VAL_LESION = "val_lesion"
TEST_LESION = "test_lesion"
TEST_HEALTHY = "test_healthy"
SPLITS = (TRAIN, VAL_HEALTHY, VAL_LESION, TEST_LESION, TEST_HEALTHY)

RECORD_KEYS = ("image", "brain_mask", "seg", "subject_id", "slice_index", "kind")


class DataError(ValueError):
    """Bad input data: always names the file (or subject) and the problem."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
