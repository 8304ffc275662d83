"""Progress reporting: a tqdm bar on a terminal, plain periodic lines in logs.

A tqdm bar redraws itself with carriage returns; written to a file (a job's log, CI) that is
thousands of frames. `progress_bar` returns tqdm when stderr is a terminal, and otherwise a
`LogProgress` that prints one line every `interval` seconds and one at the end.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


class LogProgress:
    """The part of tqdm's interface uadjax uses (iteration, update, set_postfix, close),
    printed as lines such as `train/diffusion: 300/1000 (30 %), 2m05s, 2.4 it/s, 4m50s left,
    loss=0.0312`."""

    def __init__(self, iterable=None, *, total=None, initial: int = 0, desc: str = "",
                 unit: str = "it", interval: float = LOG_INTERVAL_S, file=None, **_ignored):
        self.iterable = iterable
        self.total = total if total is not None else (
            len(iterable) if hasattr(iterable, "__len__") else None)
        self.n = self.initial = int(initial)
        self.desc, self.unit, self.interval = desc, unit, float(interval)
        self.file = file or sys.stderr
        self.postfix: dict = {}
        self.start = self.last = time.monotonic()
        self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def set_postfix(self, **values) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.interval:
            self._print()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._print()

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "")]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f} %)"
        parts.append(_duration(elapsed))
        parts.append(f"{rate:.3g} {self.unit}/s")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"{_duration((self.total - self.n) / rate)} left")
        if self.postfix:
            parts.append(" ".join(f"{k}={v}" for k, v in self.postfix.items()))
        return ", ".join(parts)

    def _print(self) -> None:
        self.last = time.monotonic()
        print(self.line(), file=self.file, flush=True)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def progress_bar(iterable=None, *, disable: bool = False, **kwargs):
    """tqdm(iterable, **kwargs) on a terminal; `LogProgress` when stderr is not one; a
    disabled tqdm when `disable`."""
    if disable or sys.stderr.isatty():
        return tqdm(iterable, disable=disable, **kwargs)
    return LogProgress(iterable, **kwargs)
