"""The public Python API (uadjax/api.py): its surface, `run.score` against `predict`'s files,
the sharded batch scorer and its overrides, typed results, errors, and the README example."""

import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import uadjax
from uadjax import api, jobs, parallel, prediction
from uadjax.data import builder, pipeline
from uadjax.inference.scoring import make_batch_scorer
from uadjax.results import EvaluationResults

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = ["CheckpointError", "DataError", "EvaluationResults", "PredictReport", "Run",
          "ScanMaps", "evaluate", "load_run", "phantom", "predict", "prepare", "run_all",
          "train"]


def test_the_public_surface_is_pinned():
    assert uadjax.__all__ == api.__all__ == PUBLIC
    for name in PUBLIC:
        assert getattr(uadjax, name) is getattr(api, name)
    with pytest.raises(AttributeError, match="no attribute 'with_overrides'"):
        uadjax.with_overrides  # noqa: B018 - public only through uadjax.api


def _test_subject(config, kind="tumour"):
    root = jobs.dataset_dir(config)
    manifest = json.loads((root / "manifest.json").read_text())
    sid = next(s["id"] for s in manifest["subjects"]
               if s["split"] == "test_lesion" and s["kind"] == kind)
    return root / sid / sid


@pytest.fixture(scope="module")
def run(tiny_run):
    return uadjax.load_run(tiny_run.workdir)


def test_run_score_equals_the_files_predict_writes(run, tiny_run, tmp_path):
    subject = _test_subject(tiny_run)
    scan = nib.load(f"{subject}_t2.nii.gz")
    report = uadjax.predict(tiny_run.workdir, f"{subject}_t2.nii.gz", str(tmp_path),
                            progress=False)
    assert report.ok and report.scans_written == 1
    maps = run.score(scan)
    name = Path(subject).name + "_t2"
    for kind, array in (("anomaly", maps.anomaly), ("segmentation", maps.segmentation)):
        written = nib.load(str(tmp_path / f"{name}_{kind}.nii.gz"))
        np.testing.assert_array_equal(np.asarray(written.dataobj), array)
        np.testing.assert_allclose(written.affine, maps.affine)
    assert maps.anomaly.shape == scan.shape and maps.anomaly.max() > 0
    assert maps.reconstruction.shape == (*scan.shape, 1)
    assert maps.threshold == run.threshold == run.calibration["threshold"]
    # A bare array with its affine, and a 4D array [X, Y, Z, M], are the same scan.
    data = np.asarray(scan.dataobj, np.float32)
    np.testing.assert_array_equal(run.score(data, affine=scan.affine).anomaly, maps.anomaly)
    np.testing.assert_array_equal(run.score({"t2": data[..., None]}, affine=scan.affine)
                                  .segmentation, maps.segmentation)


def test_run_score_errors_name_the_input(run):
    bad = np.zeros((20, 20, 20), np.float32)
    bad[5, 5, 5] = np.nan
    with pytest.raises(uadjax.DataError, match=r"<t2 array>: 1 NaN/Inf voxels"):
        run.score(bad)
    with pytest.raises(uadjax.DataError, match="missing modalities"):
        run.score({"flair": np.ones((20, 20, 20))})
    with pytest.raises(uadjax.DataError, match="<brain_mask array>: shape"):
        run.score(np.ones((20, 20, 20)), brain_mask=np.ones((10, 10, 10)))
    with pytest.raises(FileNotFoundError, match="not a trained run"):
        uadjax.load_run("/nonexistent/run")


def test_score_slices_is_the_evaluation_scorer_sharded_with_config_overrides(run, tiny_run):
    config = run.config
    source = builder.load_split(config.data.data_dir, config.data, "test_lesion")
    batch = next(iter(pipeline.make_eval_batches(source, batch_size=5)))  # 5: padded to 8
    assert parallel.make_mesh().size == 8
    out = run.score_slices(batch, batch_index=3)
    assert out["score"].shape == (5, *config.data.image_size)
    # The reference: the evaluation's scorer on one device, the same key.
    single = make_batch_scorer(run.method.score_fn, run.models, config, parallel.make_mesh(1),
                               seed=config.eval.seed)
    padded = {k: np.concatenate([v, np.zeros_like(v[:3])]) for k, v in batch.items()}
    reference = single(padded, 3)
    np.testing.assert_allclose(out["score"], reference["score"][:5], rtol=1e-5, atol=1e-6)
    # A test-time override is a config change: it equals a run whose config says so.
    t = config.diffusion.num_timesteps // 4
    overridden = run.score_slices(batch, overrides={"diffusion.test_timesteps": (t,)},
                                  batch_index=3)
    changed = config.copy_and_resolve_references()
    changed.diffusion.test_timesteps = (t,)
    expected = make_batch_scorer(run.method.score_fn, run.models, changed,
                                 parallel.make_mesh(1), seed=config.eval.seed)(padded, 3)
    np.testing.assert_allclose(overridden["score"], expected["score"][:5], rtol=1e-5,
                               atol=1e-6)
    assert not np.allclose(overridden["score"], out["score"])
    with pytest.raises(ValueError, match="defines the trained networks"):
        run.score_slices(batch, overrides={"model.base_channels": 4})
    with pytest.raises(ValueError, match="no key 'nope'"):
        run.score_slices(batch, overrides={"diffusion.nope": 1})


def test_evaluate_returns_typed_results(tiny_run, tmp_path):
    results = uadjax.evaluate(tiny_run, tiny_run.workdir, out_dir=str(tmp_path / "eval"),
                              progress=False)
    assert isinstance(results, EvaluationResults) and results.method == "ddpm"
    on_disk = EvaluationResults.load(tmp_path / "eval" / "results.json")
    assert results.of().kinds.keys() == on_disk.of().kinds.keys()
    assert results.to_json()["results"] == on_disk.to_json()["results"]


def test_the_readme_notebook_example_runs(tiny_run, tmp_path, monkeypatch):
    """The README's example, with the tiny run and phantom in place of the main job's."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- api-example -->\n```python\n(.*?)```\n<!-- /api-example -->",
                      text, re.S)
    assert block, "README lost its api-example block"
    code = block.group(1)
    assert len(code.strip().splitlines()) <= 15
    subject = _test_subject(tiny_run)
    code = code.replace('"runs/main"', repr(tiny_run.workdir))
    code = code.replace('".cache/phantom/default-seed0/sub-0069/sub-0069"', repr(str(subject)))
    assert repr(str(subject)) in code and repr(tiny_run.workdir) in code
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    namespace = {}
    exec(compile(code, "README.md:api-example", "exec"), namespace)  # noqa: S102 - our README
    assert os.path.getsize(tmp_path / "example.png") > 5000
    maps = namespace["maps"]
    assert isinstance(maps, prediction.ScanMaps) and maps.anomaly.shape == namespace[
        "truth"].shape
