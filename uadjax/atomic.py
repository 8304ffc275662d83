"""Atomic file writes: the one place that implements "temporary name, then rename".

A reader (or a resumed batch job) never sees a half-written file: the content goes to a
hidden temporary file in the destination folder, which replaces the destination only when
complete; on error the temporary file is removed. Files get the usual permissions (0666
less the umask), not the 0600 of `tempfile.mkstemp`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
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


# errno values that mean "the output location cannot take the file": stop the batch, say
# where, and let a rerun finish it once the disk or the permissions are fixed.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                          errno.EFBIG})


def is_write_error(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in WRITE_ERRNOS


def check_writable(directory: str | os.PathLike) -> None:
    """Creates `directory` if needed and a probe file in it, so a run that would fail to
    write its outputs fails before it starts (OSError naming the folder), not after hours."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".uadjax-write-probe-", dir=directory)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise type(err)(err.errno, f"cannot write to the output folder ({err.strerror})",
                        str(directory)) from err


@contextlib.contextmanager
def staged_dir(directory: str | os.PathLike) -> Iterator[Path]:
    """Yields a hidden staging folder inside `directory`; when the block succeeds its files
    replace those of `directory` (each rename atomic), else it is removed. A job that writes
    several outputs so leaves either all new ones or the old ones, never a mix."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=directory))
    try:
        yield staging
        for item in sorted(staging.iterdir()):
            if item.is_file():
                os.chmod(item, 0o666 & ~_umask())
            os.replace(item, directory / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
