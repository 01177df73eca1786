"""Pseudo-labelling image files into a dataset, the engine's way (no napari): what
``napari-sclip segment`` runs, usable from Python as well.

A run holds the dataset while it runs (another run into the same folder is refused), and can be
stopped at any moment and started again: each image's files are written atomically
(:func:`~napari_sclip.dataset.writer.write_sample_files`), and an image whose SHA-256 is already
in the dataset is skipped.  With ``overwrite`` such an image is labelled again, unless a person
edited or reviewed it: those masks are never replaced.

The run is a pipeline, so that the model never waits for files:

1. **planning** (the dataset's owner, in reader threads): hash a file, skip it if it is known,
   else give each of its slices an id and a split (:class:`FileJob`);
2. **reading** (reader threads): decode the file and prepare each slice for the model
   (:meth:`Segmenter.prepare <napari_sclip.engine.segmenter.Segmenter.prepare>`);
3. **the model** (one thread per device): windows of several images in each batch
   (:meth:`~napari_sclip.engine.segmenter.Segmenter.run_windows`);
4. **writing** (writer threads): post-processing, PNG encoding and the sample's files;
5. **recording** (the caller's thread, the owner): the journal, and one :class:`BatchItem` per
   file as its last slice lands.

Queues between the stages are bounded (by count and by the bytes of decoded images), so memory
does not grow with the folder.  On a Dask cluster (``client=``), planning and recording stay
here and stages 2-4 run on the workers, a chunk of planned files per task
(:mod:`napari_sclip.dataset.cluster`).  Results are the same, file for file, whichever way runs.
"""

from __future__ import annotations

import os
import queue
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from napari_sclip._concurrency import bounded_map
from napari_sclip._files import describe_os_error
from napari_sclip.classes import label_dtype
from napari_sclip.dataset.export import plane_stem
from napari_sclip.dataset.writer import (
    DatasetWriter,
    Sample,
    SourceChanged,
    Target,
    sha256_of,
    write_sample_files,
)

if TYPE_CHECKING:
    from napari_sclip.engine.progress import ProgressCallback
    from napari_sclip.engine.segmenter import PreparedImage, Segmenter
    from napari_sclip.engine.vocabulary import Vocabulary

Status = Literal["written", "skipped", "kept", "failed"]
#: Decoded images held between reading and writing, at most (one image is always let through).
IMAGE_BUDGET_BYTES = 1 << 30


@dataclass(frozen=True)
class BatchItem:
    """What happened to one image file.

    ``status`` is ``"written"`` (labelled now), ``"skipped"`` (already in the dataset),
    ``"kept"`` (already there and edited or reviewed by a person, so not labelled again even with
    ``overwrite``) or ``"failed"`` (unreadable or unusable image; ``reason`` says why).
    ``image_ids`` are the samples it has in the dataset: one, or one per 2D slice of a stack.
    ``reason`` is one line that starts with the file's path.
    """

    path: Path
    status: Status
    image_ids: tuple[str, ...] = ()
    reason: str = ""


@dataclass(frozen=True)
class SliceJob:
    """One 2D slice to label: its index in the file (``None`` for a 2D image) and where it goes."""

    index: tuple[int, ...] | None
    target: Target


@dataclass(frozen=True)
class FileJob:
    """One image file as its owner planned it: all a reader needs, here or on another machine.

    ``stat`` is the file's ``(size, mtime_ns)`` when it was hashed: a file changed since then is
    not labelled (its SHA-256 would be wrong).  ``kept`` are the ids of slices already in the
    dataset and left as they are; ``count`` is the number of slices in the file.
    """

    path: Path
    sha256: str
    stat: tuple[int, int]
    slices: tuple[SliceJob, ...]
    count: int
    kept: tuple[str, ...] = ()
    overwrite: bool = False


@dataclass(frozen=True)
class SliceOutcome:
    """A slice that was written (``meta``, as a reader sees it) or failed (``reason``)."""

    path: Path
    job: SliceJob
    meta: dict[str, Any] | None = None
    reason: str = ""


