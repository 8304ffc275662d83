"""Atomic file writes: the one place that implements "temporary name, then rename".

A reader (or a resumed batch job) never sees a half-written file: the content goes to a
hidden temporary file in the destination folder, which replaces the destination only when
complete; on error the temporary file is removed. Files get the usual permissions (0666
less the umask), not the 0600 of `tempfile.mkstemp`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path to write; it becomes `path` when the block succeeds.

    The temporary name keeps the destination's suffixes (`.nii.gz`, `.png`), so libraries
    that pick the format from the name write the right one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj, *, indent: int = 2) -> None:
    """JSON with numpy scalars converted; atomic."""
    write_text(path, json.dumps(obj, indent=indent, default=_json_default))


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")
