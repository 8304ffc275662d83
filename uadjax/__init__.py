"""uadjax: unsupervised anomaly detection in brain MRI with diffusion models (JAX/Flax)."""

import os as _os

__version__ = "0.1.0"

# XLA:CPU convolution back end. By default (jaxlib 0.10) XLA hands convolutions to YNNPACK;
# on the UNets of this project oneDNN is faster: the CPU-config DDPM UNet (64x64, batch 16,
# 2 cores) forward 182 -> 142 ms and train step 685 -> 537 ms (benchmarks/unet_speed.py).
# Only `xla_cpu_*` flags, so GPU and TPU runs are unaffected. Set UADJAX_XLA_CPU_DEFAULTS=0
# to keep XLA's own choice; flags already in XLA_FLAGS win. Must run before JAX starts its
# CPU backend, hence here: importing any part of uadjax sets it.
XLA_CPU_FLAGS = (
    "--xla_cpu_experimental_ynn_fusion_type=",
    ("--xla_cpu_experimental_onednn_fusion_type="
     "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"),
)


# The flags are experimental and an unknown XLA flag aborts the process: only jaxlib
# versions on which they were measured get them.
XLA_CPU_FLAGS_JAXLIB = ("0.10.",)


def _set_xla_cpu_flags() -> None:
    if _os.environ.get("UADJAX_XLA_CPU_DEFAULTS", "1") == "0":
        return
    from importlib import metadata

    try:
        jaxlib = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return
    if not jaxlib.startswith(XLA_CPU_FLAGS_JAXLIB):
        return
    current = _os.environ.get("XLA_FLAGS", "")
    extra = [f for f in XLA_CPU_FLAGS if f.split("=", 1)[0] not in current]
    if extra:
        _os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()


_set_xla_cpu_flags()
