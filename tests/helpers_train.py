"""Training-data wrappers for fault tests."""

import numpy as np


class NanBatches:
    """The wrapped training iterator, with NaN images in the batches whose index (0-based)
    satisfies `bad`; keeps the iterator's checkpointable state."""

    def __init__(self, it, bad):
        self.it, self.bad, self.count = it, bad, 0

    def __next__(self):
        batch = dict(next(self.it))
        if self.bad(self.count):
            batch["image"] = np.full_like(batch["image"], np.nan)
        self.count += 1
        return batch

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)
