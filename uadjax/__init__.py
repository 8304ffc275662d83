"""uadjax: unsupervised anomaly detection in brain MRI with diffusion models (JAX/Flax)."""

__version__ = "0.1.0"
