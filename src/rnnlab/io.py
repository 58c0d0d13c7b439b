"""Atomic file writes: every output goes to a temp file in the same folder, then is renamed,
so a crash or a full disk never leaves a half-written file at the final path.

A failed write (disk full, quota, read-only folder) removes the temp file, leaves whatever was
at the final path before untouched, and raises ``OutputWriteError`` naming the path.
Every writer opens its temp file through ``open_output`` (one place for tests to simulate a
full disk).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from rnnlab.errors import RnnlabError

_SPACE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class OutputWriteError(RnnlabError):
    """An output could not be written; nothing was left at its final path."""


def open_output(path: str | Path) -> IO[bytes]:
    """Open a temp file for binary writing (the single hook through which all outputs are written)."""
    return open(path, "wb")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise _write_error(path, exc) from exc
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _write_error(path: Path, exc: OSError) -> OutputWriteError:
    if exc.errno in _SPACE_ERRNOS:
        why = "no space left on device"
    else:
        why = f"{exc.strerror or type(exc).__name__} (errno {exc.errno})"
    return OutputWriteError(f"{path}: could not write ({why}); nothing was written at this path")


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open_output(tmp) as fh:
        fh.write(data)


def write_json(path: str | Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    write_bytes(path, text.encode("utf-8"))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open_output(tmp) as fh:
        np.save(fh, array)


def write_parquet(path: str | Path, df) -> None:
    with atomic_path(path) as tmp, open_output(tmp) as fh:
        df.to_parquet(fh, index=False)


def copy_file(src: str | Path, dst: str | Path) -> None:
    """Copy ``src`` to ``dst`` atomically (streamed, so large checkpoints are not held in memory)."""
    with atomic_path(dst) as tmp, open(src, "rb") as source, open_output(tmp) as fh:
        for chunk in iter(lambda: source.read(1 << 20), b""):
            fh.write(chunk)