@dataclass
class RunOptions:
    """How stages 2-4 run: the model's keyword arguments (:meth:`Segmenter.segment`'s), the
    class uid of each label value, and the threads."""

    segment: dict[str, Any]
    uids: np.ndarray
    readers: int = 2
    writers: int = 2
    image_budget: int = IMAGE_BUDGET_BYTES


def label_images(
    paths: Sequence[Path],
    vocabulary: Vocabulary,
    root: str | Path,
    segmenter: Segmenter | Sequence[Segmenter],
    *,
    options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    ratios: Mapping[str, float] | None = None,
    progress: ProgressCallback | None = None,
    client=None,
    readers: int | None = None,
    writers: int | None = None,
    chunk_size: int = 16,
) -> Iterator[BatchItem]:
    """Segment the images at ``paths`` into the dataset at ``root``, yielding one
    :class:`BatchItem` per file as it is done (not necessarily in the order of ``paths``).
    Stacks are segmented slice by slice, one sample per 2D slice
    (:func:`~napari_sclip.engine.image.image_layout` says which axes are slices).

    Parameters
    ----------
    segmenter
        The model: one :class:`Segmenter`, or one per device (each runs batches of its own).
        With ``client``, its settings (model, weights, device, batch size) are what every
        worker loads, once.
    options
        Keyword arguments for :meth:`Segmenter.segment` (short side, window, threshold, ...).
    overwrite
        Label images already in the dataset again (never those a person edited or reviewed).
    ratios
        Split ratios for a new dataset; an existing one keeps its own.
    progress
        Called with ``Progress("slices", done, total)`` as slices are done (``total`` counts the
        slices known so far and one for each file not read yet), and with the engine's
        ``download``/``load`` reports while the model loads.
    client
        A ``distributed.Client``: read, segment and write on its workers.
    readers, writers
        Threads that read and prepare images, and that post-process and write them (default:
        from the number of CPUs).
    chunk_size
        Files per task on a cluster.

    Raises
    ------
    DatasetError
        ``root`` is not a dataset (nor empty), its manifest is damaged, another process holds it,
        or it cannot be written (read-only, full, vanished).
    SclipError
        The model cannot be loaded or the options are wrong (bad images only fail their own item).
    """
    from napari_sclip.engine.progress import Progress

    segmenters = [segmenter] if not isinstance(segmenter, Sequence) else list(segmenter)
    report = progress or (lambda step: None)
    readers, writers = readers or _default_threads(), writers or _default_threads()
    with DatasetWriter(root, ratios=dict(ratios) if ratios else None, vocabulary=vocabulary.classes) as writer:
        # Segmenter label value -> uid, in the smallest dtype (the labels of huge images are big).
        active = [0, *writer.registry.active]
        uids = np.array(active, dtype=label_dtype(max(active)))
        run = RunOptions(dict(options or {}), uids, readers, writers, IMAGE_BUDGET_BYTES)
        ledger = _Ledger(writer, overwrite, len(paths), report)
        report(Progress("slices", 0, len(paths)))
        if client is None:
            for model in segmenters:
                model.load(report)
            outcomes = run_jobs(enumerate(paths), ledger.plan, segmenters, vocabulary, writer.root, run)
        else:
            outcomes = _run_on_cluster(client, enumerate(paths), ledger.plan, segmenters[0], vocabulary, writer.root, run,
                                       chunk_size)
        try:
            for outcome in outcomes:
                yield from ledger.settle(outcome)
        finally:
            outcomes.close()
            ledger.abandon()


