"""The "SCLIP review" dock panel: a dataset's queue, its counts, and the controls of a
:class:`~napari_sclip.plugin.review.ReviewSession` (Qt, through qtpy only).

The panel only shows and forwards: ordering, filtering, moving and saving are the session's.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from qtpy.QtCore import QEvent, QObject, QStringListModel, Qt, QTimer
from qtpy.QtGui import QColor, QCursor, QIcon, QPixmap
from qtpy.QtWidgets import (
    QApplication,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QListView,
    QListWidget,
    QListWidgetItem,
    QMenu,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from napari_sclip.colors import label_color
from napari_sclip.dataset.paths import DatasetError
from napari_sclip.dataset.review import ORDERS, REVIEWED, STATUS_FILTERS, QueueOptions
from napari_sclip.dataset.splits import SPLIT_NAMES
from napari_sclip.engine.errors import SclipError
from napari_sclip.plugin.corrections import IGNORE, class_pixel_counts
from napari_sclip.plugin.evaluate_section import EvaluateSection

if TYPE_CHECKING:
    from napari_sclip.plugin.review import ReviewSession

PANEL_NAME = "SCLIP review"
_log = logging.getLogger(__name__)


def show_review(viewer, path: str | Path) -> ReviewPanel:
    """Open the dataset at ``path`` for review in ``viewer``, in a docked panel (replacing the
    viewer's previous review, which is saved and closed first).

    The panel docks at once; the dataset's index is read in a worker thread (its time grows with
    the dataset), meanwhile the sample the review most likely opens at is shown, and
    :attr:`ReviewPanel.session` is set (:attr:`ReviewSession.opening` until the index is read).  A path
    that is no dataset is a :class:`DatasetError` here; a dataset that cannot be opened (held by
    another process, damaged) is one line in the panel and in napari's notifications.
    """
    from napari_sclip.plugin.review import dataset_root

    root = dataset_root(path)
    window = viewer.window
    previous = window.dock_widgets.get(PANEL_NAME)
    if isinstance(previous, ReviewPanel) and not previous.close_review():
        raise DatasetError(f"the review of {previous.root} is still open: its edits could not be saved")
    if _sclip_widget(viewer) is None:
        window.add_plugin_dock_widget("napari-sclip", "SCLIP segmentation")  # to segment a sample again
    panel = ReviewPanel(viewer, root)
    window.add_dock_widget(panel, name=PANEL_NAME, area="right")
    panel.follow_window()
    panel.start()  # a review of it still opening gives it back first (hold_dataset waits)
    return panel


class ReviewPanel(QWidget):
    """Counts, queue, order and filters, and the buttons of a review."""

    _watched: QObject | None = None  # the window whose closing closes the review
    _shown_queue = -1  # the session's queue_version the list shows
    _shown_position = -1
    _shown_id: str | None = None

    def __init__(self, viewer, root: Path, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer, self.root = viewer, root
        #: The review, from its first look or once the dataset is open (``None`` before, after
        #: closing or failing).
        self.session: ReviewSession | None = None
        self._worker = None
        self._look_shown = threading.Event()  # the first look is on screen: the index may be read
        self._closed = False
        self._class_ids: list[int | None] = [None]

        self._title = QLabel(str(root))
        self._title.setWordWrap(True)
        self._title.setToolTip("The dataset under review; no other process can write into it meanwhile")
        self._counts = QLabel()
        self._progress = QProgressBar()
        self._progress.setToolTip("Samples reviewed, out of all")
        self._order = _combo(ORDERS, "The order of the queue")
        self._threshold = _confidence_box(0.1, 0.9, 0.1, "'most uncertain pixels first' counts the pixels below "
                                          "this confidence")
        self._status_filter = _combo(STATUS_FILTERS, "Show only samples with this review status: 'not reviewed' "
                                     "is unreviewed and edited ones; 'unreviewed', those nobody touched")
        self._split = _combo(("all", *SPLIT_NAMES), "Show only one split")
        self._class = _combo(["any class"], "Show only samples whose labels hold this class")
        self._model = QStringListModel()
        self._list = QListView()
        self._list.setModel(self._model)
        self._list.setEditTriggers(QListView.EditTrigger.NoEditTriggers)
        self._list.setUniformItemSizes(True)  # laying out 20,000 rows must not measure each one
        self._list.setToolTip("The queue; click a sample to open it")
        self._list.clicked.connect(lambda index: self._run(lambda: self.session.goto(self.session.ids[index.row()])))
        self._previous = _button("◀ Previous", "Save and show the previous sample (PageUp)",
                                 lambda: self.session.previous())
        self._next = _button("Next ▶", "Save and show the next sample (PageDown)", lambda: self.session.next())
        self._reviewed = QCheckBox("reviewed")
        self._reviewed.setToolTip("Mark the sample as checked by a person, and save it (Shift+R)")
        self._reviewed.toggled.connect(lambda checked: self._run(lambda: self.session.mark_reviewed(checked)))
        self._save = _button("Save", "Save the sample's edits now (moving on saves them too)", lambda: self.session.save())
        self._close = QPushButton("Close review")  # also once opening failed: not through _run
        self._close.setToolTip("Save, and give the dataset up")
        self._close.clicked.connect(lambda *_: self.close_review())
        self._message = QLabel()
        self._message.setWordWrap(True)

        self._classes = QListWidget()
        self._classes.setToolTip("Key, colour and pixels in this sample of each class: click one (or press its "
                                 "number) to paint with it; 0 is ignore")
        self._classes.itemClicked.connect(lambda item: self._run(lambda: self.session.pick_class(self._classes.row(item))))
        self._region = QCheckBox("region tool (G)")
        self._region.setToolTip("Click a region of the labels to choose its class from a menu; Ctrl+number sets "
                                "the region under the cursor at once")
        self._region.toggled.connect(lambda _: self._run(lambda: self.session.toggle_region_tool()))
        self._accept_threshold = _confidence_box(0.0, 1.0, 0.05, "Accept the labels where confidence is at least "
                                                 "this; the rest become ignore")
        self._preview = QCheckBox("preview")
        self._preview.setToolTip("Show in red the pixels that would become ignore")
        self._preview.toggled.connect(lambda _: self._run(self._show_preview))
        self._accept_threshold.valueChanged.connect(lambda _: self._run(self._show_preview))
        self._accept = _button("Accept", "Keep the labels at or above the confidence; set the rest to ignore (Ctrl+Z "
                               "undoes it)", self._accept_by_confidence)
        self._pixels = QTimer(self)  # pixel counts follow strokes, at most five times a second
        self._pixels.setSingleShot(True)
        self._pixels.setInterval(200)
        self._pixels.timeout.connect(self._refresh_classes)

        form = QFormLayout()
        form.addRow("order", self._order)
        form.addRow("uncertain below", self._threshold)
        form.addRow("status", self._status_filter)
        form.addRow("split", self._split)
        form.addRow("class", self._class)
        moves = QHBoxLayout()
        moves.addWidget(self._previous)
        moves.addWidget(self._next)
        marks = QHBoxLayout()
        marks.addWidget(self._reviewed)
        marks.addWidget(self._save)
        marks.addWidget(self._close)
        content = QWidget()  # scrolls: the panel is taller than a laptop's screen once Evaluate unfolds
        layout = QVBoxLayout(content)
        layout.addWidget(self._title)
        layout.addWidget(self._counts)
        layout.addWidget(self._progress)
        layout.addLayout(form)
        layout.addWidget(self._list, stretch=1)
        layout.addLayout(moves)
        layout.addLayout(marks)
        layout.addWidget(self._message)
        keys = QLabel("classes (number keys pick, Ctrl+number sets the region under the cursor)")
        keys.setWordWrap(True)
        layout.addWidget(keys)
        layout.addWidget(self._classes)
        layout.addWidget(self._region)
        accept = QHBoxLayout()
        accept.addWidget(QLabel("accept confidence ≥"))
        accept.addWidget(self._accept_threshold)
        accept.addWidget(self._preview)
        accept.addWidget(self._accept)
        layout.addLayout(accept)
        self.evaluate = EvaluateSection(root, lambda: _sclip_widget(self.viewer), self._save_for_evaluation)
        layout.addWidget(self.evaluate)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        scroll.setWidget(content)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self._scroll = scroll
        self._fit_width()
        self.evaluate.unfold.toggled.connect(lambda _: QTimer.singleShot(0, self._fit_width))
        # The queue and the class list in view, whatever the widgets above take; more scrolls.
        scroll.setMinimumHeight(min(content.sizeHint().height(), 560))
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)

        for combo in (self._order, self._status_filter, self._split, self._class):
            combo.currentIndexChanged.connect(self._apply_options)
        self._threshold.valueChanged.connect(self._apply_options)
        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(lambda: self.close_review(give_up=True))
        self._set_enabled(False)

    def _fit_width(self) -> None:
        """As wide as the widest control shown, and its vertical scroll bar (never sideways)."""
        scroll = self._scroll
        scroll.setMinimumWidth(scroll.widget().minimumSizeHint().width() + scroll.verticalScrollBar().sizeHint().width())

    # -- opening -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Read the dataset's index in a worker, showing the first sample meanwhile where the
        journal tells which it is."""
        from napari.qt.threading import create_worker

        from napari_sclip.plugin.review import open_in_steps

        self._message.setText(f"reading the index of {_sample_count(self.root)} in {self.root}…")
        self._worker = create_worker(open_in_steps, self.root, self._look_shown, _start_thread=False,
                                     _ignore_errors=True)
        self._worker.yielded.connect(self._first_look)
        self._worker.returned.connect(self._opened)
        self._worker.errored.connect(self._failed)
        self._worker.start()

    def _new_session(self) -> ReviewSession:
        from napari_sclip.plugin.review import ReviewSession

        session = ReviewSession(self.viewer, self.root, self.queue_options())
        session.events.changed.connect(self._refresh)
        session.events.edited.connect(self._on_edited)
        session.events.error.connect(self._on_error)
        session.region_chooser = self._choose_region
        self.session = session
        # The panel took room from the canvas: show the whole image in what is left.
        QTimer.singleShot(0, self.viewer.reset_view)
        return session

    def _first_look(self, look) -> None:
        try:
            if not self._closed:
                self._new_session().show_first_look(look)
        except Exception as exc:
            _log.warning("the first look at %s failed: %s", self.root, exc)
        finally:
            QTimer.singleShot(0, self._look_shown.set)  # once the events it posted (drawing) are done

    def _opened(self, writer) -> None:
        self._worker = None
        if self._closed:  # closed while opening: give the dataset straight back
            writer.close()
            return
        try:
            (self._new_session() if self.session is None else self.session).attach(writer)
        except Exception as exc:
            self._failed(exc, writer)
            return
        self._set_enabled(True)
        self._refresh()

    def _failed(self, error, writer=None) -> None:
        """Say why the dataset did not open, and give up what it had (``writer``: held)."""
        from napari.utils.notifications import show_error

        self._worker = None
        session, self.session = self.session, None
        try:
            if session is not None:
                self._forget(session, give_up=True)
        except Exception:  # a bug: the dataset is given back all the same
            _log.exception("closing a review that failed to open")
        finally:
            try:
                if writer is not None:
                    writer.close()  # idempotent: the session may have closed it
            except SclipError as exc:
                _log.warning("giving %s back: %s", self.root, exc)
        if not isinstance(error, SclipError):
            _log.error("opening a review failed", exc_info=error)  # a bug: keep the traceback
        message = " ".join(str(error).split()) if isinstance(error, SclipError) else f"{type(error).__name__}: {error}"
        self._message.setText(f"error: {message}")
        show_error(f"SCLIP review: {message}")

    def _set_enabled(self, enabled: bool) -> None:
        for control in (self._order, self._threshold, self._status_filter, self._split, self._class, self._list,
                        self._previous, self._next, self._reviewed, self._save, self._classes, self._region,
                        self._accept_threshold, self._preview, self._accept):
            control.setEnabled(enabled)

    # -- options -----------------------------------------------------------------------------------

    def queue_options(self) -> QueueOptions:
        """The order and filters as the controls show them."""
        return QueueOptions(
            order=self._order.currentText(),
            threshold=round(self._threshold.value(), 1),
            status=self._status_filter.currentText(),
            split=self._split.currentText(),
            class_id=self._class_ids[self._class.currentIndex()],
        )

    def _apply_options(self, *_) -> None:
        if self.session is None:
            return
        self._threshold.setEnabled(self._order.currentText() == "most uncertain pixels first")
        self._run(lambda: self.session.set_options(self.queue_options()))

    # -- showing -----------------------------------------------------------------------------------

    def _fill_classes(self) -> None:
        """The class filter's entries: the dataset's classes (a save may have added some)."""
        classes = self.session.dataset_classes()
        if len(classes) + 1 == self._class.count():
            return
        chosen = self._class_ids[self._class.currentIndex()]
        self._class_ids = [None, *(train_id for train_id, _ in classes)]
        self._class.blockSignals(True)
        self._class.clear()
        self._class.addItems(["any class", *(name for _, name in classes)])
        self._class.setCurrentIndex(self._class_ids.index(chosen) if chosen in self._class_ids else 0)
        self._class.blockSignals(False)

    def _refresh(self, event=None) -> None:
        session = self.session
        if session is None:  # closed
            return
        if session.opening:
            if session.current_id:
                self._message.setText(f"{session.current_id}: reading the index of {_sample_count(self.root)}… "
                                      "(moving on and saving wait for it)")
            return
        self._fill_classes()
        counts = session.counts()
        self._counts.setText(f"{counts.reviewed} reviewed · {counts.edited} edited · {counts.unreviewed} unreviewed "
                             f"of {counts.total}")
        self._progress.setRange(0, max(counts.total, 1))
        self._progress.setValue(counts.reviewed)
        if self._shown_queue != session.queue_version:  # O(queue) only when it changes
            self._model.setStringList([self._row(image_id) for image_id in session.ids])
            self._shown_queue = session.queue_version
        position = session.position
        ids = session.ids_at((self._shown_position, position))  # statuses change as samples are saved
        for row, image_id in ids.items():
            self._model.setData(self._model.index(row), self._row(image_id))
        self._shown_position = position
        if position >= 0:
            self._list.setCurrentIndex(self._model.index(position))
        current = session.current_id
        self._previous.setEnabled(position > 0)
        self._next.setEnabled(0 <= position < len(session) - 1)
        self._reviewed.blockSignals(True)
        self._reviewed.setEnabled(current is not None)
        self._reviewed.setChecked(current is not None and session.status(current) == REVIEWED)
        self._reviewed.blockSignals(False)
        where = f"{position + 1} of {len(session)} in the queue" if position >= 0 else f"{len(session)} in the queue"
        if current:
            self._message.setText(f"{current}: {where}")
        else:
            self._message.setText(f"error: {session.open_error}" if session.open_error
                                  else "no sample matches the filters")
        self._region.blockSignals(True)
        self._region.setChecked(session.region_tool)
        self._region.blockSignals(False)
        if current != self._shown_id:  # another sample: no preview of the last one's pixels
            self._shown_id = current
            self._preview.setChecked(False)
        self._refresh_classes()

    def _on_error(self, event) -> None:
        self._message.setText(f"error: {event.value}")

    def _on_edited(self, event=None) -> None:
        self._pixels.start()

    def _refresh_classes(self) -> None:
        """The class list: key, colour, name and pixels in the sample shown."""
        session = self.session
        if session is None:
            return
        labels = session.labels_layer
        pixels = class_pixel_counts(labels.data) if labels is not None else {}
        self._classes.clear()
        for key, (uid, name) in enumerate([(IGNORE, "ignore"), *session.classes()]):
            swatch = QPixmap(14, 14)
            swatch.fill(QColor(*label_color(uid)) if uid != IGNORE else QColor(40, 40, 40))
            number = f"{key}: " if key <= 9 else ""
            self._classes.addItem(QListWidgetItem(QIcon(swatch), f"{number}{name}  ({pixels.get(uid, 0)} px)"))

    def _choose_region(self, point) -> int | None:
        """The class a clicked region becomes: a menu at the cursor, with number keys."""
        menu = QMenu(self)
        for key, (uid, name) in enumerate([(IGNORE, "ignore"), *self.session.classes()]):
            action = menu.addAction(f"&{key} {name}" if key <= 9 else name)
            action.setData(uid)
        chosen = menu.exec(QCursor.pos())
        return None if chosen is None else chosen.data()

    def _show_preview(self) -> None:
        if self._preview.isChecked():
            count = self.session.preview_accept(self._accept_threshold.value())
            self._message.setText(f"{count} labelled pixels are below {self._accept_threshold.value():g}: "
                                  "Accept sets them to ignore")
        else:
            self.session.clear_preview()

    def _accept_by_confidence(self) -> None:
        changed = self.session.accept_by_confidence(self._accept_threshold.value())
        self._preview.blockSignals(True)
        self._preview.setChecked(False)
        self._preview.blockSignals(False)
        self._message.setText(f"{changed} pixels set to ignore (Ctrl+Z undoes it)")

    def _row(self, image_id: str) -> str:
        return f"{image_id}  ({self.session.status(image_id)})"

    def _run(self, action) -> None:
        """Do what a control asks (once the dataset is open); a dataset error (a full disk, a
        damaged sample) is one line here and in napari's notifications, and the sample shown stays
        as it was."""
        from napari.utils.notifications import show_error

        if self.session is None:
            return
        try:
            action()
        except SclipError as exc:
            self._refresh()
            self._message.setText(f"error: {exc}")
            show_error(f"SCLIP review: {exc}")

    # -- closing -----------------------------------------------------------------------------------

    def follow_window(self) -> None:
        """Once docked: closing the window saves the sample and gives the dataset up."""
        window = self.window()
        if window is not self and window is not self._watched:
            window.installEventFilter(self)
            self._watched = window

    def eventFilter(self, watched, event) -> bool:
        if watched is self._watched and event.type() == QEvent.Type.Close:
            self.close_review(give_up=True)
        return False

    def close_review(self, *, give_up: bool = False) -> bool:
        """Save the sample shown, give the dataset up and remove the panel (once); returns
        whether it closed.  When the save fails the review stays open (the edits are still in
        the layers: free space and close again), unless ``give_up`` (the window is closing)."""

        if self._closed:
            return True
        self.evaluate.cancel()
        session = self.session
        if session is not None and not self._forget(session, give_up=give_up):
            return False
        self._closed = True  # a dataset still opening is given back when its worker returns
        self._look_shown.set()
        self.session = None
        if self._watched is not None:
            self._watched.removeEventFilter(self)
            self._watched = None
        window = self.viewer.window
        if window.dock_widgets.get(PANEL_NAME) is self:
            window.remove_dock_widget(self)
        return True


    def _save_for_evaluation(self) -> None:
        """The sample shown counts as it is now (a :class:`SclipError` if it cannot be saved)."""
        if self.session is not None and not self.session.opening:
            self.session.save()

    def _forget(self, session: ReviewSession, *, give_up: bool) -> bool:
        """Close ``session`` and stop following it; returns whether it closed (see
        :meth:`close_review`)."""
        from napari.utils.notifications import show_error

        try:
            session.close(give_up=give_up)
        except SclipError as exc:
            message = " ".join(str(exc).split())
            if not give_up:
                self._message.setText(f"not closed, the edits are not saved: {message}")
                show_error(f"SCLIP review: not closed, the edits are not saved: {message}")
                return False
            show_error(f"SCLIP review: the last edits were not saved: {message}")
        session.events.changed.disconnect(self._refresh)
        session.events.edited.disconnect(self._on_edited)
        session.events.error.disconnect(self._on_error)
        session.region_chooser = None
        return True


