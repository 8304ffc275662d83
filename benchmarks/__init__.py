"""Benchmark scripts (`python -m benchmarks.<name>`): they print figures (docs/performance.md)."""

from uadjax import xla_flags as _xla_flags

_xla_flags.set_cpu_flags()  # as the CLI: the figures are measured with the flags it uses
