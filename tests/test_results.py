"""The typed results schema: what the evaluation writes loads back equal, old files load,
a renamed or missing key fails naming the file and the key (issue 23, seam 2)."""

import copy
import json

import numpy as np
import pytest
from test_evaluate import _eval_cfg, _splits

from uadjax import protocol
from uadjax.results import SCHEMA_VERSION, EvaluationResults, ResultsError


def _summary():
    """A results.json as `evaluation.run_evaluation` builds it, from the real protocol."""
    rng = np.random.default_rng(0)
    splits = _splits(lambda seg: seg.astype(np.float32) * 0.6 + 0.2 * rng.random(seg.shape),
                     rng)
    res, _ = protocol.evaluate_scores(splits, _eval_cfg(), spacing=(1, 1, 1))
    res["kinds"]["tumour"]["pr_curve"] = {"precision": [1.0, 0.5], "recall": [0.0, 1.0]}
    return {"method": "ddpm", "modalities": ["t2"],
            "checkpoints": {"diffusion": {"step": 5, "latest_step": 5, "fell_back": False,
                                          "trained_steps": 5, "num_steps": 5}},
            "reconstruction": None, "spacing_mm": [[1.0, 1.0, 1.0]],
            "results": {"ddpm": res, "threshold": copy.deepcopy(res)},
            "calibration": {"threshold": 0.5},
            "timing": {"score_seconds": 1.0, "compile_seconds": 0.5, "slices_scored": 64,
                       "slices_per_second": 64.0, "volumes_scored": 8,
                       "seconds_per_volume": 0.125, "metric_seconds": {"ddpm": 0.1}},
            "schema_version": SCHEMA_VERSION}


def test_round_trip_keeps_every_field_and_its_order(tmp_path):
    summary = _summary()
    results = EvaluationResults.from_json(summary)
    path = tmp_path / "results.json"
    results.save(path)
    on_disk = json.loads(path.read_text())
    assert on_disk == json.loads(json.dumps(summary))
    kind = json.loads(json.dumps(summary))["results"]["ddpm"]["kinds"]["tumour"]
    assert list(on_disk["results"]["ddpm"]["kinds"]["tumour"]) == list(kind)
    loaded = EvaluationResults.load(path)
    assert loaded == results
    tumour = loaded.of().kinds["tumour"]
    expected = summary["results"]["ddpm"]["kinds"]["tumour"]
    assert tumour.mean("dice") == expected["val"]["per_volume"]["dice"]["mean"]
    assert tumour.mean("dice", "oracle") == expected["oracle"]["per_volume"]["dice"]["mean"]
    assert set(tumour.thresholds) == {"val", "oracle", "fpr@0.01", "fpr@0.1"}
    assert np.isnan(tumour.mean("nope"))


def test_files_from_before_the_schema_version_load(tmp_path):
    path = tmp_path / "results.json"
    old = _summary()
    del old["schema_version"]  # files written before the version: the same layout
    path.write_text(json.dumps(old))
    assert EvaluationResults.load(path).schema_version == 0


@pytest.mark.parametrize("edit,message", [
    (lambda s: s["results"]["ddpm"]["kinds"]["tumour"].update(
        vall=s["results"]["ddpm"]["kinds"]["tumour"].pop("val")), "unknown keys \\['vall'\\]"),
    (lambda s: s["results"]["ddpm"]["kinds"]["tumour"]["oracle"].pop("per_volume"),
     "tumour.oracle: missing key 'per_volume'"),
    (lambda s: s["timing"].pop("seconds_per_volume"), "timing: missing key"),
    (lambda s: s.pop("method"), "missing key 'method'"),
    (lambda s: s.update(schema_version=SCHEMA_VERSION + 1), "newer than this uadjax"),
])
def test_a_renamed_or_missing_key_names_the_file_and_the_key(tmp_path, edit, message):
    summary = _summary()
    edit(summary)
    path = tmp_path / "run" / "results.json"
    path.parent.mkdir()
    path.write_text(json.dumps(summary))
    with pytest.raises(ResultsError, match=message) as err:
        EvaluationResults.load(path)
    assert str(path) in str(err.value)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ResultsError, match="bad.json: cannot read"):
        EvaluationResults.load(tmp_path / "bad.json")
