"""The "SCLIP segmentation" dock widget (Qt, through qtpy only).

Business logic lives in :mod:`napari_sclip.classes`, :mod:`.edits`, :mod:`.layers` and :mod:`.runner`; this
module wires them to Qt controls and to a napari generator worker, so nothing slow ever runs on
the GUI thread.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Generator
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QColor, QIcon, QPixmap
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)
from superqt import QCollapsible

from napari_sclip.classes import ClassRegistry
from napari_sclip.colors import label_color
from napari_sclip.engine import config
from napari_sclip.engine.errors import SclipError
from napari_sclip.engine.methods import METHODS, get_method
from napari_sclip.engine.vocabulary import Vocabulary, parse_vocabulary_text, read_vocabulary_file
from napari_sclip.plugin.edits import EditTracker
from napari_sclip.plugin.engine_loader import engine_devices, make_segmenter
from napari_sclip.plugin.io import METADATA_KEY, labelled_image
from napari_sclip.plugin.layers import (
    confidence_name,
    iter_write_labels,
    labels_name,
    style_labels_layer,
)
from napari_sclip.plugin.runner import JobProgress, SegmentJob, SliceResult, run_job, slice_regions

if TYPE_CHECKING:
    import napari

_log = logging.getLogger(__name__)
EXAMPLE_VOCABULARY = "person\nsky\ntree, plant\nbuilding\ngrass\n"
_METADATA_KEY = METADATA_KEY


class SclipWidget(QWidget):
    """Type class names, click Segment, get an editable labels layer."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self._worker = None
        self._writing = False
        self._progress = None
        self._stop_export: threading.Event | None = None
        self._segmenter = None

        self._image_combo = QComboBox()
        self._image_combo.setToolTip("The image layer to segment")
        self._slice_combo = QComboBox()
        self._slice_combo.addItems(["current slice", "all slices"])
        self._slice_combo.setToolTip("For stacks: segment the slice on screen, or every 2D slice")

        self._vocabulary_edit = QPlainTextEdit(EXAMPLE_VOCABULARY)
        self._vocabulary_edit.setPlaceholderText("One class per line; synonyms after commas:\ncar, automobile")
        self._vocabulary_edit.setToolTip("One class per line. Synonyms after commas: the first name is shown.")
        self._vocabulary_edit.setMaximumHeight(150)
        load_button = QPushButton("Load…")
        save_button = QPushButton("Save…")
        load_button.clicked.connect(self._load_vocabulary)
        save_button.clicked.connect(self._save_vocabulary)
        self._class_list = QListWidget()
        self._class_list.setToolTip("Label value and colour of each class")
        self._class_list.setMaximumHeight(140)

        self._model_edit = QLineEdit(config.default_model())
        self._weights_edit = QLineEdit(config.default_pretrained())
        self._weights_edit.setToolTip("An open_clip pretrained tag (e.g. openai) or a checkpoint file")
        browse = QPushButton("…")
        browse.setFixedWidth(30)
        browse.clicked.connect(self._browse_weights)
        self._device_combo = QComboBox()
        self._device_combo.addItem(config.default_device())
        self._method_combo = QComboBox()
        for index, method in enumerate(METHODS.values()):
            self._method_combo.addItem(method.title, method.name)
            self._method_combo.setItemData(index, method.description, Qt.ItemDataRole.ToolTipRole)
        self._method_combo.setToolTip("The training-free method; each brings its authors' settings")
        self._method_note = QLabel()
        self._method_note.setWordWrap(True)
        self._method_note.setStyleSheet("color: gray")
        self._pamr_box = QCheckBox("PAMR refinement")
        self._pamr_box.setToolTip("Refine the labels along image edges (PAMR); slower, NACLIP's default")
        self._short_side = _spin(16, 4096, config.DEFAULT_SHORT_SIDE, "Resize so the short side has this many pixels")
        self._window = _spin(16, 2048, config.DEFAULT_WINDOW, "Sliding-window size in pixels")
        self._stride = _spin(1, 2048, config.DEFAULT_STRIDE, "Sliding-window step in pixels")
        self._logit_scale = _double(0.1, 1000.0, config.DEFAULT_LOGIT_SCALE, 1, "Sharpness of the softmax")
        self._threshold = _double(0.0, 1.0, config.DEFAULT_PROB_THRESHOLD, 2, "Leave pixels unlabelled below this probability")
        self._confidence_box = QCheckBox("confidence layer")
        self._confidence_box.setToolTip("Also show the winning class's probability as an image layer")
        self._reviewed_box = QCheckBox("reviewed")
        self._reviewed_box.setToolTip(
            "Mark this image's labels as checked by a person: exported with review status "
            "'reviewed', and never replaced by 'napari-sclip segment --overwrite'"
        )
        self._reviewed_box.toggled.connect(self._set_reviewed)
        self._overwrite_box = QCheckBox("overwrite my edits")
        self._overwrite_box.setToolTip("Re-running normally keeps pixels you painted or filled")

        self._run_button = QPushButton("Segment")
        self._run_button.setToolTip("Run the chosen method in the background; click again to cancel")
        self._run_button.clicked.connect(self._toggle_run)
        self._progress_bar = QProgressBar()
        self._progress_bar.setRange(0, 1000)
        self._progress_bar.setTextVisible(False)
        self._export_button = QPushButton("Export dataset…")
        self._export_button.setToolTip(
            "Save labelled images as a training dataset: those whose image or labels layer is "
            "selected, or all of them when none is"
        )
        self._export_button.clicked.connect(self.export_dataset)
        self._status = QLabel("ready")
        self._status.setWordWrap(True)

        self._build_layout(load_button, save_button, browse)
        self._connect_viewer()
        self._vocabulary_edit.textChanged.connect(self._refresh_class_list)
        self._image_combo.currentIndexChanged.connect(self._on_image_changed)
        self._method_combo.currentIndexChanged.connect(self._apply_method_defaults)
        self._apply_method_defaults()
        self._refresh_images()
        self._refresh_class_list()
        self._find_devices()

    # -- layout -----------------------------------------------------------------------------------

    def _build_layout(self, load_button, save_button, browse) -> None:
        form = QFormLayout()
        form.addRow("image", self._image_combo)
        form.addRow("stack", self._slice_combo)
        form.addRow("method", self._method_combo)
        form.addRow("", self._method_note)

        vocabulary_buttons = QHBoxLayout()
        vocabulary_buttons.addWidget(QLabel("classes"))
        vocabulary_buttons.addStretch()
        vocabulary_buttons.addWidget(load_button)
        vocabulary_buttons.addWidget(save_button)

        weights_row = QHBoxLayout()
        weights_row.addWidget(self._weights_edit)
        weights_row.addWidget(browse)
        advanced_form = QFormLayout()
        advanced_form.addRow("model", self._model_edit)
        advanced_form.addRow("weights", weights_row)
        advanced_form.addRow("device", self._device_combo)
        advanced_form.addRow("short side", self._short_side)
        advanced_form.addRow("window", self._window)
        advanced_form.addRow("stride", self._stride)
        advanced_form.addRow("logit scale", self._logit_scale)
        advanced_form.addRow("threshold", self._threshold)
        advanced_form.addRow(self._pamr_box)
        advanced_form.addRow(self._confidence_box)
        advanced_widget = QWidget()
        advanced_widget.setLayout(advanced_form)
        self._advanced = QCollapsible("Advanced")
        self._advanced.addWidget(advanced_widget)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(vocabulary_buttons)
        layout.addWidget(self._vocabulary_edit)
        layout.addWidget(self._class_list)
        layout.addWidget(self._overwrite_box)
        layout.addWidget(self._advanced)
        layout.addWidget(self._run_button)
        export_row = QHBoxLayout()
        export_row.addWidget(self._reviewed_box)
        export_row.addWidget(self._export_button, stretch=1)
        layout.addLayout(export_row)
        layout.addWidget(self._progress_bar)
        layout.addWidget(self._status)
        layout.addStretch()

    # -- viewer layers ----------------------------------------------------------------------------

    def _connect_viewer(self) -> None:
        events = self.viewer.layers.events
        for event in (events.inserted, events.removed, events.reordered):
            event.connect(self._refresh_images)

    def _image_layers(self) -> list:
        from napari.layers import Image

        return [layer for layer in self.viewer.layers if isinstance(layer, Image)]

    def _refresh_images(self, event=None) -> None:
        self._track_sclip_layers()
        current = self._image_combo.currentText()
        self._image_combo.blockSignals(True)
        self._image_combo.clear()
        names = [layer.name for layer in self._image_layers()]
        self._image_combo.addItems(names)
        if current in names:
            self._image_combo.setCurrentText(current)
        self._image_combo.blockSignals(False)
        self._on_image_changed()

    def _track_sclip_layers(self) -> None:
        """Follow edits on every labels layer napari-sclip made or opened, from now on."""
        from napari.layers import Labels

        for layer in self.viewer.layers:
            if isinstance(layer, Labels) and METADATA_KEY in layer.metadata:
                self._tracker(layer)

    def selected_image(self):
        """The image layer chosen in the picker, or ``None``."""
        name = self._image_combo.currentText()
        return next((layer for layer in self._image_layers() if layer.name == name), None)

    def _on_image_changed(self, *_) -> None:
        layer = self.selected_image()
        stacked = layer is not None and (layer.data.ndim - (1 if layer.rgb else 0)) > 2
        self._slice_combo.setEnabled(stacked)
        self._refresh_class_list()
        self._refresh_reviewed()

    def _refresh_reviewed(self) -> None:
        """The reviewed box shows the chosen image's labels layer's status."""
        labels = self._selected_labels()
        state = labels.metadata.get(_METADATA_KEY, {}) if labels is not None else {}
        self._reviewed_box.blockSignals(True)
        self._reviewed_box.setEnabled(labels is not None)
        self._reviewed_box.setChecked(state.get("review_status") == "reviewed")
        self._reviewed_box.blockSignals(False)

    def _set_reviewed(self, checked: bool) -> None:
        labels = self._selected_labels()
        if labels is not None:
            self._tracker(labels)  # adopt a layer made elsewhere first
            labels.metadata[_METADATA_KEY]["review_status"] = "reviewed" if checked else "unreviewed"

    def _selected_labels(self):
        """The labels layer of the image chosen in the picker, or ``None``."""
        image = self.selected_image()
        return self._labels_layer(image) if image is not None else None

    def _labels_layer(self, image):
        name = labels_name(image.name)
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def _registry(self, labels) -> ClassRegistry:
        """The layer's classes; a new, empty registry for layers napari-sclip has not written."""
        state = labels.metadata.get(_METADATA_KEY, {}) if labels is not None else {}
        return state.get("classes") or ClassRegistry()

    def _tracker(self, labels) -> EditTracker:
        # Kept with the layer (not keyed by the layer object: plugins see napari's proxies of it).
        adopted = _METADATA_KEY not in labels.metadata
        state = labels.metadata.setdefault(_METADATA_KEY, {})
        if "edits" not in state:
            state["edits"] = EditTracker(labels)
            if adopted:
                # A labels layer napari-sclip did not make: its labels are someone's work.
                state["edits"].mask[...] = np.asarray(labels.data) != 0
            elif "edited" in state:  # opened from a dataset: the stored person-edited mask
                state["edits"].mask[...] = state.pop("edited")
        return state["edits"]

    # -- vocabulary -------------------------------------------------------------------------------

    def vocabulary(self) -> Vocabulary:
        """The vocabulary typed in the editor (raises VocabularyError)."""
        return parse_vocabulary_text(self._vocabulary_edit.toPlainText())

    def set_vocabulary(self, lines: list[str] | str) -> None:
        text = lines if isinstance(lines, str) else "\n".join(lines)
        self._vocabulary_edit.setPlainText(text)

    def _refresh_class_list(self) -> None:
        self._class_list.clear()
        try:
            vocabulary = self.vocabulary()
        except SclipError as exc:
            item = QListWidgetItem(str(exc))
            item.setForeground(QColor("orange"))
            self._class_list.addItem(item)
            return
        registry = self._registry(self._selected_labels())
        uids, _ = registry.plan(vocabulary.classes)
        for uid, names in zip(uids, vocabulary.classes):
            swatch = QPixmap(14, 14)
            swatch.fill(QColor(*label_color(uid)))
            synonyms = f"  ({', '.join(names[1:])})" if len(names) > 1 else ""
            self._class_list.addItem(QListWidgetItem(QIcon(swatch), f"{uid}: {names[0]}{synonyms}"))

    def _load_vocabulary(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load vocabulary", "", "Text files (*.txt);;All files (*)")
        if path:
            try:
                self.set_vocabulary(read_vocabulary_file(path).to_lines())
            except SclipError as exc:
                self._notify_error(exc)

    def _save_vocabulary(self) -> None:
        try:
            lines = self.vocabulary().to_lines()
        except SclipError as exc:
            self._notify_error(exc)
            return
        path, _ = QFileDialog.getSaveFileName(self, "Save vocabulary", "classes.txt", "Text files (*.txt)")
        if path:
            try:
                Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
            except OSError as exc:
                self._notify_error(exc)

    def _browse_weights(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Choose CLIP weights", "", "Checkpoints (*.pt *.pth *.bin *.safetensors);;All files (*)"
        )
        if path:
            self._weights_edit.setText(path)

    # -- devices (found in the background: it imports the engine) ---------------------------------

    def _find_devices(self) -> None:
        """Import the engine in the background now, so that it is usually there by the first click."""
        from napari.qt.threading import create_worker

        # Keep a reference: a worker that is garbage-collected never delivers its result.
        self._device_worker = create_worker(engine_devices, _start_thread=False, _ignore_errors=True)
        self._device_worker.returned.connect(self._set_devices)
        self._device_worker.errored.connect(lambda exc: None)  # the default device stays usable
        self._device_worker.start()

    def _set_devices(self, devices: list[str]) -> None:
        current = self._device_combo.currentText()
        self._device_combo.clear()
        self._device_combo.addItems(["auto", *devices])
        if current in ("auto", *devices):
            self._device_combo.setCurrentText(current)

    # -- running ----------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether a segmentation is computing or its labels are being written."""
        return self._worker is not None or self._writing

    def _toggle_run(self) -> None:
        if self._worker is not None:
            self.cancel()
        else:
            self.segment()

    def set_method(self, name: str) -> None:
        """Choose a method by name (``"sclip"``, ``"naclip"``, ...); its defaults fill the settings."""
        index = self._method_combo.findData(get_method(name).name)
        self._method_combo.setCurrentIndex(index)

    def _apply_method_defaults(self) -> None:
        method = get_method(self._method_combo.currentData())
        self._method_note.setText(method.description)
        self._short_side.setValue(method.short_side)
        self._window.setValue(method.window)
        self._stride.setValue(method.stride)
        self._logit_scale.setValue(method.logit_scale)
        self._pamr_box.setChecked(method.refinement is not None)

    def _options(self) -> dict:
        return {
            "method": self._method_combo.currentData(),
            "pamr": self._pamr_box.isChecked(),
            "short_side": self._short_side.value(),
            "window": self._window.value(),
            "stride": self._stride.value(),
            "logit_scale": self._logit_scale.value(),
            "prob_threshold": self._threshold.value(),
        }

    def _engine_choice(self) -> tuple[str, str, str]:
        """Model, weights and device as set under Advanced; the defaults where left empty."""
        return (
            self._model_edit.text().strip() or config.default_model(),
            self._weights_edit.text().strip() or config.default_pretrained(),
            self._device_combo.currentText() or config.default_device(),
        )

    def _get_segmenter(self, choice: tuple[str, str, str] | None = None):
        """The segmenter for ``choice`` (default: the Advanced settings), kept while it stays the
        same.  It imports the engine: only workers call it."""
        choice = choice or self._engine_choice()
        seg = self._segmenter
        if seg is None or (seg.model_name, seg.pretrained, seg.device_name) != choice:
            self._segmenter = make_segmenter(*choice)
        return self._segmenter

    def _segment_job(self, choice: tuple[str, str, str], job: SegmentJob) -> Generator[JobProgress, None, list[SliceResult]]:
        """The worker's job: the segmenter (torch's import on a first run), then the segmentation."""
        yield JobProgress(0.0, "starting the engine")
        return (yield from run_job(self._get_segmenter(choice), job))

    def segment(self) -> None:
        """Start segmenting the selected image in a background worker."""
        if self.running:
            return
        image = self.selected_image()
        if image is None:
            self._notify_error("add or select an image layer first")
            return
        try:
            vocabulary = self.vocabulary()
        except SclipError as exc:
            self._notify_error(exc)
            return
        labels = self._labels_layer(image)
        if labels is not None:
            self._tracker(labels)  # adopt a layer made elsewhere before anything else reads it
            if not self._confirm_removals(labels, vocabulary):
                return
        current = None if self._slice_combo.currentText() == "all slices" else self.viewer.dims.current_step
        uids, _ = self._registry(labels).plan(vocabulary.classes)
        job = SegmentJob(
            data=image.data[0] if image.multiscale else image.data,  # the full-resolution level
            rgb=image.rgb,
            regions=slice_regions(image.data.shape, image.rgb, current),
            vocabulary=vocabulary,
            options=self._options(),
            contrast_limits=None if image.rgb and image.data.dtype == np.uint8 else tuple(image.contrast_limits),
            keep_confidence=self._confidence_box.isChecked(),
            label_values=np.array([0, *uids], dtype=np.uint8 if max(uids) <= 255 else np.uint16),
        )
        from napari.qt.threading import create_worker
        from napari.utils import progress

        choice = self._engine_choice()
        params = {"model": choice[0], "pretrained": choice[1], **job.options}
        # Errors are ours to report (one line); they are not re-raised in the GUI thread.
        self._worker = create_worker(self._segment_job, choice, job, _start_thread=False, _ignore_errors=True)
        self._worker.yielded.connect(self._on_progress)
        # napari keeps every worker (and what its slots hold) as long as the window: hold the
        # layer weakly, or a removed image would never be freed.
        image_ref = weakref.ref(image)
        self._worker.returned.connect(lambda results: self._apply(image_ref(), vocabulary, results, params))
        self._worker.errored.connect(self._notify_error)
        self._worker.finished.connect(self._on_finished)
        self._progress = progress(total=1000, desc=f"SCLIP: {image.name}")
        self._run_button.setText("Cancel")
        self._status.setText("starting…")
        self._worker.start()

    def cancel(self) -> None:
        """Stop the running segmentation (nothing is written) or export (between images)."""
        if self._worker is not None:
            self._status.setText("cancelling…")
            if self._stop_export is not None:
                self._stop_export.set()  # the export finishes its index on the worker thread
            else:
                self._worker.quit()

    def _on_progress(self, step: JobProgress) -> None:
        value = int(step.fraction * 1000)
        self._progress_bar.setValue(value)
        self._status.setText(step.message)
        bar = self._progress
        if bar is not None:
            bar.set_description(f"SCLIP: {step.message}")
            bar.update(value - bar.n)

    def _on_finished(self) -> None:
        aborted = self._worker is not None and self._worker.abort_requested
        self._worker = None
        self._stop_export = None
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self._run_button.setText("Segment")
        self._run_button.setEnabled(not self._writing)
        self._progress_bar.setValue(0)
        if aborted:
            self._status.setText("cancelled: nothing was changed")

    def _notify_error(self, error) -> None:
        from napari.utils.notifications import show_error

        if isinstance(error, BaseException) and not isinstance(error, SclipError):
            _log.error("SCLIP segmentation failed", exc_info=error)  # a bug: keep the traceback
        message = str(error) if isinstance(error, (SclipError, str)) else f"{type(error).__name__}: {error}"
        message = " ".join(message.split())
        self._status.setText(f"error: {message}")
        show_error(f"SCLIP: {message}")

    # -- writing results --------------------------------------------------------------------------

    def _confirm_removals(self, labels, vocabulary: Vocabulary) -> bool:
        registry = self._registry(labels)
        _, retired = registry.plan(vocabulary.classes)
        tracker = self._tracker(labels)
        painted = sorted(set(retired) & tracker.painted_values())
        if not painted:
            return True
        names = ", ".join(registry.display_name(uid) for uid in painted)
        answer = QMessageBox.question(
            self,
            "Remove classes with painted pixels?",
            f"You painted pixels of {names}, which the new vocabulary no longer has. "
            "Continue and set those pixels to unlabelled?",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
            QMessageBox.StandardButton.No,
        )
        return answer == QMessageBox.StandardButton.Yes

    def _apply(self, image, vocabulary: Vocabulary, results: list[SliceResult], params: dict) -> None:
        """Write the worker's results into the image's labels layer (GUI thread)."""
        if image not in self.viewer.layers:
            self._status.setText("the image layer was removed; results dropped")
            return
        shape = tuple(image.data.shape[:-1] if image.rgb else image.data.shape)
        labels = self._labels_layer(image)
        if labels is not None and labels.data.shape != shape:
            self._notify_error(f"layer '{labels.name}' does not have the image's shape; rename or remove it")
            return
        registry = self._registry(labels)
        _, retired = registry.plan(vocabulary.classes)
        registry.update(vocabulary.classes)  # the worker already numbered the labels this way
        dtype = np.uint8 if max(registry.names) <= 255 else np.uint16
        if labels is None:
            # A new layer: nothing to undo or protect, so no history is written.
            data = np.zeros(shape, dtype)
            for item in results:
                data[item.region] = item.labels
            labels = self.viewer.add_labels(
                data, name=labels_name(image.name), scale=image.scale, translate=image.translate
            )
            labels.metadata[_METADATA_KEY] = {"classes": registry, "params": params}
            self._finish(image, labels, registry, results, int(sum(item.labels.size for item in results)))
            return
        labels.metadata.setdefault(_METADATA_KEY, {}).update(classes=registry, params=params)
        if np.iinfo(labels.data.dtype).max < np.iinfo(dtype).max:
            labels.data = labels.data.astype(dtype)
        steps = self._update_labels(labels, results, retired, self._overwrite_box.isChecked())
        self._writing = True
        self._run_button.setEnabled(False)
        self._status.setText("writing labels…")
        self._drive(steps, lambda changed: self._finish(image, labels, registry, results, changed))

    def _drive(self, steps, done) -> None:
        """Run a generator one step per event-loop turn (the GUI repaints in between), then call
        ``done`` with its return value."""
        try:
            next(steps)
        except StopIteration as stop:
            done(stop.value)
            return
        QTimer.singleShot(0, lambda: self._drive(steps, done))

    def _update_labels(
        self, labels, results: list[SliceResult], retired: list[int], overwrite: bool
    ) -> Generator[None, None, int]:
        """Re-run: write new labels around the person's edits, as one undo step, in bands of rows.

        The layer is not editable meanwhile, so no stroke can slip into the run's undo step.
        """
        tracker = self._tracker(labels)
        editable = labels.editable
        labels.editable = False
        changed = 0
        try:
            with tracker.suspended(), labels.block_history():
                for item in results:
                    new = item.labels.astype(labels.data.dtype, copy=False)
                    keep = None if overwrite else tracker.mask[item.region]
                    if retired and keep is not None:
                        # Kept pixels of a removed class become unlabelled (the person agreed).
                        stale = keep & np.isin(np.asarray(labels.data[item.region]), retired)
                        new = np.where(stale, 0, new).astype(new.dtype)
                        keep = keep & ~stale
                    changed += yield from iter_write_labels(labels, item.region, new, keep)
                    if overwrite:
                        tracker.mask[item.region] = False
                if retired:  # slices this run did not segment may still hold removed classes
                    done = [item.region for item in results]  # slices are unhashable before 3.12
                    for region in slice_regions(labels.data.shape, False, None):
                        if region in done:
                            continue
                        current = np.asarray(labels.data[region])
                        stale = np.isin(current, retired)
                        if stale.any():
                            cleared = np.where(stale, 0, current).astype(current.dtype)
                            changed += yield from iter_write_labels(labels, region, cleared, None)
        finally:
            labels.editable = editable
        return changed

    def _finish(self, image, labels, registry: ClassRegistry, results: list[SliceResult], changed: int) -> None:
        self._writing = False
        self._run_button.setEnabled(True)
        tracker = self._tracker(labels)
        style_labels_layer(labels, registry)
        if all(item.confidence is not None for item in results):
            confidence = self._write_confidence(image, labels.data.shape, results)
            # Keep the labels on top, where the brush works.
            layers = self.viewer.layers
            layers.move(layers.index(confidence), layers.index(labels))
        self.viewer.layers.selection.active = labels
        # The model changed the labels: a review of the earlier ones no longer holds.
        labels.metadata[_METADATA_KEY]["review_status"] = "unreviewed"
        self._refresh_class_list()
        self._refresh_reviewed()
        kept = int(tracker.mask.sum())
        note = f", kept {kept} edited pixels" if kept and not self._overwrite_box.isChecked() else ""
        reused = sum(item.features_reused for item in results)
        if reused:
            note += ", image features reused" if reused == len(results) else f", features of {reused} slice(s) reused"
        self._status.setText(f"done: {len(results)} slice(s), {changed} pixels updated{note}")

    # -- export -----------------------------------------------------------------------------------

    def labelled_images(self, selected_only: bool = False) -> list:
        """The image layers that have a "<image> labels" layer of their shape, ready to export;
        with ``selected_only``, those whose image or labels layer is selected (all if none is)."""
        pairs = [(image, self._labels_layer(image)) for image in self._image_layers()]
        pairs = [(image, labels) for image, labels in pairs if labels is not None]
        selection = self.viewer.layers.selection
        chosen = [(image, labels) for image, labels in pairs if image in selection or labels in selection]
        items = []
        for image, labels in chosen if selected_only and chosen else pairs:
            confidence_layer = confidence_name(image.name)
            confidence = self.viewer.layers[confidence_layer].data if confidence_layer in self.viewer.layers else None
            self._tracker(labels)  # make sure the edits are part of the export
            image_meta = {"name": image.name, "rgb": image.rgb, "source": {"path": image.source.path},
                          "metadata": image.metadata}
            items.append(labelled_image(image.data, image_meta, labels.data, {"metadata": labels.metadata}, confidence))
        return items

    def export_dataset(self, folder: str | None = None) -> None:
        """Export the selected labelled images (all when none is selected) to a dataset folder
        (asks for it), in the background; the Cancel button stops it between images."""
        if self.running:
            return
        try:
            items = self.labelled_images(selected_only=True)
            if not items:
                raise SclipError("nothing to export: segment an image first")
        except SclipError as exc:
            self._notify_error(exc)
            return
        if folder is None:
            folder = QFileDialog.getExistingDirectory(self, "Export dataset to (a new or empty folder, or a dataset)")
            if not folder:
                return
        from napari.qt.threading import create_worker

        from napari_sclip.dataset.export import iter_export

        stop = self._stop_export = threading.Event()

        def job():
            written = 0
            with closing(iter_export(folder, items)) as export:
                for written, total in export:
                    yield JobProgress(written / total, f"exporting {written}/{total} image(s)")
                    if stop.is_set():
                        break
            return written

        def report(written: int) -> None:
            what = "export cancelled after" if stop.is_set() else "exported"
            self._status.setText(f"{what} {written} image(s) to {folder}")

        self._worker = create_worker(job, _start_thread=False, _ignore_errors=True)
        self._worker.yielded.connect(self._on_progress)
        self._worker.returned.connect(report)
        self._worker.errored.connect(self._notify_error)
        self._worker.finished.connect(self._on_finished)
        self._run_button.setText("Cancel")
        self._status.setText(f"exporting to {folder}…")
        self._worker.start()

    def _write_confidence(self, image, shape, results):
        name = confidence_name(image.name)
        if name in self.viewer.layers and self.viewer.layers[name].data.shape == tuple(shape):
            layer = self.viewer.layers[name]
        else:
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
            layer = self.viewer.add_image(
                np.zeros(shape, np.float32), name=name, scale=image.scale, translate=image.translate,
                colormap="magma", contrast_limits=(0.0, 1.0), opacity=0.6, visible=True,
            )
        for item in results:
            layer.data[item.region] = item.confidence
        layer.refresh()
        return layer


def _spin(low: int, high: int, value: int, tip: str) -> QSpinBox:
    box = QSpinBox()
    box.setRange(low, high)
    box.setValue(value)
    box.setToolTip(tip)
    return box


def _double(low: float, high: float, value: float, decimals: int, tip: str) -> QDoubleSpinBox:
    box = QDoubleSpinBox()
    box.setRange(low, high)
    box.setDecimals(decimals)
    box.setSingleStep(10 ** -decimals * 5 if decimals else 1)
    box.setValue(value)
    box.setToolTip(tip)
    return box