class _Ledger:
    """The owner's side of a run: plans files (from any thread), records written slices (from the
    caller's), and tells when a file is done.

    A file with the same bytes as one still being labelled waits for it: it is skipped once that
    one is written, and fails with the same reason if that one fails (as it would, read again).
    """

    def __init__(self, writer: DatasetWriter, overwrite: bool, files: int, report: ProgressCallback):
        self.writer, self.overwrite, self.report = writer, overwrite, report
        self._lock = threading.RLock()  # settling a file happens inside planning
        self._open: dict[Path, _FileState] = {}
        self._running: dict[str, Path] = {}  # SHA-256 of a file being labelled -> its path
        self._waiting: dict[str, list[Path]] = {}  # SHA-256 -> files with the same bytes
        self._done = 0  # slices done
        self._unread = files  # files not planned yet
        self._turns = threading.Condition()
        self._next_turn = 0

    def plan(self, numbered: tuple[int, Path]) -> FileJob | BatchItem | None:
        """Hash the ``n``-th file and plan its slices; a file with nothing to do is settled at
        once, and one whose bytes are being labelled already waits for that file (``None``).

        Files are hashed in parallel but planned in their given order, so which of two files
        with the same bytes is labelled, and which of two with the same name gets the plain id,
        does not depend on which thread is faster.
        """
        from napari_sclip.engine.errors import ImageError
        from napari_sclip.io.images import slice_indices

        # Absolute (links kept): a Dask worker started in another folder reads the same file.
        turn, path = numbered[0], Path(os.path.abspath(numbered[1]))
        status, sha, unreadable = None, "", _not_an_input(path, self.writer.root)
        if unreadable is None:
            try:
                status = os.stat(path)
                if not stat.S_ISREG(status.st_mode):  # a device or a pipe would be read for ever
                    status, unreadable = None, f"{path}: not a regular file (folders are given as arguments)"
                else:
                    sha = sha256_of(path)
            except OSError as exc:
                status = None
                unreadable = f"{path}: no such file" if isinstance(exc, FileNotFoundError) \
                    else describe_os_error(exc, path)
        with self._turn(turn):
            if status is None:
                return self._settled(BatchItem(path, "failed", reason=unreadable), 1)
            with self._lock:
                if sha in self._running:
                    self._waiting.setdefault(sha, []).append(path)
                    return None
                whole = self._kept((sha, None))
                if whole is not None:  # a 2D image already there: no need to read it
                    return self._settled(BatchItem(path, "kept" if self.overwrite else "skipped", (whole,)), 1)
            try:
                indices = slice_indices(path)
            except ImageError as exc:
                return self._settled(BatchItem(path, "failed", reason=str(exc)), 1)
            slices, kept = [], []
            with self._lock:
                for index in indices:
                    known = self._kept((sha, index))
                    if known is not None:
                        kept.append(known)
                        continue
                    stem = path.stem if index is None else plane_stem(path.stem, index)
                    slices.append(SliceJob(index, self.writer.plan(stem, (sha, index))))
                job = FileJob(path, sha, (status.st_size, status.st_mtime_ns), tuple(slices), len(indices),
                              tuple(kept), self.overwrite)
                if not slices:
                    return self._settled(BatchItem(path, "kept" if self.overwrite else "skipped", tuple(kept)),
                                         len(indices))
                self._open[path] = _FileState(job, done=len(kept))
                self._running[sha] = path
                self._unread -= 1
                self._done += len(kept)
                self._show()
            return job

    @contextmanager
    def _turn(self, turn: int) -> Iterator[None]:
        """Wait until the files before the ``turn``-th are planned; then plan it."""
        with self._turns:
            self._turns.wait_for(lambda: self._next_turn == turn)
        try:
            yield
        finally:
            with self._turns:
                self._next_turn += 1
                self._turns.notify_all()

    def _kept(self, identity) -> str | None:
        """The id of a stored slice that stays as it is (always without ``overwrite``)."""
        found = self.writer.stored_identity(identity)
        if found is not None and (not self.overwrite or found[1].edited):
            return found[0]
        return None

    def _settled(self, item: BatchItem, slices: int) -> BatchItem:
        with self._lock:
            self._unread -= 1
            self._done += slices
            self._show()
        return item

    def _show(self) -> None:
        from napari_sclip.engine.progress import Progress

        pending = sum(state.job.count - state.done for state in self._open.values())
        self.report(Progress("slices", self._done, self._done + pending + self._unread))

    def settle(self, outcome: SliceOutcome | BatchItem) -> list[BatchItem]:
        """Record a slice's outcome; the items of the files it completes (the file's own, and
        those of files with the same bytes that waited for it)."""
        if isinstance(outcome, BatchItem):
            return [outcome]
        with self._lock:
            state = self._open[outcome.path]
            if outcome.meta is not None:
                self.writer.record(outcome.job.target, outcome.meta)
                state.written.append(outcome.job.target.image_id)
            else:
                self.writer.forget(outcome.job.target)
                state.reason = state.reason or outcome.reason
            state.done += 1
            self._done += 1
            if state.done < state.job.count:
                self._show()
                return []
            del self._open[outcome.path]
            job = state.job
            del self._running[job.sha256]
            ids = tuple(state.written) + job.kept
            if state.reason:
                items = [BatchItem(job.path, "failed", ids, reason=state.reason)]
            else:
                items = [BatchItem(job.path, "written" if state.written else "kept" if job.overwrite else "skipped", ids)]
            for twin in self._waiting.pop(job.sha256, []):
                self._unread -= 1
                self._done += job.count
                reason = state.reason.replace(str(job.path), str(twin), 1)
                items.append(BatchItem(twin, "failed", reason=reason) if reason else BatchItem(twin, "skipped", ids))
            self._show()
        return items

    def abandon(self) -> None:
        """Give up the ids of slices that were planned and never written (an interrupted run)."""
        with self._lock:
            for state in self._open.values():
                for sliced in state.job.slices:
                    self.writer.forget(sliced.target)
            self._open.clear()


