"""Paths inside a dataset folder that can never point outside it, and the one place where
file-system failures become messages that say what to do."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from napari_sclip._files import describe_os_error
from napari_sclip.engine.errors import SclipError


class DatasetError(SclipError):
    """A dataset folder is missing, corrupt, unsafe to use, or cannot be written."""


def safe_relative(relative: str) -> PurePosixPath:
    """Validate a manifest path: relative, POSIX separators, no ``..``, no empty parts.

    Raises :class:`DatasetError` naming the offending path.
    """
    if not isinstance(relative, str) or not relative.strip():
        raise DatasetError(f"invalid path {relative!r} in the dataset: empty")
    if "\\" in relative or relative.startswith("/") or (len(relative) > 1 and relative[1] == ":"):
        raise DatasetError(f"invalid path {relative!r} in the dataset: must be relative, with '/'")
    if any(part in ("..", ".", "") for part in relative.split("/")):
        raise DatasetError(f"invalid path {relative!r} in the dataset: '..', '.' and '//' are not allowed")
    return PurePosixPath(relative)


def resolve_inside(root: Path, relative: str) -> Path:
    """``root / relative``, refusing ``..``, absolute paths, symbolic links below ``root``, and
    anything that is neither a plain file nor a folder.

    A dataset holds plain files and folders only: a link (to a folder elsewhere, or to a file) is
    refused whether it leads outside or not, so nothing is ever read, written or deleted through
    one; a FIFO, socket or device is refused because opening it would wait forever (or read a
    device).  ``root`` itself may be a link: it is the folder the user chose.
    """
    parts = safe_relative(relative).parts
    for depth in range(1, len(parts) + 1):
        target = root.joinpath(*parts[:depth])
        try:
            mode = os.lstat(target).st_mode
        except (FileNotFoundError, NotADirectoryError):
            break  # the rest does not exist yet
        except OSError as exc:
            raise DatasetError(describe_os_error(exc, target)) from None
        if stat.S_ISLNK(mode):
            raise DatasetError(
                f"{target} is a symbolic link; a dataset holds plain files and folders only, "
                "so napari-sclip does not follow it (replace it with a copy of what it points to)"
            )
        _refuse_special(target, mode)
    return root.joinpath(*parts)


def _refuse_special(path: Path, mode: int) -> None:
    """Raise :class:`DatasetError` unless ``mode`` (an ``lstat``/``fstat`` mode) is a plain file's
    or a folder's: reading a FIFO would wait forever."""
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise DatasetError(
            f"{path} is not a plain file or folder (a FIFO, socket or device?); "
            "a dataset holds plain files and folders only, remove it"
        )


def read_json(path: Path) -> Any:
    """The JSON document in the file ``path``.  Text that is not UTF-8 JSON, or nests too deeply
    for Python to parse, is a :class:`DatasetError` naming the file; an :class:`OSError` is the
    caller's to describe."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # UnicodeDecodeError is one
        raise DatasetError(f"cannot read {path}: {exc}") from None
    except RecursionError:
        raise DatasetError(f"cannot read {path}: it is nested too deeply to be a napari-sclip file") from None


def is_int(value: Any, low: int, high: int) -> bool:
    """Whether ``value`` is an int (not a bool) in ``low..high``."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


@contextmanager
def reporting_os_errors(folder: Path) -> Iterator[None]:
    """Turn an :class:`OSError` (disk full, read-only, vanished, no permission, ...) raised while
    working on ``folder`` into a one-line :class:`DatasetError` naming the file and what to do."""
    try:
        yield
    except OSError as exc:
        raise DatasetError(describe_os_error(exc, folder)) from None
