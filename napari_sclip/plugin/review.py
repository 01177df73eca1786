"""Reviewing a dataset in napari, one sample at a time (napari, no Qt).

A :class:`ReviewSession` holds the dataset (as its writer: another process cannot write into it
meanwhile) and shows one sample in three layers, an image, its labels and its confidence, whose
data change as the reviewer moves on.  Opening reads the owner's index only (no image, mask or
meta file: about 35 µs a sample, which :func:`hold_dataset` lets a worker do), and the queue is
ordered from it; the next sample in the queue is read in the background while one is shown.
While the index is read, the sample the review most likely opens at can already be shown
(:func:`first_look`, found in the journal's first rows): opening a dataset of any size shows a
sample in the same time.

Edits are saved as the dataset's own sample (atomically, with its provenance) when the reviewer
moves on, marks a sample reviewed, saves, or closes the session.  Undo works within the open
sample: moving on starts a new history.

    from napari_sclip.plugin.review import open_review
    review = open_review(viewer, "my-dataset")
    review.next(); review.mark_reviewed(); review.close()
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from napari.utils.events import EmitterGroup

from napari_sclip.classes import ClassRegistry
from napari_sclip.dataset.paths import DatasetError
from napari_sclip.dataset.reader import StoredSample, find_dataset_root, read_sample
from napari_sclip.dataset.review import (
    REVIEWED,
    UNREVIEWED,
    Counts,
    QueueOptions,
    counts,
    first_to_review,
    queue,
)
from napari_sclip.dataset.writer import DatasetWriter, Entry, Sample, read_meta
from napari_sclip.engine.errors import SclipError
from napari_sclip.plugin.corrections import IGNORE, below_confidence, region_at, set_pixels
from napari_sclip.plugin.io import export_classes
from napari_sclip.plugin.layers import (
    class_colormap,
    class_features,
    confidence_name,
    labels_name,
    locked,
)
from napari_sclip.plugin.records import RECORDS
from napari_sclip.plugin.runner import colour_last
from napari_sclip.plugin.state import LabelsState

#: Keys of the review, bound on the viewer while a session is open.
KEYS = {"PageDown": "next", "PageUp": "previous", "Shift-R": "toggle_reviewed", "G": "toggle_region_tool"}
#: Shown for ignore (label 0) in the review's labels layer: ignored pixels stay visible.
IGNORE_COLOR = (0.15, 0.15, 0.15, 0.55)


def open_review(viewer, path: str | Path, options: QueueOptions | None = None) -> ReviewSession:
    """Open the dataset at ``path`` (its folder or manifest) for review in ``viewer``: its first
    sample not yet reviewed (in the queue's order) is shown.

    Raises :class:`DatasetError` (one line) when ``path`` is no dataset, or another process holds it.
    """
    root = dataset_root(path)
    writer = hold_dataset(root)
    session = ReviewSession(viewer, root, options or QueueOptions())
    try:
        session.attach(writer)
    except BaseException:
        session.close(give_up=True)
        raise
    return session


def dataset_root(path: str | Path) -> Path:
    """The dataset folder of ``path`` (the folder or its manifest); a :class:`DatasetError` if it
    is none (cheap: reads the manifest's format name only)."""
    from napari_sclip.dataset.format import MANIFEST

    root = find_dataset_root(path)
    if root is not None:
        return root
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path} does not exist")
    above = next((parent for parent in path.resolve().parents if find_dataset_root(parent) is not None), None)
    hint = f"; it is inside the dataset {above}: open that" if above is not None else ""
    raise DatasetError(f"{path} is not a napari-sclip dataset (it has no {MANIFEST} of this format){hint}")


def hold_dataset(root: Path) -> DatasetWriter:
    """Take the dataset as its owner and read its index: the part of opening whose time grows with
    the dataset, safe to run in a worker thread."""
    import os
    import time

    from napari_sclip.dataset.lock import LOCK_NAME, REVIEW, read_lock

    deadline = time.monotonic() + 30
    while True:
        try:
            return DatasetWriter(root, activity=REVIEW)
        except DatasetError:
            # A review of it in this process that was just closed gives it back from the GUI
            # thread (once its own opening ends): wait for that, not for other programs.
            held = read_lock(root / LOCK_NAME)
            if held is None or held[0] is None or held[0].pid != os.getpid() or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@dataclass(frozen=True)
class FirstLook:
    """A sample read before the dataset is held, to show (read-only) while the owner reads the
    index; the classes it was read with (the manifest's), and its meta file's stat key then (a
    sample rewritten since has a new one: the owner's writes replace the meta file last)."""

    sample: StoredSample
    registry: ClassRegistry
    train_ids: dict[int, int]
    meta_stat: tuple[int, ...]


def first_look(root: Path) -> FirstLook | None:
    """The sample a review of ``root`` most likely opens at, read without holding the dataset (in
    milliseconds whatever its size; safe in a worker).  ``None`` when the dataset has no journal
    to find it in, anyone holds it (this process too: another viewer may), the sample changed
    while it was read, or anything is amiss: the owner's scan says what."""
    from napari_sclip.dataset import format as fmt
    from napari_sclip.dataset.lock import LOCK_NAME, read_lock

    try:
        if read_lock(root / LOCK_NAME) is not None:
            return None  # its holder may be writing that very sample
        where = first_to_review(root)
        if where is None:
            return None
        _, registry, train_ids = fmt.read_manifest(root)
        before = _meta_stat(root, *where)
        sample = read_sample(root, *where, train_ids)
        if _meta_stat(root, *where) != before:
            return None
        return FirstLook(sample, registry, train_ids, before)
    except (SclipError, OSError, ValueError):
        return None


def _meta_stat(root: Path, split: str, image_id: str) -> tuple[int, ...]:
    import os

    from napari_sclip.dataset.paths import resolve_inside
    from napari_sclip.dataset.writer import stat_key

    return stat_key(os.stat(resolve_inside(root, f"{split}/meta/{image_id}.json")))


def open_in_steps(root: Path, shown: threading.Event) -> Iterator[FirstLook]:
    """A worker's opening of ``root``: yields a :func:`first_look` where there is one, then
    returns the held dataset (:func:`hold_dataset`).  The owner's scan waits for ``shown`` (the
    look on screen, for at most a few seconds): it holds the interpreter most of its time, and
    would slow the GUI thread's showing of the look down."""
    look = first_look(root)
    if look is not None:
        yield look
        shown.wait(5)
    return hold_dataset(root)


class ReviewSession:
    """One dataset under review in one viewer (see the module's documentation).

    A session starts *opening*: it may show a :class:`FirstLook` (read-only: it was read without
    holding the dataset), and it cannot save, move or correct until :meth:`attach` gives it the
    held dataset.

    ``events.changed`` is emitted whenever the sample shown, the queue, the counts, the review
    mark or the region tool change; ``events.edited`` whenever the labels shown change;
    ``events.error(value=message)`` when something done outside the panel (the widget's reviewed
    box) could not be saved.
    """

    def __init__(self, viewer, root: Path, options: QueueOptions) -> None:
        self.viewer = viewer
        self.root = root
        self.events = EmitterGroup(source=self, changed=None, edited=None, error=None)
        self._writer: DatasetWriter | None = None  # set by attach
        self._look: FirstLook | None = None
        self._options = options
        self._ids: list[str] = []
        self.queue_version = 0  # goes up whenever the queue is ordered or filtered anew
        self._counts: Counts | None = None
        self._position = -1
        self._sample: StoredSample | None = None
        self._layers: dict[str, object] = {}  # "image", "labels", "confidence"
        self._state: LabelsState | None = None  # the labels layer's, while it shows this sample
        self._dirty = False
        self._replacing = False
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="napari-sclip prefetch")
        self._loading: dict[str, Future] = {}
        self._closed = False
        self._preview = None  # the accept-by-confidence preview layer
        #: Asked which class a clicked region becomes (the panel's menu): point -> uid, or None.
        self.region_chooser: Callable[[tuple[float, float]], int | None] | None = None
        self.region_tool = False
        for key, action in KEYS.items():
            viewer.bind_key(key, self._key_action(action), overwrite=True)
        viewer.layers.events.removed.connect(self._on_removed)
        RECORDS.events.changed.connect(self._on_record_changed)
        RECORDS.events.settle.connect(self._on_settle)
        #: Why the first sample could not be shown (a damaged file), or ``None``: the rest of the
        #: dataset opens all the same.
        self.open_error: str | None = None

    # -- opening -----------------------------------------------------------------------------------

    @property
    def opening(self) -> bool:
        """Whether the dataset is not held yet (:meth:`attach` not called)."""
        return self._writer is None

    def show_first_look(self, look: FirstLook) -> None:
        """Show ``look``'s sample, read-only, while the dataset opens."""
        self._look = look
        self._show(look.sample)
        self._layers["labels"].editable = False
        self.events.changed()

    def attach(self, writer: DatasetWriter) -> None:
        """Hold the dataset through ``writer`` (its index read): the queue, the counts, saving and
        corrections work from now on.  The review goes to the first sample of the queue not
        reviewed; a first look stays shown if it is that sample, unchanged on disk since."""
        self._writer = writer
        self._ids = queue(writer.entries(), self._options)
        self.queue_version += 1
        labels = self._layer("labels")
        if self._look is not None and labels is not None:
            labels.editable = True
        shown = self._sample
        first = self._first_not_reviewed()
        if shown is not None and self._ids[first:first + 1] == [shown.id] and self._as_stored(shown):
            self._position = first
            self._prefetch()
            self.events.changed()
            return
        try:
            if self._ids:
                self._go(first)
            else:
                self.events.changed()
        except SclipError as exc:  # a damaged first sample (DatasetError, ImageError)
            self.open_error = str(exc)
            self.events.changed()

    def _as_stored(self, sample: StoredSample) -> bool:
        """Whether ``sample`` (read before the dataset was held) is what is stored now."""
        writer, look = self._writer, self._look
        try:
            unchanged = look is not None and _meta_stat(self.root, sample.split, sample.id) == look.meta_stat
        except OSError:
            return False
        return (unchanged and writer.entries().get(sample.id) == Entry.of(sample.split, sample.meta)
                and writer.registry.to_json() == look.registry.to_json() and writer.train_ids == look.train_ids)

    def _owner(self) -> DatasetWriter:
        if self._writer is None:
            raise DatasetError(f"{self.root} is still opening (its index is being read): try again in a moment")
        return self._writer

    def _first_not_reviewed(self) -> int:
        """The position of the queue's first sample not reviewed (0 if all are)."""
        entries = self._writer.entries()
        return next((k for k, i in enumerate(self._ids) if entries[i].review_status != REVIEWED), 0)

    # -- the queue ---------------------------------------------------------------------------------

    @property
    def options(self) -> QueueOptions:
        return self._options

    def set_options(self, options: QueueOptions) -> None:
        """Order and filter the queue anew; the sample shown stays if the queue keeps it, else the
        first one not reviewed is shown."""
        self._options = options
        self._ids = queue(self._owner().entries(), options)
        self.queue_version += 1
        current = self.current_id
        # -1: the sample shown is not in this queue (it stays shown if the next cannot be).
        self._position = self._ids.index(current) if current in self._ids else -1
        if self._position < 0 and self._ids:
            self._go(self._first_not_reviewed())
        else:
            self._prefetch()
            self.events.changed()

    @property
    def ids(self) -> list[str]:
        """The queue: the ids of the samples the options keep, in their order."""
        return list(self._ids)

    def ids_at(self, positions) -> dict[int, str]:
        """The ids at these positions of the queue (those that exist)."""
        return {k: self._ids[k] for k in positions if 0 <= k < len(self._ids)}

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def position(self) -> int:
        """The index of the sample shown in :attr:`ids` (-1 when it left the queue or none is)."""
        return self._position

    @property
    def current_id(self) -> str | None:
        return self._sample.id if self._sample is not None else None

    def counts(self) -> Counts:
        """Reviewed, edited and unreviewed samples of the whole dataset (counted once on opening,
        then kept up to date as samples are saved)."""
        if self._counts is None:
            self._counts = counts(self._owner().entries())
        return self._counts

    def dataset_classes(self) -> list[tuple[int, str]]:
        """``(training id, name)`` of every class of the dataset, by training id."""
        writer = self._owner()
        return sorted((train_id, writer.registry.display_name(uid)) for uid, train_id in writer.train_ids.items())

    @property
    def labels_layer(self):
        """The labels layer of the sample shown (``None`` once removed from the viewer)."""
        return self._layer("labels")

    def status(self, image_id: str) -> str:
        """A sample's review status as stored (``unreviewed``, ``edited`` or ``reviewed``)."""
        return self._owner().entries()[image_id].review_status

    # -- moving ------------------------------------------------------------------------------------

    def next(self) -> None:
        """Save the sample shown (if changed) and show the next one in the queue."""
        if self._position + 1 < len(self._ids):
            self._go(self._position + 1)

    def previous(self) -> None:
        if self._position > 0:
            self._go(self._position - 1)

    def goto(self, image_id: str) -> None:
        """Show the sample ``image_id`` (one of :attr:`ids`)."""
        if image_id not in self._ids:
            raise DatasetError(f"no sample {image_id!r} in the review queue of {self.root}")
        self._go(self._ids.index(image_id))

    def _check_not_written(self) -> None:
        """Refuse while a Segment run writes into the labels shown (the layer is locked meanwhile):
        moving on would put the rest of its labels into the next sample."""
        labels = self._layer("labels")
        if labels is not None and not labels.editable:
            if self.opening:
                self._owner()  # says so
            raise DatasetError("the labels are being written by a Segment run: move on once it is done")

    def _go(self, position: int) -> None:
        self._check_not_written()
        self.save()  # raises (and stays) if the edits cannot be written
        image_id = self._ids[position]
        sample = self._load(image_id)
        self._show(sample)
        self._position = position
        self._prefetch()
        self.events.changed()

    def _load(self, image_id: str) -> StoredSample:
        future = self._loading.pop(image_id, None)
        if future is not None:
            return future.result()
        return self._read(image_id)

    def _read(self, image_id: str) -> StoredSample:
        return read_sample(self.root, self._writer.entries()[image_id].split, image_id, self._writer.train_ids)

    def _prefetch(self) -> None:
        """Read the next sample in the background; forget what else was read ahead."""
        ahead = self._ids[self._position + 1] if 0 <= self._position < len(self._ids) - 1 else None
        for image_id in [i for i in self._loading if i != ahead]:
            self._loading.pop(image_id).cancel()
        if ahead is not None and ahead not in self._loading:
            self._loading[ahead] = self._loader.submit(self._read, ahead)

    # -- the layers --------------------------------------------------------------------------------

    def _show(self, sample: StoredSample) -> None:
        """Put ``sample`` into the review's layers (made, or remade where the image's kind changed)."""
        viewer = self.viewer
        classes = self._writer.registry if self._writer is not None else self._look.registry
        registry = ClassRegistry.from_json(classes.to_json())  # the layer's own copy
        review_status = REVIEWED if sample.meta.get("review_status") == REVIEWED else UNREVIEWED
        # The layers get copies: the sample stays what is stored, to tell what a person changed.
        state = LabelsState(registry, sample.edited.copy(), {(): sample.meta}, review_status)
        rgb = colour_last(sample.image.shape)
        image = self._layer("image")
        self._replacing = True
        try:
            if image is not None and (image.rgb != rgb or image.data.ndim != sample.image.ndim):
                viewer.layers.remove(image)
                image = None
            labels, confidence = self._layer("labels"), self._layer("confidence")
            if labels is not None:  # names first: the widget then has no rename to follow
                labels.name = labels_name(sample.id)
            if confidence is not None:
                confidence.name = confidence_name(sample.id)
            if image is None:
                image = viewer.add_image(sample.image, name=sample.id, rgb=rgb)
                for above in (confidence, labels):  # a remade image goes back under its layers
                    if above is not None:
                        viewer.layers.move(viewer.layers.index(image), viewer.layers.index(above))
                        break
            else:
                image.name = sample.id
                image.data = sample.image
                if not rgb or sample.image.dtype != np.uint8:
                    image.reset_contrast_limits()
            image.metadata["dataset_image"] = str(self.root / sample.split / sample.meta["image"])
            if sample.confidence is not None:
                if confidence is None:
                    confidence = viewer.add_image(sample.confidence.copy(), name=confidence_name(sample.id), colormap="magma",
                                                  contrast_limits=(0.0, 1.0), opacity=0.6, visible=False)
                    if labels is not None:  # the labels stay on top, where one paints
                        viewer.layers.move(viewer.layers.index(confidence), viewer.layers.index(labels))
                else:
                    confidence.data = sample.confidence.copy()
            elif confidence is not None:
                viewer.layers.remove(confidence)
                confidence = None
            if labels is None:
                metadata: dict = {}
                state.store(metadata)
                labels = viewer.add_labels(sample.labels.copy(), name=labels_name(sample.id), metadata=metadata)
                labels.events.paint.connect(self._on_paint)
                labels.events.data.connect(self._on_paint)
                self._bind_layer(labels)
            else:
                with locked(labels):  # a new undo history: undo stays within one sample
                    labels.data = sample.labels.copy()
            labels.colormap = class_colormap(registry, ignore=IGNORE_COLOR)
            labels.features = class_features(registry)
            self.clear_preview()
            RECORDS.replace(labels, state)
            self._state = state
            self._layers = {"image": image, "labels": labels, "confidence": confidence}
            if viewer.layers.selection.active is not labels:
                viewer.layers.selection.active = labels
            if self._sample is None or self._sample.image.shape[:2] != sample.image.shape[:2]:
                viewer.reset_view()
        finally:
            self._replacing = False
        self._sample = sample
        self._dirty = False

    def _layer(self, kind: str):
        """The review's layer of this kind, if it is still in the viewer."""
        layer = self._layers.get(kind)
        return layer if layer is not None and layer in self.viewer.layers else None

    def _on_paint(self, event=None) -> None:
        if not self._replacing:
            self._dirty = True
            self.events.edited()

    def _on_removed(self, event) -> None:
        RECORDS.forget(event.value)

    def _settle_edits(self, data: np.ndarray) -> None:
        """A person's edits: those stored, and the pixels they changed since (not strokes undone,
        which napari's undo does not report)."""
        state, sample = self._state, self._sample
        state.edited[...] = sample.edited | (state.edited & (data != sample.labels))

    def _on_settle(self, event) -> None:
        labels = self._layer("labels")
        if labels is not None and event.value == labels.unique_id and self._state is not None:
            self._settle_edits(np.asarray(labels.data))

    def _on_record_changed(self, event) -> None:
        """The widget marked the sample (or a re-run unmarked it): save the mark now, as the
        panel's box does."""
        from napari.utils.notifications import show_error

        labels = self._layer("labels")
        if self._replacing or labels is None or event.value != labels.unique_id:
            return
        try:
            self.save()
        except SclipError as exc:
            message = " ".join(str(exc).split())
            stored = REVIEWED if self._sample.meta.get("review_status") == REVIEWED else UNREVIEWED
            if self._state.review_status != stored:  # the mark is not taken: every box shows so
                self._state.review_status = stored
                self._state.store(labels.metadata)
                RECORDS.changed(labels)
            self.events.error(value=message)
            show_error(f"SCLIP review: {message}")
        self.events.changed()

    # -- saving ------------------------------------------------------------------------------------

    @property
    def unsaved(self) -> bool:
        """Whether the sample shown has edits or a review mark not saved yet (the widget's
        reviewed box and its re-runs change them too)."""
        if self._sample is None or self._state is None:
            return False
        stored = REVIEWED if self._sample.meta.get("review_status") == REVIEWED else UNREVIEWED
        if self._state.review_status != stored:
            return True
        if not self._dirty:
            return False
        # Strokes undone, or painted with the value already there, change nothing to save.
        labels, confidence = self._layers["labels"], self._layers["confidence"]
        return not np.array_equal(labels.data, self._sample.labels) or (
            confidence is not None and not np.array_equal(confidence.data, self._sample.confidence))

    def mark_reviewed(self, reviewed: bool = True) -> None:
        """Mark the sample shown as checked by a person (or not), and save it."""
        if self._state is None:
            return
        before = self._state.review_status
        self._state.review_status = REVIEWED if reviewed else UNREVIEWED
        labels = self._layers["labels"]
        try:
            self.save()
        except SclipError:
            self._state.review_status = before  # not marked: the box shows what is stored
            raise
        finally:
            self._state.store(labels.metadata)

    def save(self) -> bool:
        """Write the sample shown if it changed: its labels, the pixels a person edited, its review
        mark, and its confidence (a re-run may have changed it); returns whether it wrote.  Raises
        :class:`DatasetError` (one line) when it cannot, and the edits stay unsaved.

        The layers are saved even once removed from the viewer (a closing window removes them
        before it closes the review)."""
        if not self.unsaved:
            return False
        self._check_not_written()
        writer = self._owner()
        sample, state = self._sample, self._state
        labels, confidence = self._layers["labels"], self._layers["confidence"]
        before, status_before = self._counts, self.status(sample.id)
        stored_image = self.root / sample.split / sample.meta["image"]
        # A re-run may have brought new classes, a brush a value no class has: the dataset names
        # them before the mask is written (else they would be stored as ignore).
        data = np.array(labels.data)
        writer.adopt_classes(export_classes(state.classes, data))
        self._settle_edits(data)
        scores = np.array(confidence.data) if confidence is not None else None
        writer.rewrite(sample.id, Sample(
            stem=sample.id,
            labels=data,
            image=sample.image,  # stored as PNG where its file cannot be copied as is
            source=stored_image,
            confidence=scores,
            edited=state.edited,
            meta={**state.slices.get((), sample.meta), "review_status": state.review_status},
        ))
        self._counts = None if before is None else before.moved(status_before, self.status(sample.id))
        meta = read_meta(self.root / sample.split / "meta" / f"{sample.id}.json")
        state.slices[()] = meta
        state.store(labels.metadata)
        self._sample = StoredSample(sample.id, sample.split, sample.image, data, scores, state.edited.copy(), meta)
        self._dirty = False
        self.events.changed()
        RECORDS.changed(labels)  # the widget's reviewed box follows
        return True

    def close(self, *, give_up: bool = False) -> None:
        """Save the sample shown and give the dataset up (its layers stay in the viewer, named
        "<id> (review closed)").

        When the save fails (a full disk), the error is raised and the review stays open, so that
        a retry may save the edits; with ``give_up`` (the window is closing) the dataset is given
        up all the same, and the save's error raised afterwards.
        """
        if self._closed:
            return
        failed: SclipError | None = None
        try:
            self.save()
        except SclipError as exc:
            if not give_up:
                raise
            failed = exc
        self._closed = True
        for key in KEYS:
            self.viewer.bind_key(key, None)
        self.viewer.layers.events.removed.disconnect(self._on_removed)
        RECORDS.events.changed.disconnect(self._on_record_changed)
        RECORDS.events.settle.disconnect(self._on_settle)
        for future in self._loading.values():
            future.cancel()
        self._loader.shutdown(wait=True)
        self.clear_preview()
        self._detach_layers()
        try:
            if self._writer is not None:
                self._writer.close()
        except SclipError:
            if failed is None:
                raise
        if failed is not None:  # the first error says what was lost
            raise failed

    def _detach_layers(self) -> None:
        """Rename the layers of a closed review (they stay, saved), so that a later review of the
        dataset in this viewer gets the plain names (derived names first: the widget pairs by name)."""
        if self._sample is None:
            return
        detached = f"{self._sample.id} (review closed)"
        for kind, name in (("labels", labels_name(detached)), ("confidence", confidence_name(detached)),
                           ("image", detached)):
            layer = self._layer(kind)
            if layer is not None:
                layer.name = name

    # -- corrections -------------------------------------------------------------------------------

    def classes(self) -> list[tuple[int, str]]:
        """``(uid, name)`` of the sample's classes, in the order of their number keys (1-9)."""
        if self._state is None:
            return []
        classes = self._state.classes
        return [(uid, classes.display_name(uid)) for uid in classes.active]

    def class_of_key(self, key: int) -> int:
        """The label value number key ``key`` stands for: 0 ignore, 1-9 the classes in order."""
        if key == 0:
            return IGNORE
        classes = self.classes()
        if not 1 <= key <= len(classes):
            raise DatasetError(f"no class has key {key}: the dataset has {len(classes)} class(es)")
        return classes[key - 1][0]

    def pick_class(self, key: int) -> None:
        """Paint with the class of number key ``key`` (0: ignore)."""
        labels = self._layer("labels")
        if labels is None:
            return
        labels.selected_label = self.class_of_key(key)
        if labels.mode not in ("paint", "fill", "polygon"):
            labels.mode = "paint"

    def reassign_region(self, point: tuple[float, float], uid: int) -> int:
        """Give the connected region at ``point`` (data coordinates) the label ``uid`` (0: ignore),
        as one undo step; returns how many pixels changed."""
        labels = self._layer("labels")
        if labels is None:
            return 0
        self._check_not_written()
        return set_pixels(labels, region_at(labels.data, point), uid)

    def reassign_under_cursor(self, key: int) -> int:
        """:meth:`reassign_region` at the mouse cursor, with number key ``key``'s class."""
        labels = self._layer("labels")
        if labels is None:
            return 0
        return self.reassign_region(tuple(labels.world_to_data(self.viewer.cursor.position))[-2:],
                                    self.class_of_key(key))

    def toggle_region_tool(self) -> None:
        """Clicking a region asks for its class (the panel's menu) while the tool is on."""
        self.region_tool = not self.region_tool
        labels = self._layer("labels")
        if self.region_tool and labels is not None:
            labels.mode = "pan_zoom"  # napari's own tools must not act on the click
        self.events.changed()

    def _on_click(self, layer, event):
        if not (self.region_tool and event.button == 1 and self.region_chooser is not None):
            return
        yield
        if event.type == "mouse_move":  # a drag pans the view: no region
            return
        point = tuple(layer.world_to_data(event.position))[-2:]
        uid = self.region_chooser(point)
        if uid is not None:
            self.reassign_region(point, uid)

    def preview_accept(self, threshold: float) -> int:
        """Show which labelled pixels "accept by confidence" would set to ignore (confidence below
        ``threshold``), in a layer of their own; returns how many."""
        labels, confidence = self._layer("labels"), self._layer("confidence")
        if labels is None or confidence is None:
            raise DatasetError(f"{self.current_id} has no confidence map to accept by")
        below = below_confidence(labels.data, confidence.data, threshold)
        name = f"{self.current_id}: set to ignore below {threshold:g}"
        preview = self._preview if self._preview is not None and self._preview in self.viewer.layers else None
        if preview is None:
            preview = self.viewer.add_image(below.astype(np.uint8), name=name, colormap="red", opacity=0.6,
                                            contrast_limits=(0, 1), blending="additive")
            self.viewer.layers.selection.active = labels
        else:
            preview.data, preview.name = below.astype(np.uint8), name
        self._preview = preview
        return int(below.sum())

    def accept_by_confidence(self, threshold: float) -> int:
        """Keep the labels where confidence is at least ``threshold`` and set the rest to ignore, as
        one undo step; returns how many pixels changed."""
        labels, confidence = self._layer("labels"), self._layer("confidence")
        if labels is None or confidence is None:
            raise DatasetError(f"{self.current_id} has no confidence map to accept by")
        self._check_not_written()
        changed = set_pixels(labels, below_confidence(labels.data, confidence.data, threshold), IGNORE)
        self.clear_preview()
        return changed

    def clear_preview(self) -> None:
        preview, self._preview = self._preview, None
        if preview is not None and preview in self.viewer.layers:
            self.viewer.layers.remove(preview)

    def _bind_layer(self, labels) -> None:
        """Number keys pick a class to paint (napari's 1-7 mode keys give way on this layer only);
        Ctrl+number gives the region under the cursor that class; a click asks, with the region
        tool on."""
        for key in range(10):
            labels.bind_key(str(key), self._key_action("pick_class", key), overwrite=True)
            labels.bind_key(f"Control-{key}", self._key_action("reassign_under_cursor", key), overwrite=True)
        labels.mouse_drag_callbacks.append(self._on_click)

    # -- keys --------------------------------------------------------------------------------------

    def toggle_reviewed(self) -> None:
        if self._state is not None:
            self.mark_reviewed(self._state.review_status != REVIEWED)

    def _key_action(self, name: str, *args):
        def action(viewer_or_layer) -> None:
            from napari.utils.notifications import show_error

            try:
                getattr(self, name)(*args)
            except SclipError as exc:
                show_error(f"SCLIP review: {' '.join(str(exc).split())}")

        action.__doc__ = f"napari-sclip review: {name.replace('_', ' ')} {' '.join(map(str, args))}".strip()
        return action
