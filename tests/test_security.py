"""Nothing read from checkpoints, shards or caches can run code; no unsafe deserialiser is
used anywhere in the package. (Cache files: tests/test_bad_input.py::
test_cache_holding_a_pickle_is_refused_not_executed; ids that would leave the output folder:
test_bad_input.py::test_unsafe_subject_ids and test_datasets.py.)"""

import glob
import os
import pickle
import re
from pathlib import Path

import jax.numpy as jnp
import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from google.protobuf.message import DecodeError

from uadjax import checkpointing
from uadjax.data import builder

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "uadjax"
# Everything pip installs (pyproject.toml: uadjax*, configs*, data_prep*).
INSTALLED = (PACKAGE, ROOT / "configs", ROOT / "data_prep")


class _Payload:
    """Unpickling this creates `marker`: it stands for any code a pickle can run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious_pickle(marker) -> bytes:
    return pickle.dumps({"state": _Payload(marker)})


def _state(value):
    return {"w": jnp.full((64,), value, jnp.float32), "step": jnp.int32(value)}


def test_pickles_planted_in_a_checkpoint_are_never_executed(tmp_path):
    directory = tmp_path / "checkpoints"
    ckpt = checkpointing.Checkpointer(str(directory), asynchronous=False)
    for step in (1, 2):
        ckpt.save(step, _state(step), config={"method": "ddpm"})
    ckpt.close()
    marker = tmp_path / "pwned"
    payload = _malicious_pickle(marker)

    def plant(step):
        step_dir = directory / str(step)
        targets = [p for p in glob.glob(str(step_dir / "**"), recursive=True)
                   if os.path.isfile(p) and "/d/" not in p]  # every non-array file
        assert len(targets) >= 5
        for path in targets:
            Path(path).write_bytes(payload)
        (step_dir / "state" / "checkpoint.pkl").write_bytes(payload)

    plant(2)
    ckpt = checkpointing.Checkpointer(str(directory), asynchronous=False)
    abstract = checkpointing.abstract_like(_state(0))
    with pytest.warns(UserWarning, match="falling back to step 1"):
        assert int(ckpt.restore(abstract)["step"]) == 1
    plant(1)
    with pytest.raises(checkpointing.CheckpointError, match="no checkpoint can be restored"):
        ckpt.restore(abstract)
    ckpt.close()
    assert not marker.exists()


def test_a_pickle_in_place_of_a_slice_record_is_refused_not_executed(tiny_data, tmp_path):
    """A shard file whose record is a pickle, read through the pipeline's own SliceSource:
    decoding parses protobuf only, so it fails as malformed and runs nothing."""
    real = builder.load_split(tiny_data.data_dir, tiny_data, "train")
    shape = real.image_shape
    good = real[0]  # the same reader and decoder accept a real record
    assert good["image"].shape == shape and good["subject_id"].startswith(b"sub-")
    marker = tmp_path / "pwned"
    path = tmp_path / "planted.array_record-00000-of-00001"
    writer = ArrayRecordWriter(str(path), "group_size:1")
    writer.write(_malicious_pickle(marker))
    writer.close()
    planted = builder.SliceSource([path], shape)
    assert len(planted) == 1
    with pytest.raises((DecodeError, KeyError, IndexError)):
        planted[0]
    assert not marker.exists()
    # The plant is live: a reader that unpickled its records would have run it.
    pickle.loads(ArrayRecordReader(str(path)).read_all()[0])
    assert marker.exists()


# Modules and calls that deserialise executable objects. `allow_pickle=False` is the only
# np.load form allowed; config files are Python by design (README: "Config files run code").
_UNSAFE = re.compile(r"\bimport (pickle|cPickle|dill|cloudpickle|marshal|shelve|joblib)\b|"
                     r"\bfrom (pickle|dill|cloudpickle|joblib) import|allow_pickle=True|"
                     r"torch\.load\(|yaml\.load\(|\beval\(|\bexec\(|pd\.read_pickle")


def unsafe_deserialisers(text: str) -> list[str]:
    """The unsafe deserialiser calls in a source text (np.load without allow_pickle=False
    counts: its default has been safe, but the code must not rely on it)."""
    found = [m.group(0) for m in _UNSAFE.finditer(text)]
    found += [c.group(0) for c in re.finditer(r"np\.load\(([^)]*)\)", text)
              if "allow_pickle=False" not in c.group(1)]
    return found


def test_the_installed_code_uses_no_unsafe_deserialiser():
    files = [p for folder in INSTALLED for p in sorted(folder.rglob("*.py"))]
    assert any(p.parent.name == "configs" for p in files)
    assert any(p.parent.name == "data_prep" for p in files)
    offenders = [f"{p.relative_to(ROOT)}: {hit}" for p in files
                 for hit in unsafe_deserialisers(p.read_text(encoding="utf-8"))]
    assert not offenders, offenders
    # Positive control: each pattern the scan exists for is caught.
    for planted in ("import pickle", "from pickle import loads", "np.load(f)", "yaml.load(s)",
                    "torch.load(p)", "np.load(f, allow_pickle=True)", "eval(x)"):
        assert unsafe_deserialisers(planted), planted
    assert not unsafe_deserialisers("np.load(f, allow_pickle=False)")
