"""uadjax: unsupervised anomaly detection in brain MRI with diffusion models (JAX/Flax).

The public Python API (`uadjax/api.py`, docs/api.md) is re-exported here and imported on
first use, so `import uadjax` stays light (entry points set XLA flags before JAX starts):

    run = uadjax.load_run("runs/main"); maps = run.score(nib.load("scan.nii.gz"))
"""

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "DataError", "EvaluationResults", "PredictReport", "Run", "ScanMaps",
    "evaluate", "load_run", "phantom", "predict", "prepare", "run_all", "train",
]


def __getattr__(name: str):
    if name in __all__:
        from uadjax import api

        return getattr(api, name)
    raise AttributeError(f"module 'uadjax' has no attribute {name!r}")
