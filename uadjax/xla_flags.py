"""XLA:CPU flags that the entry points set before JAX starts (importing uadjax sets none)."""

from __future__ import annotations

import os

# XLA:CPU convolution back end. By default (jaxlib 0.10) XLA hands convolutions to YNNPACK;
# on the UNets of this project oneDNN is faster: the CPU-config DDPM UNet (64x64, batch 16,
# 2 cores) forward 182 -> 142 ms and train step 685 -> 537 ms (benchmarks/unet_speed.py).
# Only `xla_cpu_*` flags, so GPU and TPU runs are unaffected. Set UADJAX_XLA_CPU_DEFAULTS=0
# to keep XLA's own choice; flags already in XLA_FLAGS win. The entry points call
# `set_cpu_flags` before JAX starts its CPU backend: the CLI (`uadjax.main`), the benchmark
# command, the benchmark scripts (benchmarks/__init__.py) and the tests (conftest.py). A
# library user's process keeps XLA's defaults unless it calls it.
XLA_CPU_FLAGS = (
    "--xla_cpu_experimental_ynn_fusion_type=",
    ("--xla_cpu_experimental_onednn_fusion_type="
     "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"),
)


# The flags are experimental and an unknown XLA flag aborts the process: only jaxlib
# versions on which they were measured get them.
XLA_CPU_FLAGS_JAXLIB = ("0.10.",)


def set_cpu_flags() -> None:
    """Adds `XLA_CPU_FLAGS` to XLA_FLAGS (flags already there win); no-op on other jaxlib
    versions or with UADJAX_XLA_CPU_DEFAULTS=0. Call before JAX starts its CPU backend."""
    if os.environ.get("UADJAX_XLA_CPU_DEFAULTS", "1") == "0":
        return
    from importlib import metadata

    try:
        jaxlib = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return
    if not jaxlib.startswith(XLA_CPU_FLAGS_JAXLIB):
        return
    current = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in XLA_CPU_FLAGS if f.split("=", 1)[0] not in current]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()

