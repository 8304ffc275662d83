"""Training logs without TensorFlow: JSON lines plus TensorBoard event files (tensorboardX)."""

from __future__ import annotations

import json
import math
import os


class MetricWriter:
    """Appends `{"step": s, "split": ..., name: value}` lines to `metrics.jsonl` and writes
    the same scalars as TensorBoard events under `tb/`."""

    def __init__(self, directory: str, *, tensorboard: bool = True, enabled: bool | None = None):
        """`enabled` defaults to "this is process 0": the metrics are global (computed on
        the global batch), so one process of a multi-host run writes them."""
        if enabled is None:
            import jax

            enabled = jax.process_index() == 0
        self.path = os.path.join(directory, "metrics.jsonl")
        self._file = self._tb = None
        if not enabled:
            return
        os.makedirs(directory, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(directory, "tb"))

    def write(self, step: int, metrics: dict, *, split: str = "train") -> None:
        if self._file is None:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        record = {"step": int(step), "split": split,
                  **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in clean.items():
                self._tb.add_scalar(f"{split}/{name}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
