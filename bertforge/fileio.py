"""Atomic file writes: a kill or a crash at any moment leaves the old file or the new one.

Each write goes to a hidden temporary file beside the target (the same filesystem, so the
rename is atomic), is fsynced, renamed over the target, and the directory is fsynced so
the rename itself survives a power cut. A failed write removes its temporary file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path


def fsync(path: Path) -> None:
    """Flush a file's or a directory's contents to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_path(path: Path) -> Path:
    """The hidden name a file is written under before it is renamed to `path`."""
    return path.with_name(f".{path.name}.tmp")


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` to write the file's content at a temporary path, then move it
    into place at `path` atomically and durably; returns `path`."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync(path.parent)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically and durably."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
