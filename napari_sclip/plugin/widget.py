"""The "SCLIP segmentation" dock widget (Qt, through qtpy only).

Business logic lives in :mod:`napari_sclip.classes`, :mod:`.state`, :mod:`.edits`, :mod:`.layers`
and :mod:`.runner`; this module wires them to Qt controls and to napari generator workers, so
nothing slow ever runs on the GUI thread.

The record of each labels layer it works with (its
:class:`~napari_sclip.plugin.state.LabelsState` and the tracker of a person's edits) lives in
:mod:`.records`, shared with review sessions.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Generator, Hashable
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from qtpy.QtCore import QSize, Qt, QTimer
from qtpy.QtGui import QColor, QIcon, QPixmap
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)
from superqt import QCollapsible

from napari_sclip.classes import ClassRegistry, label_dtype
from napari_sclip.colors import label_color
from napari_sclip.engine import config
from napari_sclip.engine.errors import SclipError
from napari_sclip.engine.memory import architecture_of, describe_choice, estimate_memory
from napari_sclip.engine.methods import METHODS, get_method
from napari_sclip.engine.presets import PRESETS, preset_for
from napari_sclip.engine.sources import normalise_choice
from napari_sclip.engine.vocabulary import Vocabulary, parse_vocabulary_text, read_vocabulary_file
from napari_sclip.plugin.engine_loader import engine_devices, make_segmenter
from napari_sclip.plugin.io import labelled_images
from napari_sclip.plugin.layers import (
    confidence_name,
    labels_name,
    style_labels_layer,
    values_present,
)
from napari_sclip.plugin.records import RECORDS, LabelsRecord
from napari_sclip.plugin.runner import (
    JobProgress,
    SegmentJob,
    SliceResult,
    check_layer,
    run_job,
    slice_regions,
    spatial_shape,
)
from napari_sclip.plugin.state import (
    METADATA_KEY,
    OPTION_NAMES,
    REVIEWED,
    UNREVIEWED,
    LabelsState,
    SegmentOptions,
)
from napari_sclip.plugin.writeback import new_labels, update_labels

if TYPE_CHECKING:
    import napari

_log = logging.getLogger(__name__)
EXAMPLE_VOCABULARY = "person\nsky\ntree, plant\nbuilding\ngrass\n"


_CUSTOM = "custom"


def _megabytes(size_mb: int) -> str:
    return f"{size_mb / 1000:.1f} GB" if size_mb >= 1000 else f"{size_mb} MB"


def _model_field() -> QLineEdit:
    field = QLineEdit(config.default_model())
    field.setToolTip("A preset key (napari-sclip models), an open_clip ViT name (ViT-L-14, ...), "
                     "hf-hub:ORG/REPO or local-dir:FOLDER")
    return field


class _Choice(QComboBox):
    """A combo box over ``(text, value)`` pairs, read and set by value."""

    def __init__(self, choices: list[tuple[str, Any]], tip: str) -> None:
        super().__init__()
        self.setToolTip(tip)
        self.set_choices(choices)

    def set_choices(self, choices: list[tuple[str, Any]]) -> None:
        current = self.value() if self.count() else None
        self._values = [value for _, value in choices]
        self.blockSignals(True)
        self.clear()
        self.addItems([text for text, _ in choices])
        self.blockSignals(False)
        if current in self._values:
            self.setValue(current)

    def value(self) -> Any:
        return self._values[self.currentIndex()]

    def setValue(self, value: Any) -> None:
        if value not in self._values:
            raise ValueError(f"{value!r} is not one of {self._values}")
        self.setCurrentIndex(self._values.index(value))


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
        self._warnings: list[str] = []  # the running job's warnings, for its final status
        self._drafts: dict[Hashable, str] = {}  # by image unique_id: vocabulary typed, not yet run
        self._image_names: dict[Hashable, str] = {}  # by image unique_id: to follow renames
        self._setting_text = False

        self._image_combo = QComboBox()
        self._image_combo.setToolTip("The image layer to segment")
        slices = _Choice([("current slice", False), ("all slices", True)],
                         "For stacks: segment the slice on screen, or every 2D slice")

        self._vocabulary_edit = QPlainTextEdit(EXAMPLE_VOCABULARY)
        self._vocabulary_edit.setPlaceholderText("One class per line; synonyms after commas:\ncar, automobile")
        self._vocabulary_edit.setToolTip(
            "One class per line. Synonyms after commas: the first name is shown. Shows the classes "
            "of the picked image's labels, or what you typed for it"
        )
        self._vocabulary_edit.setMaximumHeight(150)
        self._class_list = QListWidget()
        self._class_list.setToolTip("Label value and colour of each class")
        self._class_list.setMaximumHeight(140)

        method = _Choice([(m.title, m.name) for m in METHODS.values()],
                         "The training-free method; each brings its authors' settings")
        for index, described in enumerate(METHODS.values()):
            method.setItemData(index, described.description, Qt.ItemDataRole.ToolTipRole)
        self._method_note = QLabel()
        self._method_note.setWordWrap(True)
        self._method_note.setStyleSheet("color: gray")
        self._model_picker = _Choice(
            [(f"{preset.title}, {_megabytes(preset.size_mb)}", preset.key) for preset in PRESETS.values()]
            + [("custom…", _CUSTOM)],
            "The CLIP model: OpenAI's, or one trained on biology, histopathology or remote-sensing "
            "images; custom… takes any open_clip ViT, Hugging Face repo, folder or file (under Advanced)",
        )
        for index, preset in enumerate(PRESETS.values()):
            tip = preset.description + (f". {preset.terms[0].upper()}{preset.terms[1:]}" if preset.terms else "")
            self._model_picker.setItemData(index, tip, Qt.ItemDataRole.ToolTipRole)
        self._model_note = QLabel()
        self._model_note.setWordWrap(True)
        self._model_note.setStyleSheet("color: gray")
        weights = QLineEdit(config.default_pretrained())
        weights.setToolTip("An open_clip pretrained tag (e.g. openai), a checkpoint file, "
                           "hf-hub:ORG/REPO/FILE or a model folder; empty: the model's own weights")
        quick_gelu = _Choice(
            [("auto (from the weights)", None), ("on", True), ("off", False)],
            "The MLP activation: QuickGELU (OpenAI's CLIP) or GELU; auto decides from the weights "
            "and warns when they cannot tell",
        )
        pamr = QCheckBox("PAMR refinement")
        pamr.setToolTip("Refine the labels along image edges (PAMR); slower, NACLIP's default")
        confidence = QCheckBox("confidence layer")
        confidence.setToolTip("Also show the winning class's probability as an image layer")
        overwrite = QCheckBox("overwrite my edits")
        overwrite.setToolTip("Re-running normally keeps pixels you painted or filled")
        #: One control per field of SegmentOptions (options() and set_options() go through it).
        self._controls: dict[str, QWidget] = {
            "model": _model_field(),
            "pretrained": weights,
            "device": _Choice([(config.default_device(), config.default_device())], "Where the model runs"),
            "quick_gelu": quick_gelu,
            "method": method,
            "pamr": pamr,
            "short_side": _spin(16, 4096, config.DEFAULT_SHORT_SIDE, "Resize so the short side has this many pixels"),
            "window": _spin(16, 2048, config.DEFAULT_WINDOW, "Sliding-window size in pixels"),
            "stride": _spin(1, 2048, config.DEFAULT_STRIDE, "Sliding-window step in pixels"),
            "logit_scale": _double(0.1, 1000.0, config.DEFAULT_LOGIT_SCALE, 1, "Sharpness of the softmax"),
            "prob_threshold": _double(0.0, 1.0, config.DEFAULT_PROB_THRESHOLD, 2,
                                      "Leave pixels unlabelled below this probability"),
            "all_slices": slices,
            "confidence": confidence,
            "overwrite": overwrite,
        }

        self._reviewed_box = QCheckBox("reviewed")
        self._reviewed_box.setToolTip(
            "Mark this image's labels as checked by a person: exported with review status "
            "'reviewed', and never replaced by 'napari-sclip segment --overwrite'"
        )
        self._reviewed_box.toggled.connect(self._set_reviewed)
        self._run_button = _button("Segment", "Run the chosen method in the background; click again to cancel",
                                   self._toggle_run)
        self._progress_bar = QProgressBar()
        self._progress_bar.setRange(0, 1000)
        self._progress_bar.setTextVisible(False)
        self._open_button = _button("Open dataset…", "Review a napari-sclip dataset folder, one image at a time",
                                    self._open_dataset_clicked)
        self._export_button = _button(
            "Export dataset…",
            "Save labelled images as a training dataset: those whose image or labels layer is "
            "selected, or all of them when none is; only the slices segmented or edited",
            self._export_clicked,
        )
        self._status = QLabel("ready")
        self._status.setWordWrap(True)

        self._build_layout()
        self._connect_viewer()
        RECORDS.events.changed.connect(self._on_record_changed)
        self._vocabulary_edit.textChanged.connect(self._on_text_changed)
        self._image_combo.currentIndexChanged.connect(self._on_picked)
        method.currentIndexChanged.connect(self._apply_method_defaults)
        self._apply_method_defaults()
        self._model_picker.currentIndexChanged.connect(self._pick_model)
        self._model_picker.activated.connect(self._pick_model)  # custom… again: open the fields again
        for name in ("model", "pretrained"):
            self._controls[name].textChanged.connect(self._show_model)
        for name in ("short_side", "window"):
            self._controls[name].valueChanged.connect(self._show_model_note)
        self._show_model()
        self._refresh_images()
        self._find_devices()

    # -- layout -----------------------------------------------------------------------------------

    def _build_layout(self) -> None:
        controls = self._controls
        form = QFormLayout()
        form.addRow("image", self._image_combo)
        form.addRow("stack", controls["all_slices"])
        form.addRow("model", self._model_picker)
        form.addRow("", self._model_note)
        form.addRow("method", controls["method"])
        form.addRow("", self._method_note)

        vocabulary_buttons = QHBoxLayout()
        vocabulary_buttons.addWidget(QLabel("classes"))
        vocabulary_buttons.addStretch()
        vocabulary_buttons.addWidget(_button("Load…", "Read classes from a text file", self._load_vocabulary))
        vocabulary_buttons.addWidget(_button("Save…", "Write these classes to a text file", self._save_vocabulary))

        weights_row = QHBoxLayout()
        weights_row.addWidget(controls["pretrained"])
        browse = _button("…", "Choose a checkpoint file", self._browse_weights)
        browse.setFixedWidth(30)
        weights_row.addWidget(browse)
        advanced_form = QFormLayout()
        advanced_form.addRow("open_clip model", controls["model"])
        advanced_form.addRow("weights", weights_row)
        advanced_form.addRow("QuickGELU", controls["quick_gelu"])
        advanced_form.addRow("device", controls["device"])
        advanced_form.addRow("short side", controls["short_side"])
        advanced_form.addRow("window", controls["window"])
        advanced_form.addRow("stride", controls["stride"])
        advanced_form.addRow("logit scale", controls["logit_scale"])
        advanced_form.addRow("threshold", controls["prob_threshold"])
        advanced_form.addRow(controls["pamr"])
        advanced_form.addRow(controls["confidence"])
        advanced_widget = QWidget()
        advanced_widget.setLayout(advanced_form)
        self._advanced = QCollapsible("Advanced")
        self._advanced.addWidget(advanced_widget)

        # The settings scroll (opening Advanced in a short dock must not squeeze rows into each
        # other); Segment, the dataset buttons, progress and status stay in view below them.
        settings = QWidget()
        layout = QVBoxLayout(settings)
        layout.addLayout(form)
        layout.addLayout(vocabulary_buttons)
        layout.addWidget(self._vocabulary_edit)
        layout.addWidget(self._class_list)
        layout.addWidget(controls["overwrite"])
        layout.addWidget(self._advanced)
        layout.addStretch()
        scroll = _VerticalScroll()
        scroll.setWidget(settings)

        outer = QVBoxLayout(self)
        outer.addWidget(scroll, stretch=1)
        outer.addWidget(self._run_button)
        dataset_row = QHBoxLayout()
        dataset_row.addWidget(self._reviewed_box)
        dataset_row.addWidget(self._open_button, stretch=1)
        dataset_row.addWidget(self._export_button, stretch=1)
        outer.addLayout(dataset_row)
        outer.addWidget(self._progress_bar)
        outer.addWidget(self._status)

    # -- options ----------------------------------------------------------------------------------

    def options(self) -> SegmentOptions:
        """Every setting, as the controls show it."""
        return SegmentOptions(**{name: _value(control) for name, control in self._controls.items()})

    def set_options(self, **values) -> None:
        """Set controls by :class:`SegmentOptions` field name; a method first fills its defaults,
        then the other values given apply."""
        unknown = set(values) - set(OPTION_NAMES)
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
        for name in OPTION_NAMES:  # "method" comes before the settings it fills
            if name in values:
                _set_value(self._controls[name], values[name])

    def _pick_model(self) -> None:
        """A preset fills the model fields; custom… opens them under Advanced."""
        key = self._model_picker.value()
        if key == _CUSTOM:
            self._advanced.expand()
            self._controls["model"].setFocus()
            self._show_model_note()
            return
        self.set_options(model=key, pretrained="")

    def _show_model(self) -> None:
        """The picker follows the model fields: their preset, or custom…."""
        options = self.options()
        preset = preset_for(*normalise_choice(options.model, options.pretrained))
        self._model_picker.blockSignals(True)
        self._model_picker.setValue(preset.key if preset else _CUSTOM)
        self._model_picker.blockSignals(False)
        self._show_model_note()

    def _show_model_note(self) -> None:
        """The model's description and size, and the memory segmenting the picked image takes."""
        options = self.options()
        note = describe_choice(options.model, options.pretrained, load=False)
        image = self.selected_image()
        arch = architecture_of(options.model, options.pretrained, load=False)
        if image is not None and arch is not None:
            shape = spatial_shape(_full_resolution(image).shape, image.rgb)[-2:]
            try:
                names = len(self.vocabulary().names)
            except SclipError:
                names = 1
            cuda = options.device.startswith("cuda")
            estimate = estimate_memory(arch, shape, names, method=options.method, short_side=options.short_side,
                                       window=options.window, batch_size=32 if cuda else 4, half_precision=cuda)
            note += f". Needs {estimate.describe()}"
        self._model_note.setText(note)
        self._model_note.setToolTip(note)

    def _apply_method_defaults(self) -> None:
        method = get_method(self._controls["method"].value())
        self._method_note.setText(method.description)
        self.set_options(short_side=method.short_side, window=method.window, stride=method.stride,
                         logit_scale=method.logit_scale, pamr=method.refinement is not None)

    # -- viewer layers ----------------------------------------------------------------------------

    def _connect_viewer(self) -> None:
        layers = self.viewer.layers
        layers.events.inserted.connect(self._on_inserted)
        layers.events.removed.connect(self._on_removed)
        layers.events.reordered.connect(self._refresh_images)
        layers.selection.events.active.connect(self._on_active_layer)
        for layer in layers:
            layer.events.name.connect(self._refresh_images)

    def _on_inserted(self, event) -> None:
        event.value.events.name.connect(self._refresh_images)
        self._refresh_images()

    def _on_removed(self, event) -> None:
        RECORDS.forget(event.value)
        present = {layer.unique_id for layer in self.viewer.layers}
        for uid in [uid for uid in self._drafts if uid not in present]:
            del self._drafts[uid]
        self._refresh_images()

    def _image_layers(self) -> list:
        """The image layers one can segment (not the confidence layers this widget made)."""
        from napari.layers import Image

        images = [layer for layer in self.viewer.layers if isinstance(layer, Image)]
        derived = {confidence_name(layer.name) for layer in images}
        return [layer for layer in images if layer.name not in derived]

    def _layer(self, unique_id: Hashable):
        return next((layer for layer in self.viewer.layers if layer.unique_id == unique_id), None)

    def _refresh_images(self, event=None) -> None:
        """Rebuild the picker; follow renamed images with their labels and confidence layers;
        start tracking edits on every labels layer napari-sclip made or opened."""
        images = self._image_layers()
        self._follow_renames(images)
        self._track_sclip_layers()
        names = [layer.name for layer in images]
        # The layer list's active image first (a new layer becomes active before the picker lists
        # it, and a widget docked after several images should name the one on top).
        active = self.viewer.layers.selection.active
        current = self._image_of(active) if active is not None else None
        if current not in names:
            current = self._image_combo.currentText()
        self._image_combo.blockSignals(True)
        self._image_combo.clear()
        self._image_combo.addItems(names)
        if current in names:
            self._image_combo.setCurrentText(current)
        self._image_combo.blockSignals(False)
        self._on_image_changed()

    def _follow_renames(self, images: list) -> None:
        layers = self.viewer.layers
        renamed = [(self._image_names[image.unique_id], image.name) for image in images
                   if self._image_names.get(image.unique_id, image.name) != image.name]
        self._image_names = {image.unique_id: image.name for image in images}
        for old, new in renamed:  # each rename below comes back here, with nothing left to do
            for derived in (labels_name, confidence_name):
                if derived(old) in layers and derived(new) not in layers:
                    layers[derived(old)].name = derived(new)

    def _track_sclip_layers(self) -> None:
        """Follow edits on every labels layer napari-sclip made or opened, from now on."""
        from napari.layers import Labels

        for layer in self.viewer.layers:
            if isinstance(layer, Labels) and METADATA_KEY in layer.metadata:
                self._record(layer)

    def _on_active_layer(self, event) -> None:
        """Picking an image, or its labels or confidence layer, in the layer list picks the image."""
        name = self._image_of(event.value) if event.value is not None else None
        if name is not None and name != self._image_combo.currentText():
            self._image_combo.setCurrentText(name)

    def _on_picked(self, *_) -> None:
        """Picking an image makes it (or its labels layer, where one paints) napari's active
        layer, unless one of its layers already is: the picker and the layer list agree."""
        self._on_image_changed()
        image = self.selected_image()
        active = self.viewer.layers.selection.active
        if image is None or (active is not None and self._image_of(active) == image.name):
            return
        self.viewer.layers.selection.active = self._labels_layer(image) or image

    def _image_of(self, layer) -> str | None:
        """The name of the image a layer is, or belongs to ("<image> labels", "<image> confidence")."""
        names = {layer.name, layer.name.removesuffix(" labels"), layer.name.removesuffix(" confidence")}
        return next((image.name for image in self._image_layers() if image.name in names), None)

    def selected_image(self):
        """The image layer chosen in the picker, or ``None``."""
        name = self._image_combo.currentText()
        return next((layer for layer in self._image_layers() if layer.name == name), None)

    def _on_image_changed(self) -> None:
        image = self.selected_image()
        stacked = image is not None and len(spatial_shape(_full_resolution(image).shape, image.rgb)) > 2
        self._controls["all_slices"].setEnabled(stacked)
        self._show_vocabulary(image)
        self._refresh_reviewed()
        self._show_model_note()

    def _selected_labels(self):
        """The labels layer of the image chosen in the picker, or ``None``."""
        image = self.selected_image()
        return self._labels_layer(image) if image is not None else None

    def _labels_layer(self, image):
        name = labels_name(image.name)
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def _record(self, labels) -> LabelsRecord:
        return RECORDS.get(labels)

    # -- vocabulary -------------------------------------------------------------------------------

    def vocabulary(self) -> Vocabulary:
        """The vocabulary typed in the editor (raises VocabularyError)."""
        return parse_vocabulary_text(self._vocabulary_edit.toPlainText())

    def set_vocabulary(self, lines: list[str] | str) -> None:
        """Put classes in the editor, as if typed."""
        text = lines if isinstance(lines, str) else "\n".join(lines)
        self._vocabulary_edit.setPlainText(text)

    def _on_text_changed(self) -> None:
        image = self.selected_image()
        if image is not None and not self._setting_text:
            self._drafts[image.unique_id] = self._vocabulary_edit.toPlainText()
        self._refresh_class_list()

    def _show_vocabulary(self, image) -> None:
        """Show the picked image's vocabulary: what was typed for it and not yet run, else its
        labels' classes; an image with neither keeps the text there (to segment it alike)."""
        text = self._drafts.get(image.unique_id) if image is not None else None
        labels = self._labels_layer(image) if image is not None else None
        if text is None and labels is not None:
            classes = self._record(labels).state.classes
            text = "\n".join(", ".join(classes.names[uid]) for uid in classes.active) or None
        if text is not None and text != self._vocabulary_edit.toPlainText():
            self._setting_text = True
            try:
                self._vocabulary_edit.setPlainText(text)
            finally:
                self._setting_text = False
        self._refresh_class_list()

    def _refresh_class_list(self) -> None:
        self._class_list.clear()
        try:
            vocabulary = self.vocabulary()
        except SclipError as exc:
            item = QListWidgetItem(str(exc))
            item.setForeground(QColor("orange"))
            self._class_list.addItem(item)
            return
        labels = self._selected_labels()
        classes = self._record(labels).state.classes if labels is not None else ClassRegistry()
        uids, _ = classes.plan(vocabulary.classes)
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
                self._notify_error(f"cannot write {path}: {exc.strerror or exc}")

    def _browse_weights(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Choose CLIP weights", "", "Checkpoints (*.pt *.pth *.bin *.safetensors);;All files (*)"
        )
        if path:
            self.set_options(pretrained=path)

    # -- review status ----------------------------------------------------------------------------

    def _refresh_reviewed(self) -> None:
        """The reviewed box shows the chosen image's labels layer's status."""
        labels = self._selected_labels()
        self._reviewed_box.blockSignals(True)
        self._reviewed_box.setEnabled(labels is not None)
        self._reviewed_box.setChecked(labels is not None and self._record(labels).state.review_status == REVIEWED)
        self._reviewed_box.blockSignals(False)

    def _set_reviewed(self, checked: bool) -> None:
        labels = self._selected_labels()
        if labels is not None:
            record = self._record(labels)
            record.state.review_status = REVIEWED if checked else UNREVIEWED
            record.state.store(labels.metadata)
            RECORDS.changed(labels)  # a review showing it saves the mark

    def _on_record_changed(self, event) -> None:
        """A review put another sample into a labels layer, or marked it: show its state."""
        labels = self._selected_labels()
        if labels is not None and labels.unique_id == event.value:
            self._refresh_reviewed()
            self._refresh_class_list()

    # -- devices (found in the background: it imports the engine) ---------------------------------

    def _find_devices(self) -> None:
        """Import the engine in the background now, so that it is usually there by the first click."""
        from napari.qt.threading import create_worker

        _settle_workers_at_exit()

        # Keep a reference: a worker that is garbage-collected never delivers its result.
        self._device_worker = create_worker(engine_devices, _start_thread=False, _ignore_errors=True)
        self._device_worker.returned.connect(self._set_devices)
        self._device_worker.errored.connect(lambda exc: None)  # the default device stays usable
        self._device_worker.start()

    def _set_devices(self, devices: list[str]) -> None:
        combo = self._controls["device"]
        names = ["auto", *devices]
        if combo.value() not in names:  # e.g. NAPARI_SCLIP_DEVICE names a device not found: keep it
            names.append(combo.value())
        combo.set_choices([(name, name) for name in names])
        self._show_model_note()  # the engine is here now: open_clip names have a size too

    # -- running ----------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether a segmentation or export is computing, or labels are being written."""
        return self._worker is not None or self._writing

    def _toggle_run(self) -> None:
        if self._worker is not None:
            self.cancel()
        else:
            self.segment()

    def _get_segmenter(self, options: SegmentOptions):
        """The segmenter for ``options``' model, weights, device and activation, kept while they
        stay the same.  It imports the engine: only workers call it."""
        wanted = (*normalise_choice(options.model, options.pretrained), options.device or config.default_device(),
                  options.quick_gelu)
        seg = self._segmenter
        if seg is None or (seg.model_name, seg.pretrained, seg.device_name, seg.quick_gelu) != wanted:
            self._segmenter = make_segmenter(*wanted)
        return self._segmenter

    def _segment_job(self, options: SegmentOptions, job: SegmentJob) -> Generator[JobProgress, None, list]:
        """The worker's job: the segmenter (the engine's import on a first run), then the job."""
        yield JobProgress(0.0, "starting the engine")
        return (yield from run_job(self._get_segmenter(options), job))

    def segment(self) -> None:
        """Start segmenting the selected image in a background worker (what Segment does)."""
        if self.running:
            return
        image = self.selected_image()
        if image is None:
            self._notify_error("add or select an image layer first")
            return
        try:
            vocabulary = self.vocabulary()
            check_layer(_full_resolution(image).shape, image.rgb)  # shape only: no engine needed
        except SclipError as exc:
            self._notify_error(exc)
            return
        options = self.options()
        labels = self._labels_layer(image)
        agreed = self._confirm_removals(labels, vocabulary, set()) if labels is not None else set()
        if agreed is None:
            return
        classes = self._record(labels).state.classes if labels is not None else ClassRegistry()
        uids, _ = classes.plan(vocabulary.classes)
        data = _full_resolution(image)
        job = SegmentJob(
            data=data,
            rgb=image.rgb,
            regions=slice_regions(data.shape, image.rgb, None if options.all_slices else self._slice_on_screen(image)),
            vocabulary=vocabulary,
            options=options.method_options(),
            contrast_limits=None if image.rgb and data.dtype == np.uint8 else tuple(image.contrast_limits),
            keep_confidence=options.confidence,
            label_values=np.array([0, *uids], dtype=label_dtype(max(uids))),
        )
        from napari.utils import progress

        image_id = image.unique_id
        self._progress = progress(total=1000, desc=f"SCLIP: {image.name}")
        self._status.setText("starting…")
        self._start_worker(self._segment_job, (options, job),
                           lambda results: self._apply(image_id, data, vocabulary, uids, options, agreed, results))

    def _start_worker(self, job: Callable, args: tuple, returned: Callable[[Any], None]) -> None:
        """Run the generator ``job(*args)`` in a worker thread; the Segment button cancels it.

        The worker is superqt's plain one, not napari's, which would show every error and warning
        a second time: this widget reports each once, as one line (status and notification).
        """
        from napari.qt.threading import create_worker
        from superqt.utils import GeneratorWorker

        self._warnings = []
        self._worker = create_worker(job, *args, _worker_class=GeneratorWorker, _start_thread=False,
                                     _ignore_errors=True)
        self._worker.yielded.connect(self._on_progress)
        self._worker.warned.connect(self._on_warning)
        self._worker.returned.connect(returned)
        self._worker.errored.connect(self._notify_error)
        self._worker.finished.connect(self._on_finished)
        self._show_busy()
        self._worker.start()

    def _show_busy(self) -> None:
        """Segment becomes Cancel while a worker runs; while labels are written nothing can
        start, and no export starts while anything runs."""
        self._run_button.setText("Segment" if self._worker is None else "Cancel")
        self._run_button.setEnabled(not self._writing)
        self._export_button.setEnabled(not self.running)

    def _slice_on_screen(self, image) -> tuple[int, ...]:
        """The image's data position on screen (its scale and translation undone), rounded."""
        return tuple(int(round(c)) for c in image.world_to_data(self.viewer.dims.point))

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

    def _on_warning(self, warning: tuple) -> None:
        """A warning raised in the worker (``warnings.showwarning``'s arguments).  Deprecation
        notices of libraries are for developers: Python hides them by default, and so do we."""
        from napari.utils.notifications import show_warning

        message = " ".join(str(warning[0]).split())
        if issubclass(warning[1], (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
            _log.debug("worker warning: %s", message)
            return
        self._warnings.append(message)
        self._status.setText(f"warning: {message}")
        show_warning(f"SCLIP: {message}")

    def _on_finished(self) -> None:
        aborted = self._worker is not None and self._worker.abort_requested
        self._worker = None
        self._stop_export = None
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self._show_busy()
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

    def _confirm_removals(self, labels, vocabulary: Vocabulary, agreed: set[int]) -> set[int] | None:
        """Ask before a run retires classes that still label pixels of ``labels`` (beyond those
        already ``agreed``); the classes agreed to, or ``None`` when the person declines."""
        classes = self._record(labels).state.classes
        _, retired = classes.plan(vocabulary.classes)
        present = sorted(values_present(labels.data, set(retired) - agreed))
        if not present:
            return agreed
        names = ", ".join(classes.display_name(uid) for uid in present)
        answer = QMessageBox.question(
            self,
            "Remove classes that label pixels?",
            f"Pixels of '{labels.name}' are labelled {names}, which the new vocabulary no longer has. "
            "Continue and set those pixels to unlabelled?",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
            QMessageBox.StandardButton.No,
        )
        return agreed | set(present) if answer == QMessageBox.StandardButton.Yes else None

    def _apply(self, image_id, segmented, vocabulary: Vocabulary, uids: list[int], options: SegmentOptions,
               agreed: set[int], results: list[SliceResult]) -> None:
        """Write the worker's results into the image's labels layer (GUI thread)."""
        image = self._layer(image_id)
        if image is None:
            self._status.setText("the image layer was removed; results dropped")
            return
        data = _full_resolution(image)
        if data is not segmented:  # e.g. a review moved on to its next sample meanwhile
            self._status.setText("the image changed during the run; results dropped")
            return
        shape = spatial_shape(data.shape, image.rgb)
        labels = self._labels_layer(image)
        if labels is not None and labels.data.shape != shape:
            self._notify_error(f"layer '{labels.name}' does not have the image's shape; rename or remove it")
            return
        if labels is not None and self._record(labels).state.classes.plan(vocabulary.classes)[0] != uids:
            # A labels layer appeared, or its classes changed, during the run: the worker's numbers
            # would mean other classes there.
            self._status.setText("labels not written: the labels layer's classes changed during the run; "
                                 "segment again")
            return
        if labels is not None and self._confirm_removals(labels, vocabulary, agreed) is None:
            # a labels layer that appeared during the run
            self._status.setText("labels not written: keep the classes or segment again")
            return
        if labels is None:
            metadata: dict = {}
            LabelsState.new(shape).store(metadata)
            labels = self.viewer.add_labels(new_labels(shape, results), name=labels_name(image.name), scale=image.scale,
                                            translate=image.translate, metadata=metadata)
            record = self._record(labels)
            # The numbers the worker labelled with (planned for a labels layer removed meanwhile).
            record.state.classes.names.update(zip(uids, (tuple(names) for names in vocabulary.classes)))
            record.state.classes.active = list(uids)
            self._finish(image, labels, record, results, options, sum(item.labels.size for item in results))
            return
        record = self._record(labels)
        _, retired = record.state.classes.plan(vocabulary.classes)
        record.state.classes.update(vocabulary.classes)  # the numbers the worker labelled with
        dtype = label_dtype(max(record.state.classes.names))
        if np.iinfo(labels.data.dtype).max < np.iinfo(dtype).max:
            labels.data = labels.data.astype(dtype)
        RECORDS.settle(labels)  # a review drops strokes undone from the edits the run keeps
        steps = update_labels(labels, record, results, retired, options.overwrite)
        self._writing = True
        self._show_busy()
        self._status.setText("writing labels…")
        self._drive(steps, lambda changed: self._finish(image, labels, record, results, options, changed))

    def _drive(self, steps, done: Callable[[Any], None]) -> None:
        """Run a generator one step per event-loop turn (the GUI repaints in between), then call
        ``done`` with its return value."""
        try:
            next(steps)
        except StopIteration as stop:
            done(stop.value)
            return
        QTimer.singleShot(0, lambda: self._drive(steps, done))

    def _finish(self, image, labels, record: LabelsRecord, results: list[SliceResult], options: SegmentOptions,
                changed: int) -> None:
        self._writing = False
        self._show_busy()
        state = record.state
        for item in results:
            state.record_run(item.region[:-2], item.params)
        state.review_status = UNREVIEWED  # the model changed the labels: a review no longer holds
        state.store(labels.metadata)
        RECORDS.changed(labels)
        style_labels_layer(labels, state.classes)
        layers = self.viewer.layers
        if labels in layers and image in layers:  # neither was removed while the labels were written
            if options.confidence:
                confidence = self._write_confidence(image, labels.data.shape, results)
                layers.move(layers.index(confidence), layers.index(labels))  # labels on top, where one paints
            layers.selection.active = labels
        self._drafts.pop(image.unique_id, None)  # what was typed has now been run
        self._refresh_class_list()
        self._refresh_reviewed()
        kept = int(state.edited.sum())
        note = f", kept {kept} edited pixels" if kept and not options.overwrite else ""
        reused = sum(item.features_reused for item in results)
        if reused:
            note += ", image features reused" if reused == len(results) else f", features of {reused} slice(s) reused"
        note += "".join(f"; warning: {message}" for message in self._warnings)
        self._status.setText(f"done: {len(results)} slice(s), {changed} pixels updated{note}")

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

    # -- datasets ---------------------------------------------------------------------------------

    def _open_dataset_clicked(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open a napari-sclip dataset")
        if folder:
            self.open_dataset(folder)

    def open_dataset(self, folder: str) -> None:
        """Open a dataset folder for review: one sample at a time, in the review panel."""
        from napari_sclip.plugin.review_panel import show_review

        try:
            show_review(self.viewer, folder)
        except SclipError as exc:
            self._notify_error(exc)
            return
        self._status.setText(f"reviewing {folder}")

    def _export_sources(self, selected_only: bool) -> tuple[list[tuple], list[str]]:
        """For each image layer with a "<image> labels" layer: the layer data and metadata that
        :func:`~napari_sclip.plugin.io.labelled_images` takes; with ``selected_only``, those whose
        image or labels layer is selected (all if none is).  Also the names of labels layers
        napari-sclip knows whose image is not open (they cannot be exported)."""
        layers = self.viewer.layers
        pairs = [(image, self._labels_layer(image)) for image in self._image_layers()]
        pairs = [(image, labels) for image, labels in pairs if labels is not None]
        chosen = [(image, labels) for image, labels in pairs if image in layers.selection or labels in layers.selection]
        sources = []
        for image, labels in chosen if selected_only and chosen else pairs:
            if not self._record(labels).state.labelled_slices():  # adopts a layer made elsewhere
                continue
            confidence = confidence_name(image.name)
            image_meta = {"name": image.name, "rgb": image.rgb, "source": {"path": image.source.path},
                          "metadata": image.metadata}
            sources.append((_full_resolution(image), image_meta,
                            labels.data, {"metadata": labels.metadata},
                            layers[confidence].data if confidence in layers else None))
        paired = {labels.unique_id for _, labels in pairs}
        orphans = [layer.name for layer in layers if layer in RECORDS and layer.unique_id not in paired]
        return sources, orphans

    def _export_clicked(self) -> None:
        if self.running:
            return
        if not self._export_sources(selected_only=True)[0]:
            self._notify_error("nothing to export: segment an image first")
            return
        folder = QFileDialog.getExistingDirectory(self, "Export dataset to (a new or empty folder, or a dataset)")
        if folder:
            self.export_dataset(folder)

    def export_dataset(self, folder: str) -> None:
        """Export the selected labelled images (all when none is selected) to a dataset folder, in
        the background: their slices that hold model labels or edits.  Cancel stops it between
        samples."""
        if self.running:
            return
        sources, orphans = self._export_sources(selected_only=True)
        if not sources:
            self._notify_error("nothing to export: segment an image first")
            return
        from napari_sclip.dataset.export import iter_export

        stop = self._stop_export = threading.Event()
        skipped = f"; skipped {', '.join(orphans)} (image layer not open)" if orphans else ""

        def job():
            items = [item for source in sources for item in labelled_images(*source)]
            written = 0
            if not items:
                return 0
            with closing(iter_export(folder, items)) as export:
                for written, total in export:
                    yield JobProgress(written / total, f"exporting {written}/{total} image(s)")
                    if stop.is_set():
                        break
            return written

        def report(written: int) -> None:
            what = "export cancelled after" if stop.is_set() else "exported"
            self._status.setText(f"{what} {written} image(s) to {folder}{skipped}")

        self._status.setText(f"exporting to {folder}…")
        self._start_worker(job, (), report)


def _button(text: str, tip: str, slot: Callable[[], None]) -> QPushButton:
    """A push button that calls ``slot()`` when clicked (Qt's ``checked`` argument dropped)."""
    button = QPushButton(text)
    button.setToolTip(tip)
    button.clicked.connect(lambda *_: slot())
    return button


def _value(control: QWidget) -> Any:
    if isinstance(control, QCheckBox):
        return control.isChecked()
    if isinstance(control, QLineEdit):
        return control.text().strip()
    return control.value()


def _set_value(control: QWidget, value: Any) -> None:
    if isinstance(control, QCheckBox):
        control.setChecked(bool(value))
    elif isinstance(control, QLineEdit):
        control.setText(str(value))
    else:
        control.setValue(value)


def _full_resolution(image):
    """An image layer's data at full resolution (the first level of a multiscale layer)."""
    return image.data[0] if image.multiscale else image.data


@functools.cache
def _settle_workers_at_exit() -> None:
    """At interpreter exit, ask this process's workers to stop and wait for them (the engine's
    import cannot stop half-way: a few seconds at most).  Otherwise a script that closes the viewer
    while the import runs ends with Qt deleting a worker's signals under its thread: an abort."""
    import atexit

    from superqt.utils import WorkerBase

    def settle() -> None:
        try:
            WorkerBase.await_workers(msecs=60_000)
        except RuntimeError:  # still running after a minute: exit all the same
            pass

    atexit.register(settle)


class _VerticalScroll(QScrollArea):
    """Scrolls up and down only: as wide as its content needs (asked when Qt lays the dock out,
    so napari's stylesheet is counted), so nothing is clipped at the side."""

    def __init__(self):
        super().__init__()
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)

    def minimumSizeHint(self) -> QSize:
        hint = super().minimumSizeHint()
        content = self.widget().minimumSizeHint().width() + self.verticalScrollBar().sizeHint().width()
        return QSize(max(hint.width(), content), hint.height())


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
