"""Paths inside a dataset folder that can never point outside it."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from napari_sclip.engine.errors import SclipError


class DatasetError(SclipError):
    """A dataset folder is missing, corrupt, or unsafe to use."""


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
    """``root / relative``, refusing anything that lands outside ``root`` (symlinks included)."""
    target = root.joinpath(*safe_relative(relative).parts)
    real_root = root.resolve()
    real_target = target.resolve()
    if real_target != real_root and real_root not in real_target.parents:
        raise DatasetError(f"path {relative!r} in the dataset leads outside {root} (a symlink?)")
    return target
