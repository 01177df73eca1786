"""Atomic file writes, shared by the text cache and the dataset format and exports."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` by calling ``write(handle)`` on a temporary file in the same folder, then
    renaming it over ``path``: readers never see a half-written file, and a failure (or a kill
    between the two steps) leaves at most the old file, never a temporary one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """:func:`atomic_write` of ready-made bytes."""
    atomic_write(path, lambda handle: handle.write(data))


def atomic_copy(source: Path, target: Path) -> None:
    """:func:`atomic_write` of ``source``'s bytes to ``target``."""

    def copy(handle: BinaryIO) -> None:
        with open(source, "rb") as original:
            shutil.copyfileobj(original, handle)

    atomic_write(target, copy)
