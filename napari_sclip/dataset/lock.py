"""Who may change a dataset folder: one owner at a time, across the processes and machines that
share it (a network file system included).

The owner holds ``<dataset>/.napari-sclip.lock``, a JSON :class:`Owner` record: host, pid, start
time, command.  It is made complete under a temporary name and hard-linked onto the lock's name;
``link`` never replaces an existing file and is atomic on local file systems and on NFS, so one
process gets the lock and nobody reads half a record.  (On file systems without hard links the
record is created with ``O_CREAT | O_EXCL`` and written in place.)  While the owner runs, a
thread touches the file every :data:`HEARTBEAT_SECONDS`.

A lock whose owner is gone is taken over:

* an owner on this host is gone as soon as its pid no longer runs (or runs another program: the
  start time differs);
* an owner on another host is gone once the lock's heartbeat is older than
  :data:`STALE_SECONDS`, measured on the file system's clock (the time stamp of a file just
  written there), so the hosts' clocks need not agree.

Taking over renames the stale file to a unique name, then checks that what it moved is the record
it judged stale.  If another process took over first, what was moved is that process's fresh lock:
it is linked back (``link`` again, so nothing is overwritten).  Two processes recovering at once
therefore end with one owner.  An owner checks that the lock is still its own (same file) before
every write; if it is not (the folder vanished, the file was deleted, or the process was paused
for longer than :data:`STALE_SECONDS` and judged gone), it stops with an error instead of writing.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shlex
import sys
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from stat import S_ISREG

from napari_sclip._files import temporary_path, this_host
from napari_sclip.dataset.paths import DatasetError, is_int

LOCK_NAME = ".napari-sclip.lock"
#: How often a running owner touches its lock.
HEARTBEAT_SECONDS = 10.0
#: How old the heartbeat of an owner on another host must be for the lock to be taken over: well
#: above the heartbeat and NFS's attribute caching (at most 60 s by default).
STALE_SECONDS = 120.0
#: ``link`` fails with these where a file system has no hard links (FAT, some FUSE and SMB mounts).
#: Above any pid a system gives (Linux's ``pid_max`` is at most 2**22): larger ones overflow ``kill``.
_MAX_PID = 2**31 - 1
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}


@dataclass(frozen=True)
class Owner:
    """The process that holds a dataset: what its lock file says."""

    host: str
    pid: int
    since: str  # when it took the dataset (ISO 8601, UTC)
    command: str
    token: str  # random: tells two records apart
    process_start: int | None = None  # the pid's start time (Linux clock ticks): catches pid reuse
    activity: str | None = None  # what it does with the dataset, when others should know ("review")

    @classmethod
    def this_process(cls, activity: str | None = None) -> Owner:
        command = shlex.join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]])
        return cls(
            host=this_host(),
            pid=os.getpid(),
            since=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            command=command if len(command) <= 120 else command[:119] + "…",
            token=secrets.token_hex(8),
            process_start=_process_start(os.getpid()),
            activity=activity,
        )

    @classmethod
    def parse(cls, data: bytes) -> Owner | None:
        """The record in ``data``; ``None`` if it is not one (empty, half-written, foreign)."""
        try:
            fields = json.loads(data.decode("utf-8"))
            pid, start, activity = fields["pid"], fields.get("process_start"), fields.get("activity")
            if not is_int(pid, 1, _MAX_PID) or not (start is None or is_int(start, 0, 2**63 - 1)):
                return None
            return cls(str(fields["host"]), pid, str(fields["since"]), str(fields["command"]), str(fields["token"]), start,
                       activity if isinstance(activity, str) else None)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return None

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self)) + "\n").encode("utf-8")

    def describe(self) -> str:
        return f"{self.command!r} (pid {self.pid} on {self.host}, since {self.since})"


def is_gone(host: str | None, pid: int | None, age: float, process_start: int | None = None) -> bool:
    """Whether the process that made a file (a lock, a temporary file) is gone: on this host, when
    ``pid`` no longer runs (or, with ``process_start``, runs another program); elsewhere, or when
    the file does not say, once the file is ``age`` > :data:`STALE_SECONDS` seconds old."""
    if host == this_host() and pid is not None:
        return not _runs(pid, process_start)
    return age > STALE_SECONDS


class DatasetLock:
    """Hold the dataset at ``root`` (which must exist) until :meth:`release`.

    Raises :class:`DatasetError` naming the owner when another live process holds it.
    """

    def __init__(self, root: Path, activity: str | None = None):
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self.owner = Owner.this_process(activity)
        self._fd = self._acquire()
        self._identity = _file_id(os.fstat(self._fd))
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name=f"napari-sclip lock {root}", daemon=True)
        self._heartbeat.start()

    # -- holding -----------------------------------------------------------------------------------

    def holds(self) -> bool:
        """Whether the lock file is still this one."""
        try:
            stat = os.lstat(self.path)
        except FileNotFoundError:
            return False
        return self._fd is not None and _file_id(stat) == self._identity

    def check(self) -> None:
        """Raise :class:`DatasetError` unless this process still holds the dataset."""
        if self.holds():
            return
        found = read_lock(self.path)
        if found is None:
            raise DatasetError(
                f"{self.root} vanished (deleted, moved or unmounted?) or its lock file {LOCK_NAME} was removed "
                "while this run wrote into it; check the folder and run again"
            )
        holder = found[0]
        raise DatasetError(
            f"{self.root} was taken over by {holder.describe() if holder else 'another process'} "
            f"(this run looked gone: paused for more than {STALE_SECONDS:.0f} s?); it stopped writing, run it again"
        )

    def file_system_now(self) -> float:
        """The file system's clock (the lock's time stamp, touched now)."""
        self._touch()
        return os.fstat(self._fd).st_mtime

    def _touch(self) -> None:
        os.utime(self._fd if os.utime in os.supports_fd else self.path)

    def release(self) -> None:
        """Give the dataset up (idempotent).  Never raises: a lock left on a read-only or vanished
        folder belongs to a process that has ended, which the next owner sees."""
        self._stop.set()
        if self._fd is None:
            return
        if self._heartbeat is not threading.current_thread():
            self._heartbeat.join()  # it touches the descriptor closed below
        try:
            if self.holds():
                self.path.unlink()
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self._touch()
            except OSError:  # read-only or vanished: check() tells the owner
                pass

    # -- taking ------------------------------------------------------------------------------------

    def _acquire(self) -> int:
        for _ in range(8):  # each round either takes the lock or removes a dead owner's
            try:
                fd, now = self._create()
            except OSError as exc:  # read-only, full, vanished: name the folder, not our file
                exc.filename, exc.filename2 = str(self.root), None
                raise
            if fd is not None:
                return fd
            found = read_lock(self.path)
            if found is None:
                continue  # released meanwhile
            holder, stat = found
            age = now - stat.st_mtime
            gone = age > STALE_SECONDS if holder is None else is_gone(holder.host, holder.pid, age, holder.process_start)
            if not gone:
                raise DatasetError(_busy(self.root, holder))
            self._remove_stale(stat, holder)
        raise DatasetError(f"{self.root} is contended by several processes at once; run again")

    def _create(self) -> tuple[int | None, float]:
        """Try to make the lock file: ``(its descriptor, or None if it exists; the file system's
        time now)``."""
        record = self.owner.to_bytes()
        candidate = temporary_path(self.path)
        fd = os.open(candidate, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        keep = False
        try:
            os.write(fd, record)
            now = os.fstat(fd).st_mtime
            try:
                os.link(candidate, self.path)
            except FileExistsError:
                # NFS may report a retried link that worked as a failure: the link count tells.
                keep = os.fstat(fd).st_nlink == 2
                return (fd if keep else None), now
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINKS:
                    raise
                return self._create_in_place(record), now
            keep = True
            return fd, now
        finally:
            if not keep:
                os.close(fd)
            candidate.unlink(missing_ok=True)

    def _create_in_place(self, record: bytes) -> int | None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except FileExistsError:
            return None
        try:
            os.write(fd, record)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        return fd

    def _remove_stale(self, judged: os.stat_result, holder: Owner | None) -> None:
        """Remove the lock file judged stale, and only that one."""
        grave = temporary_path(self.path)
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return  # someone else removed it first
        try:
            moved = read_lock(grave)
            if moved is None or moved[0] != holder or _file_id(moved[1]) != _file_id(judged):
                # Another process took over first: this is its lock; put it back.
                try:
                    os.link(grave, self.path)
                except FileExistsError:
                    pass  # a third process got in between; the owner displaced notices and stops
        finally:
            grave.unlink(missing_ok=True)


def _file_id(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino


def read_lock(path: Path) -> tuple[Owner | None, os.stat_result] | None:
    """The record and status of the lock file at ``path``; ``None`` if there is none.  Anything
    but a plain file there (a folder, a FIFO that would block a plain ``open``) is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DatasetError(f"{path} is a symbolic link; remove it (a dataset's lock is a plain file)") from None
        raise
    status = os.fstat(fd)
    if not S_ISREG(status.st_mode):
        os.close(fd)
        raise DatasetError(
            f"{path} is not a plain file; remove it if no napari-sclip program is running on this dataset "
            "(its lock is a plain file), then run again"
        )
    with os.fdopen(fd, "rb") as handle:
        return Owner.parse(handle.read(4096)), status


#: The activity of a lock held by a review in napari: it does not end by itself.
REVIEW = "review"


def _busy(root: Path, holder: Owner | None) -> str:
    who = holder.describe() if holder else f"another process (its lock {root / LOCK_NAME} is unreadable)"
    if holder is not None and holder.activity == REVIEW:
        who = f"a review in napari, {who}"
        hint = "close that review (its Close review button, or its window), then run again"
    else:
        hint = "wait for it to finish, then run again"
    if holder is None or holder.host != this_host():
        hint += f"; if it was stopped, the folder is free {STALE_SECONDS:.0f} s after its last heartbeat"
    return f"{root} is in use by {who}; {hint}"


def _process_start(pid: int) -> int | None:
    """``pid``'s start time in clock ticks since boot (Linux), or ``None``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _runs(pid: int, process_start: int | None) -> bool:
    """Whether ``pid`` runs on this host (and, given its start time, is still that process)."""
    if os.name == "nt":  # os.kill would end the process; trust the heartbeat instead
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        state = ""
    if state in ("Z", "X"):  # a zombie: it has ended, its parent has not collected it yet
        return False
    return process_start is None or _process_start(pid) in (None, process_start)
