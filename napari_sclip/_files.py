"""Atomic file writes, shared by the text cache and the dataset format and exports.

A file is written under a temporary name in its own folder, then renamed over its real name:
readers never see half a file.  Temporary names say who writes them,
``.<name>.<host>.<pid>.<random>.tmp``, so that a process cleaning up after a killed writer can
tell a dead writer's leftovers from a live writer's work (:func:`temporary_writer`).  Files are
created with mode ``0666`` less the umask, as any program's are (``tempfile.mkstemp`` would make
them ``0600``, unreadable to colleagues and to training jobs running as another user).
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

_HOST = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "host"
_TEMPORARY = re.compile(r"\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp")


def temporary_path(path: Path) -> Path:
    """A new hidden name beside ``path`` that names this host and process."""
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def temporary_writer(name: str) -> tuple[str, int] | None:
    """``(host, pid)`` of the process that made the temporary file or folder ``name``; ``None``
    if the name is not one of :func:`temporary_path`'s."""
    found = _TEMPORARY.search(name)
    if found is None or not name.startswith(".") or found.end() != len(name):
        return None
    return found["host"], int(found["pid"])


def this_host() -> str:
    """This machine's name as temporary names carry it."""
    return _HOST


def write_temporary(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(handle)`` on a new temporary file beside ``path``; returns its name (the caller
    renames it into place).  A failure removes it, and an :class:`OSError` names ``path``."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            with os.fdopen(fd, "wb") as handle:
                write(handle)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        if exc.filename is None or Path(exc.filename) == tmp:
            exc.filename, exc.filename2 = str(path), None
        raise
    return tmp


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` by calling ``write(handle)`` on a temporary file in the same folder, then
    renaming it over ``path``: readers never see a half-written file, and a failure (or a kill
    between the two steps) leaves at most the old file, never a temporary one."""
    tmp = write_temporary(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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


def make_folders(path: Path) -> list[Path]:
    """Create the folder ``path`` and its missing parents; returns those this call created,
    outermost first (for :func:`remove_folders` if what follows fails)."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    made = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:  # another process made it: not ours to remove
            continue
        made.append(folder)
    return made


def remove_folders(made: list[Path]) -> None:
    """Remove the folders :func:`make_folders` created, innermost first, where they are empty."""
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:
            pass


@contextmanager
def output_folder(folder: Path) -> Iterator[None]:
    """Make ``folder`` (and its missing parents) for an export.  If the block fails, a folder that
    was new or empty is emptied and the folders made are removed: a failed export leaves neither
    a new folder nor a skeleton (an earlier export being updated keeps its files)."""
    fresh = not folder.exists() or not any(folder.iterdir())
    made = make_folders(folder)
    try:
        yield
    except BaseException:
        if fresh:
            try:
                for child in folder.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
            except OSError:
                pass
            remove_folders(made)
        raise


#: What to do about the file-system errors a user can fix.
_ADVICE = {
    errno.ENOSPC: "no space left on the device; free some space (or choose another folder) and run again",
    getattr(errno, "EDQUOT", -1): "disk quota exceeded; free some space (or choose another folder) and run again",
    errno.EROFS: "the file system is read-only; choose a writable folder",
    errno.EACCES: "permission denied; choose a folder you can write to",
    errno.EPERM: "operation not permitted; choose a folder you can write to",
    errno.ENOENT: "it vanished (deleted, moved or unmounted?); check the folder and run again",
    errno.ENOTDIR: "a part of the path is not a folder; choose another folder",
    errno.EIO: "input/output error; check the disk or the network file system, then run again",
}


def describe_os_error(exc: OSError, path: str | Path | None = None) -> str:
    """One line for a user: the file (``exc``'s, else ``path``), what went wrong, what to do."""
    where = exc.filename if exc.filename is not None else path
    what = _ADVICE.get(exc.errno or 0) or (exc.strerror or str(exc)).lower()
    return f"{where}: {what}" if where is not None else what


def files_under(folder: str | Path, skip: str | None = None,
                onerror: Callable[[OSError], None] | None = None) -> list[str]:
    """The files under ``folder`` as "/"-separated relative paths, in name order.  Hidden files
    and folders are left out (macOS's "._x.jpg" copies are not images), and so is the folder
    whose real path is ``skip``; linked subfolders are not entered, so a walk never leaves the
    folder or loops.  ``onerror`` gets a subfolder that cannot be listed."""
    found: list[str] = []
    top = os.fspath(folder)
    for current, dirs, files in os.walk(top, onerror=onerror):
        dirs[:] = sorted(
            d for d in dirs
            if not d.startswith(".")
            and not (skip is not None and os.path.realpath(os.path.join(current, d)) == skip)
        )
        relative = os.path.relpath(current, top)
        prefix = "" if relative == "." else relative.replace(os.sep, "/") + "/"
        found.extend(prefix + f for f in sorted(files) if not f.startswith("."))
    return found
