"""Paths inside a dataset folder that can never point outside it, and the one place where
file-system failures become messages that say what to do."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

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
    """``root / relative``, refusing ``..``, absolute paths and symbolic links below ``root``.

    A dataset holds plain files and folders only: a link (to a folder elsewhere, or to a file) is
    refused whether it leads outside or not, so nothing is ever read, written or deleted through
    one.  ``root`` itself may be a link: it is the folder the user chose.
    """
    target = root
    for part in safe_relative(relative).parts:
        target = target / part
        if target.is_symlink():
            raise DatasetError(
                f"{target} is a symbolic link; a dataset holds plain files and folders only, "
                "so napari-sclip does not follow it (replace it with a copy of what it points to)"
            )
    return target


@contextmanager
def reporting_os_errors(folder: Path) -> Iterator[None]:
    """Turn an :class:`OSError` (disk full, read-only, vanished, no permission, ...) raised while
    working on ``folder`` into a one-line :class:`DatasetError` naming the file and what to do."""
    try:
        yield
    except OSError as exc:
        raise DatasetError(describe_os_error(exc, folder)) from None