@dataclass
class _FileState:
    job: FileJob
    done: int = 0
    written: list[str] = field(default_factory=list)
    reason: str = ""


# -- on a Dask cluster ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Chunk:
    """One task: planned files, and what the worker needs to label them."""

    jobs: tuple[FileJob, ...]
    vocabulary: Vocabulary
    root: Path
    run: RunOptions


def _label_chunk(chunk: _Chunk) -> list[SliceOutcome]:
    """A worker's task: stages 2-4 on its own threads and its model (loaded once per worker)."""
    from napari_sclip.dataset.cluster import using_worker_segmenter

    threads = _default_threads()
    run = RunOptions(chunk.run.segment, chunk.run.uids, threads, threads, chunk.run.image_budget)
    with using_worker_segmenter() as model:
        return list(run_jobs(chunk.jobs, _as_planned, [model], chunk.vocabulary, chunk.root, run))


def _as_planned(job: FileJob) -> FileJob:
    return job


def _run_on_cluster(
    client, files, plan, segmenter: Segmenter, vocabulary: Vocabulary, root: Path, run: RunOptions, chunk_size: int
) -> Iterator[SliceOutcome | BatchItem]:
    """Plan here (hashing in reader threads), label chunks of ``chunk_size`` files on the workers,
    at most two chunks per worker thread in flight; a chunk whose worker dies is run again
    elsewhere by the scheduler (its samples' files are simply written again).  A chunk that killed
    every worker that tried it is split: each of its files goes again on its own, so that only
    the file that kills workers fails."""
    import distributed

    from napari_sclip.dataset.cluster import ClusterError, install_segmenter, map_bounded
    from napari_sclip.engine.errors import SclipError
    from napari_sclip.engine.sources import registered_config

    config = registered_config(segmenter.model_name)  # a repo or folder is read by the workers
    settled: list[BatchItem] = []
    in_flight: dict[int, _Chunk] = {}  # by position, until its task is done

    def chunks() -> Iterator[_Chunk]:
        batch: list[FileJob] = []
        with ThreadPoolExecutor(run.readers, thread_name_prefix="napari-sclip planner") as planners:
            for planned in bounded_map(planners, plan, files, 4 * run.readers):
                if isinstance(planned, BatchItem):
                    settled.append(planned)
                    continue
                if planned is None:  # waits for a file with the same bytes
                    continue
                batch.append(planned)
                if len(batch) == chunk_size:
                    yield _keep(_Chunk(tuple(batch), vocabulary, Path(root), run))
                    batch = []
        if batch:
            yield _keep(_Chunk(tuple(batch), vocabulary, Path(root), run))

    def _keep(chunk: _Chunk) -> _Chunk:
        if not in_flight and not done:
            # With the first chunk only: a run with nothing left to label loads no model.  Workers
            # see each image once: no feature cache.  The model's config travels with the plugin,
            # so that a model registered only here (a custom config) builds there too.
            install_segmenter(client, {**segmenter.settings(), "feature_cache": False},
                              model_configs={segmenter.model_name: config} if config else None)
        in_flight[len(in_flight) + len(done)] = chunk
        return chunk

    done: set[int] = set()
    alone: deque[_Chunk] = deque()  # the files of split chunks, one per chunk

    class Feed:
        """The split chunks' files first, then the planned chunks; it can offer more after it
        has run dry, when a chunk is split."""

        def __iter__(self):
            return self

        def __next__(self) -> _Chunk:
            return _keep(alone.popleft()) if alone else next(planned)

    planned = chunks()
    results = map_bounded(client, _label_chunk, Feed(), max_in_flight=_TwoPerThread(client),
                          key_prefix="napari-sclip-label", return_exceptions=True)
    try:
        while True:
            yield from settled
            settled.clear()
            try:
                index, outcomes = next(results)
            except StopIteration:
                break
            except (distributed.CancelledError, distributed.comm.CommClosedError) as exc:
                raise ClusterError(f"lost the Dask scheduler ({type(exc).__name__}); what was written is kept: "
                                   "run the same command again to go on") from None
            done.add(index)
            chunk = in_flight.pop(index)
            if type(outcomes).__name__ == "KilledWorker":
                if len(chunk.jobs) > 1:
                    alone.extend(replace(chunk, jobs=(job,)) for job in chunk.jobs)
                    continue
                # It took down every worker that tried it: it fails, the run goes on, and the next
                # run tries it again.
                reason = "a Dask worker died each time it labelled this file (memory?); run again"
                outcomes = [SliceOutcome(job.path, sliced, reason=f"{job.path}: {reason}")
                            for job in chunk.jobs for sliced in job.slices]
            elif isinstance(outcomes, BaseException):
                if isinstance(outcomes, SclipError):
                    raise outcomes
                hint = ""
                if "deserializ" in str(outcomes):  # the scheduler unpickles the tasks it is sent
                    hint = " (the Dask scheduler, as well as every worker, needs napari-sclip installed)"
                raise ClusterError(f"a Dask task failed: {type(outcomes).__name__}: {outcomes}{hint}") from outcomes
            yield from outcomes
        yield from settled
    finally:
        results.close()