def _sclip_widget(viewer):
    """The SCLIP segmentation widget docked in ``viewer``'s window, if any."""
    from napari_sclip.plugin.widget import SclipWidget

    docked = (getattr(widget, "__wrapped__", widget) for widget in viewer.window.dock_widgets.values())
    return next((widget for widget in docked if isinstance(widget, SclipWidget)), None)


def _sample_count(root: Path) -> str:
    """"N samples", as the manifest last counted them (cheap), for the message while opening."""
    from napari_sclip.dataset.format import MANIFEST
    from napari_sclip.dataset.paths import read_json

    try:
        counts = read_json(root / MANIFEST)["splits"]["counts"]
        return f"{sum(int(n) for n in counts.values())} samples"
    except (SclipError, OSError, KeyError, TypeError, ValueError, AttributeError):
        return "the samples"  # a damaged manifest: the owner's scan says what is wrong


def _confidence_box(low: float, high: float, step: float, tip: str) -> QDoubleSpinBox:
    """A confidence threshold from ``low`` to ``high`` in steps of ``step``, starting at 0.5."""
    box = QDoubleSpinBox()
    box.setRange(low, high)
    box.setSingleStep(step)
    box.setDecimals(len(f"{step:g}".split(".")[-1]))
    box.setValue(0.5)
    box.setToolTip(tip)
    return box


def _combo(items, tip: str) -> QComboBox:
    combo = QComboBox()
    combo.addItems(list(items))
    combo.setToolTip(tip)
    return combo


def _button(text: str, tip: str, slot) -> QPushButton:
    button = QPushButton(text)
    button.setToolTip(tip)
    button.clicked.connect(lambda *_: _panel_of(button)._run(slot))
    return button


def _panel_of(widget: QWidget) -> ReviewPanel:
    while not isinstance(widget, ReviewPanel):
        widget = widget.parentWidget()
    return widget