def _not_an_input(path: Path, root: Path) -> str | None:
    """Why ``path`` cannot be labelled into the dataset at ``root``: it is one of its files."""
    from napari_sclip.io.images import inside

    if inside(path, root):
        return f"{path}: a file of the dataset being written ({root}), not an input"
    return None


@dataclass
class _TwoPerThread:
    """Tasks to keep in flight: two per worker thread of the cluster as it is now (workers join
    and leave), asking the scheduler at most once every ``every`` seconds."""

    client: Any
    every: float = 1.0
    limit: int = 2
    asked_at: float = float("-inf")

    def __call__(self) -> int:
        now = time.monotonic()
        if now - self.asked_at >= self.every:
            self.limit, self.asked_at = 2 * max(1, sum(self.client.nthreads().values())), now
        return self.limit


def _default_threads() -> int:
    """Reader and writer threads: half the CPUs each, 2 to 8."""
    return min(8, max(2, (os.cpu_count() or 2) // 2))


# -- stages 2-4: reading, the model, writing ---------------------------------------------------------


_END = object()


def run_jobs(
    items: Iterable[Any],
    plan: Callable[[Any], FileJob | BatchItem | None],
    segmenters: Sequence[Segmenter],
    vocabulary: Vocabulary,
    root: Path,
    run: RunOptions,
) -> Iterator[SliceOutcome | BatchItem]:
    """Read, segment and write the files that ``plan`` makes of ``items`` (paths here, planned
    :class:`FileJob` on a cluster's worker), yielding each slice's outcome, and each file that
    ``plan`` settled at once, as they come.  Closing the generator stops the run: slices being
    written are finished, nothing else is started."""
    pipeline = _Pipeline(items, plan, segmenters, vocabulary, Path(root), run)
    try:
        yield from pipeline.outcomes()
    finally:
        pipeline.stop()


class _Pipeline:
    """The threads of :func:`run_jobs` and the bounded queues between them."""

    def __init__(self, items, plan, segmenters, vocabulary, root: Path, run: RunOptions):
        self.plan, self.segmenters, self.vocabulary, self.root, self.run = plan, segmenters, vocabulary, root, run
        self._items = iter(items)
        self._items_lock = threading.Lock()
        self._stopped = threading.Event()
        batch = max(model.batch_size for model in segmenters)
        # Enough prepared images to fill the next batch on every device while the current one runs.
        self._prepared: queue.Queue = queue.Queue(maxsize=max(4, 2 * batch * len(segmenters)))
        self._results: queue.Queue = queue.Queue()
        self._budget = _Budget(run.image_budget)
        self._writing = ThreadPoolExecutor(run.writers, thread_name_prefix="napari-sclip writer")
        self._readers = [threading.Thread(target=self._guard, args=(self._read,), daemon=True,
                                          name=f"napari-sclip reader {k}") for k in range(run.readers)]
        self._devices = [threading.Thread(target=self._guard, args=(self._segment, model), daemon=True,
                                          name=f"napari-sclip device {k}") for k, model in enumerate(segmenters)]
        self._closer = threading.Thread(target=self._close_when_done, daemon=True, name="napari-sclip closer")
        for thread in (*self._readers, *self._devices, self._closer):
            thread.start()

    def outcomes(self) -> Iterator[SliceOutcome | BatchItem]:
        while True:
            try:
                found = self._results.get(timeout=0.2)  # a timeout keeps Ctrl+C responsive
            except queue.Empty:
                continue
            if found is _END:
                return
            if isinstance(found, BaseException):
                raise found
            yield found

    def stop(self) -> None:
        """Stop every stage and wait for the threads (writes in progress complete)."""
        self._stopped.set()
        self._budget.wake()
        while True:  # free readers waiting to put
            try:
                self._prepared.get_nowait()
            except queue.Empty:
                break
        for _ in self._devices:
            self._put_end()
        for thread in (*self._readers, *self._devices):
            thread.join()
        self._writing.shutdown(wait=True, cancel_futures=True)

    def _put_end(self) -> None:
        try:
            self._prepared.put_nowait(_END)
        except queue.Full:
            pass  # a device that is still pulling sees the stop

    def _guard(self, stage, *args) -> None:
        """Run a stage; its unexpected error ends the run (reported by :meth:`outcomes`)."""
        try:
            stage(*args)
        except BaseException as exc:  # handed to the caller's thread
            self._stopped.set()
            self._budget.wake()
            self._results.put(exc)

    def _close_when_done(self) -> None:
        for thread in self._readers:
            thread.join()
        for _ in self._devices:
            self._hand_on(_END)
        for thread in self._devices:
            thread.join()
        self._writing.shutdown(wait=True)
        self._results.put(_END)

    # -- reading -------------------------------------------------------------------------------

    def _next_job(self) -> FileJob | None:
        while not self._stopped.is_set():
            with self._items_lock:
                item = next(self._items, _END)
            if item is _END:
                return None
            planned = self.plan(item)
            if isinstance(planned, BatchItem):
                self._results.put(planned)
                continue
            if planned is not None:  # None: it waits for a file with the same bytes
                return planned
        return None

    def _read(self) -> None:
        from napari_sclip.engine.errors import ImageError
        from napari_sclip.io.images import read_with_layout

        while (job := self._next_job()) is not None:
            try:
                status = os.stat(job.path)
                if (status.st_size, status.st_mtime_ns) != job.stat:
                    raise ImageError(f"{job.path}: the file changed while it was being labelled; run again")
                image, layout = read_with_layout(job.path)
                if layout.count != job.count:
                    raise ImageError(f"{job.path}: the file changed while it was being labelled; run again")
            except (ImageError, OSError) as exc:
                reason = describe_os_error(exc, job.path) if isinstance(exc, OSError) else str(exc)
                self._fail(job, job.slices, reason)
                continue
            for k, sliced in enumerate(job.slices):
                if self._stopped.is_set():
                    return
                where = f" (slice {', '.join(map(str, sliced.index))})" if sliced.index is not None else ""
                try:
                    plane = layout.plane(image, sliced.index or ())
                    if sliced.index is not None:  # a view would keep the whole stack in memory
                        plane = plane.copy()
                except ImageError as exc:  # a damaged page: this slice and the rest of the file
                    self._fail(job, job.slices[k:], f"{job.path}{where}: {exc}")
                    break
                if not self._budget.take(plane.nbytes, self._stopped):
                    return
                try:
                    prepared = self.segmenters[0].prepare(
                        plane, self.vocabulary, tag=_Slice(job, sliced, image.shape, image.dtype, plane),
                        **self.run.segment,
                    )
                except ImageError as exc:  # too small for the model
                    self._budget.give(plane.nbytes)
                    self._fail(job, [sliced], f"{job.path}{where}: {exc}")
                    continue
                self._hand_on(prepared)
            del image

    def _hand_on(self, item) -> None:
        """Put ``item`` in the devices' queue, waiting while it is full, unless the run stops."""
        while not self._stopped.is_set():
            try:
                self._prepared.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _fail(self, job: FileJob, slices: Sequence[SliceJob], reason: str) -> None:
        for sliced in slices:
            self._results.put(SliceOutcome(job.path, sliced, reason=reason))

    # -- the model -----------------------------------------------------------------------------

    def _segment(self, model: Segmenter) -> None:
        def pulled() -> Iterator[PreparedImage]:
            while not self._stopped.is_set():
                found = self._prepared.get()
                if found is _END:
                    return
                yield found

        for prepared, canvas in model.run_windows(pulled()):
            if self._stopped.is_set():
                return
            self._writing.submit(self._guard, self._write, model, prepared, canvas)

    # -- writing -------------------------------------------------------------------------------

    def _write(self, model: Segmenter, prepared: PreparedImage, canvas) -> None:
        piece: _Slice = prepared.tag
        try:
            result = model.finish(prepared, canvas)
            del canvas
            sample = piece.sample(self.run.uids[result.labels], result)
            meta = write_sample_files(self.root, piece.sliced.target, sample)
        except SourceChanged as exc:
            self._results.put(SliceOutcome(piece.job.path, piece.sliced, reason=str(exc)))
            return
        finally:
            self._budget.give(piece.plane.nbytes)
        self._results.put(SliceOutcome(piece.job.path, piece.sliced, meta))


@dataclass(frozen=True)
class _Slice:
    """What travels with a prepared image: its file's job, the slice and its pixels."""

    job: FileJob
    sliced: SliceJob
    shape: tuple[int, ...]
    dtype: np.dtype
    plane: np.ndarray

    def sample(self, labels: np.ndarray, result) -> Sample:
        """A 2D image keeps its file (copied when PNG or JPEG; others stored as PNG of the plane,
        its channels last); a stack's slice is stored as PNG, its meta naming the file and the
        slice."""
        path, sha, index = self.job.path, self.job.sha256, self.sliced.index
        if index is None:
            return Sample(path.stem, labels, image=self.plane, source=path, source_sha256=sha,
                          confidence=result.confidence, meta=dict(result.params))
        source = {"path": str(path), "sha256": sha, "shape": list(self.shape), "dtype": str(self.dtype)}
        return Sample(plane_stem(path.stem, index), labels, image=self.plane, confidence=result.confidence,
                      meta={"source": source, "slice": list(index), **result.params})


class _Budget:
    """Bytes of decoded images in the pipeline: taking waits while the budget is spent, except
    for the first image, so one image larger than the budget still runs (alone)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._changed = threading.Condition()

    def take(self, size: int, stopped: threading.Event) -> bool:
        with self._changed:
            while self.used and self.used + size > self.limit:
                if stopped.is_set():
                    return False
                self._changed.wait(0.2)
            self.used += size
            return not stopped.is_set()

    def give(self, size: int) -> None:
        with self._changed:
            self.used -= size
            self._changed.notify_all()

    def wake(self) -> None:
        with self._changed:
            self._changed.notify_all()
