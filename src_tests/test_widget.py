"""The SCLIP widget in a real napari window (Xvfb), with the tiny test model, driven as a person
drives it: clicking its buttons and checkboxes, typing classes, picking layers, napari's menus.

The model is chosen through the environment variables, as a site admin would.  File dialogs and
questions are answered by replacing ``QFileDialog.get*`` and ``QMessageBox.question``.
"""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QMessageBox

from napari_sclip.classes import ClassRegistry
from napari_sclip.colors import label_color
from napari_sclip.plugin.records import RECORDS

from conftest import TINY_MODEL, natural_image

pytestmark = pytest.mark.gui


@pytest.fixture
def widget(display, make_napari_viewer, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("NAPARI_SCLIP_MODEL", TINY_MODEL)
    monkeypatch.setenv("NAPARI_SCLIP_PRETRAINED", str(tiny_checkpoint))
    monkeypatch.setenv("NAPARI_SCLIP_DEVICE", "cpu")
    viewer = make_napari_viewer(show=True)
    _, dock = viewer.window.add_plugin_dock_widget("napari-sclip", "SCLIP segmentation")
    return dock


@pytest.fixture
def answers(monkeypatch):
    """Answers to the widget's file dialogs and questions: set ``answers["folder"]`` etc.;
    ``answers["asked"]`` collects the questions' texts."""
    from qtpy.QtWidgets import QFileDialog, QMessageBox

    given = {"folder": "", "open": "", "save": "", "question": QMessageBox.StandardButton.No, "asked": []}
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: given["folder"])
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (given["open"], ""))
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (given["save"], ""))
    monkeypatch.setattr(QMessageBox, "question", lambda parent, title, text, *a: given["asked"].append(text)
                        or given["question"])
    return given


def click(qtbot, control) -> None:
    """Click a control a person can see: a button at its centre, a checkbox on its box (a
    stretched checkbox's centre may be blank space that does not toggle it)."""
    from qtpy.QtWidgets import QCheckBox, QScrollArea, QStyle, QStyleOptionButton

    parent = control.parentWidget()
    while parent is not None and not isinstance(parent, QScrollArea):
        parent = parent.parentWidget()

    def in_view() -> bool:
        if parent is not None:  # scroll to it, as a person would (again while Advanced unfolds)
            parent.ensureWidgetVisible(control)
        return not control.visibleRegion().isEmpty()

    qtbot.waitUntil(in_view, timeout=5_000)
    position = control.rect().center()
    if isinstance(control, QCheckBox):
        option = QStyleOptionButton()
        control.initStyleOption(option)
        box = control.style().subElementRect(QStyle.SubElement.SE_CheckBoxIndicator, option, control)
        position = box.center()
    qtbot.mouseClick(control, Qt.MouseButton.LeftButton, pos=position)


def choose(combo, text: str) -> None:
    """Pick an entry of a combo box by its text, as the drop-down does."""
    index = combo.findText(text)
    assert index >= 0, f"{text!r} is not offered"
    combo.setCurrentIndex(index)


def type_classes(qtbot, widget, lines) -> None:
    """Replace the editor's text by typing ``lines``."""
    editor = widget._vocabulary_edit
    editor.selectAll()
    qtbot.keyClick(editor, Qt.Key.Key_Delete)
    for k, line in enumerate(lines):
        if k:
            qtbot.keyClick(editor, Qt.Key.Key_Return)
        qtbot.keyClicks(editor, line)
    assert editor.toPlainText() == "\n".join(lines)


def open_advanced(qtbot, widget) -> None:
    if not widget._advanced.isExpanded():
        click(qtbot, widget._advanced._toggle_btn)


def segment(qtbot, widget, timeout=120_000) -> None:
    """Click Segment and wait until the labels are written."""
    assert widget._run_button.text() == "Segment"
    click(qtbot, widget._run_button)
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)


def export(qtbot, widget, answers, folder) -> None:
    """Click Export dataset…, choose ``folder``, wait until it is written."""
    answers["folder"] = str(folder)
    click(qtbot, widget._export_button)
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)


def slow_runs(monkeypatch) -> list:
    """Slow the widget's segmentation job down (50 ms per step); returns the steps taken so far."""
    from napari_sclip.plugin import runner

    started = []
    original = runner.run_job

    def slow_job(*args):
        steps = original(*args)
        while True:
            try:
                step = next(steps)
            except StopIteration as stop:
                return stop.value  # the results
            started.append(step)
            time.sleep(0.05)
            yield step

    monkeypatch.setattr("napari_sclip.plugin.widget.run_job", slow_job)
    return started


def review_panel(widget, qtbot):
    """The review panel docked in the widget's window once its dataset is open (not napari's
    proxy of it: a test may look at its controls)."""
    from napari_sclip.plugin.review_panel import PANEL_NAME

    panel = widget.viewer.window.dock_widgets[PANEL_NAME]
    panel = getattr(panel, "__wrapped__", panel)
    qtbot.waitUntil(lambda: panel.session is not None and not panel.session.opening, timeout=20_000)
    return panel


def class_list(widget) -> list[str]:
    return [widget._class_list.item(i).text() for i in range(widget._class_list.count())]


def _segmented(qtbot, widget, shape, classes=("cat", "dog"), name="img"):
    """Add an RGB image, type ``classes``, click Segment; returns the labels layer."""
    widget.viewer.add_image(natural_image(*shape), name=name, rgb=True)
    type_classes(qtbot, widget, classes)
    segment(qtbot, widget)
    return widget.viewer.layers[f"{name} labels"]


def _stored_meta(folder, image_id):
    return json.loads(next(folder.glob(f"*/meta/{image_id}.json")).read_text())


# -- opening and segmenting ------------------------------------------------------------------------


def test_opens_through_the_manifest_with_env_defaults(widget, tiny_checkpoint):
    from napari_sclip.plugin.widget import SclipWidget

    assert isinstance(widget, SclipWidget)
    options = widget.options()
    assert (options.model, options.pretrained, options.device) == (TINY_MODEL, str(tiny_checkpoint), "cpu")
    assert options.quick_gelu is None  # auto


def test_menu_entries_open_the_widget_and_the_samples(display, make_napari_viewer, monkeypatch, tiny_checkpoint):
    from napari_sclip.plugin.widget import SclipWidget

    monkeypatch.setenv("NAPARI_SCLIP_PRETRAINED", str(tiny_checkpoint))
    viewer = make_napari_viewer()

    def action(*path):
        """A menu bar entry, found by its text as a person reads it."""
        menu = viewer.window._qt_window.menuBar()
        for text in path:
            found = next(a for a in menu.actions() if a.text().replace("&", "").startswith(text))
            menu = found.menu() or found
        return menu

    action("File", "Open Sample", "SCLIP open-vocabulary segmentation", "Astronaut").trigger()
    action("File", "Open Sample", "SCLIP open-vocabulary segmentation", "Coffee").trigger()
    assert viewer.layers["astronaut"].rgb and viewer.layers["coffee"].rgb
    action("Layers", "Segment", "SCLIP segmentation").trigger()
    docked = viewer.window._qt_window.findChildren(SclipWidget)
    assert len(docked) == 1 and docked[0].selected_image() is not None
    action("Plugins", "SCLIP segmentation").trigger()  # the same dock again, not a second one
    assert viewer.window._qt_window.findChildren(SclipWidget) == docked


def test_segment_makes_a_named_coloured_labels_layer(widget, qtbot):
    viewer = widget.viewer
    image = viewer.add_image(natural_image(90, 120), name="photo", rgb=True, scale=(2, 3), translate=(5, 7))
    type_classes(qtbot, widget, ["person, astronaut", "sky", "rocket"])
    assert class_list(widget) == ["1: person  (astronaut)", "2: sky", "3: rocket"]
    segment(qtbot, widget)
    labels = viewer.layers["photo labels"]
    assert labels.data.shape == (90, 120)
    assert set(np.unique(labels.data)) <= {1, 2, 3}
    np.testing.assert_array_equal(labels.scale, image.scale)
    np.testing.assert_array_equal(labels.translate, image.translate)
    table = labels.features
    assert dict(zip(table["index"], table["class_name"])) == {0: "unlabelled", 1: "person", 2: "sky", 3: "rocket"}
    for value in (1, 2, 3):
        np.testing.assert_allclose(labels.colormap.color_dict[value][:3], np.array(label_color(value)) / 255)
    assert widget._run_button.text() == "Segment" and "done" in widget._status.text()

    # The labels equal the engine's own result for the same image and classes.
    from napari_sclip import Segmenter

    expected = Segmenter().segment(image.data, ["person, astronaut", "sky", "rocket"])
    np.testing.assert_array_equal(labels.data, expected.labels)


def test_painted_pixels_survive_a_rerun_and_undo_restores(widget, qtbot):
    labels = _segmented(qtbot, widget, (80, 100))
    labels.brush_size = 5
    labels.paint((40, 50), 2)  # a person's stroke
    stroke = labels.data[38:43, 48:53].copy()
    before = labels.data.copy()

    type_classes(qtbot, widget, ["cat", "dog", "bird"])  # appended: cat and dog keep 1 and 2
    widget.set_options(logit_scale=100.0)
    segment(qtbot, widget)
    np.testing.assert_array_equal(labels.data[38:43, 48:53], stroke)
    assert set(np.unique(labels.data)) <= {1, 2, 3}
    assert "kept" in widget._status.text()

    labels.undo()  # one Ctrl+Z undoes the whole re-run
    np.testing.assert_array_equal(labels.data, before)


def test_a_rerun_keeps_the_layers_mode_and_selected_label(widget, qtbot):
    labels = _segmented(qtbot, widget, (60, 70))
    for mode, label in (("paint", 2), ("fill", 1), ("erase", 2), ("pan_zoom", 2)):
        labels.mode = mode
        labels.selected_label = label
        segment(qtbot, widget)
        assert (labels.mode, labels.selected_label) == (mode, label)
        assert labels.editable


def test_overwrite_my_edits(widget, qtbot):
    labels = _segmented(qtbot, widget, (60, 60))
    model_output = labels.data.copy()
    labels.data_setitem((np.array([10]), np.array([10])), 0)  # erased by hand
    click(qtbot, widget._controls["overwrite"])
    assert widget.options().overwrite
    segment(qtbot, widget)
    np.testing.assert_array_equal(labels.data, model_output)


def test_dropping_a_class_that_labels_pixels_asks_first(widget, qtbot, answers):
    """Model pixels count, not only painted ones; declining changes nothing and runs nothing."""
    labels = _segmented(qtbot, widget, (60, 60))
    assert set(np.unique(labels.data)) == {1, 2}  # both classes label pixels: nothing painted
    before = labels.data.copy()

    type_classes(qtbot, widget, ["cat"])
    click(qtbot, widget._run_button)
    assert len(answers["asked"]) == 1 and "dog" in answers["asked"][0] and not widget.running
    np.testing.assert_array_equal(labels.data, before)

    answers["question"] = answers["question"].Yes
    segment(qtbot, widget)
    assert set(np.unique(labels.data)) == {1}
    assert not (labels.data == 2).any()

    type_classes(qtbot, widget, ["cat", "bird"])  # dog (2) has no pixels left: nothing to ask
    segment(qtbot, widget)
    assert len(answers["asked"]) == 2


def test_cancel_leaves_nothing_behind(widget, qtbot, monkeypatch):
    viewer = widget.viewer
    viewer.add_image(natural_image(700, 900), name="big", rgb=True)
    type_classes(qtbot, widget, ["cat", "dog"])
    started = slow_runs(monkeypatch)
    click(qtbot, widget._run_button)
    assert widget._run_button.text() == "Cancel"
    qtbot.waitUntil(lambda: len(started) >= 3, timeout=60_000)
    click(qtbot, widget._run_button)  # Cancel
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    assert "big labels" not in viewer.layers
    assert widget._run_button.text() == "Segment" and "cancelled" in widget._status.text()


def test_labels_changed_during_a_run_keep_the_numbers_the_worker_used(widget, qtbot, monkeypatch, answers):
    """The worker labels with uids planned when Segment was clicked: a labels layer removed
    meanwhile comes back naming those numbers; one added meanwhile with other classes is not
    written into (its numbers would mean other classes)."""
    viewer = widget.viewer
    labels = _segmented(qtbot, widget, (60, 80), ["cat", "dog", "bird"])
    type_classes(qtbot, widget, ["bird", "fish"])  # bird keeps 3, fish gets 4
    answers["question"] = QMessageBox.StandardButton.Yes  # cat and dog may go
    started = slow_runs(monkeypatch)
    click(qtbot, widget._run_button)
    qtbot.waitUntil(lambda: len(started) >= 2, timeout=60_000)
    viewer.layers.remove(labels)
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    again = viewer.layers["img labels"]
    assert set(np.unique(again.data)) <= {3, 4}
    assert dict(zip(again.features["index"], again.features["class_name"]))[4] == "fish"

    type_classes(qtbot, widget, ["horse"])
    viewer.layers.remove(again)
    before = len(started)
    click(qtbot, widget._run_button)
    qtbot.waitUntil(lambda: len(started) >= before + 1, timeout=60_000)
    someone = np.zeros((60, 80), np.uint8)
    someone[:5, :5] = 1  # someone's labels, where 1 is their class: the worker's 1 (horse) is not
    other = viewer.add_labels(someone, name="img labels")
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    assert "classes changed during the run" in widget._status.text()
    np.testing.assert_array_equal(other.data, someone)
    assert len(answers["asked"]) == 1  # only the first run asked


def test_removing_the_image_during_a_run_drops_its_results(widget, qtbot, monkeypatch):
    viewer = widget.viewer
    viewer.add_image(natural_image(300, 400), name="img", rgb=True)
    started = slow_runs(monkeypatch)
    click(qtbot, widget._run_button)
    assert not widget._export_button.isEnabled()  # nothing else starts meanwhile
    qtbot.waitUntil(lambda: len(started) >= 2, timeout=60_000)
    viewer.layers.remove("img")
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    assert widget._status.text() == "the image layer was removed; results dropped"
    assert len(viewer.layers) == 0 and widget._export_button.isEnabled()


def test_errors_become_one_message_and_the_widget_recovers(widget, qtbot, tmp_path):
    from napari.utils.notifications import notification_manager

    viewer = widget.viewer
    viewer.add_image(natural_image(40, 40), name="img", rgb=True)
    open_advanced(qtbot, widget)
    weights = widget._controls["pretrained"]
    weights.selectAll()
    qtbot.keyClicks(weights, str(tmp_path / "missing.pt"))
    seen = len(notification_manager.records)
    segment(qtbot, widget)
    assert "weights file not found" in widget._status.text()
    errors = [str(n.message) for n in notification_manager.records[seen:]]
    assert len(errors) == 1 and errors[0].startswith("SCLIP: ") and "\n" not in errors[0]
    assert "img labels" not in viewer.layers
    assert widget._run_button.text() == "Segment"

    type_classes(qtbot, widget, ["cat", "Cat"])  # duplicate names: refused before any work starts
    click(qtbot, widget._run_button)
    assert not widget.running and "appears in classes 1 and 2" in widget._status.text()


def test_gui_thread_stays_responsive(widget, qtbot):
    """The largest gap between QTimer ticks while a CPU segmentation runs stays under 200 ms."""
    from qtpy.QtCore import QTimer

    viewer = widget.viewer
    viewer.add_image(natural_image(600, 900), name="img", rgb=True)
    type_classes(qtbot, widget, ["cat", "dog", "grass"])
    widget.set_options(short_side=1024)  # about a hundred windows: a run of a second or more
    segment(qtbot, widget)  # warm: model loaded, text cached

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    widget.set_options(stride=96)  # new windows: the features are computed, not reused
    segment(qtbot, widget)
    timer.stop()
    assert "reused" not in widget._status.text()
    gaps = np.diff(ticks)
    assert len(ticks) > 20
    assert gaps.max() < 0.2, f"GUI thread blocked for {gaps.max() * 1000:.0f} ms"


def test_stack_current_and_all_slices(widget, qtbot):
    viewer = widget.viewer
    stack = np.stack([natural_image(48, 64)[..., k] for k in range(3)]).astype(np.uint16) * 200
    viewer.add_image(stack, name="stack", scale=(4, 1, 1), translate=(10, 0, 0))
    type_classes(qtbot, widget, ["cat", "dog"])
    slices = widget._controls["all_slices"]
    assert slices.isEnabled()

    viewer.dims.set_point(0, 10 + 4 * 1)  # slice 1 in world coordinates (scaled and translated)
    choose(slices, "current slice")
    segment(qtbot, widget)
    labels = viewer.layers["stack labels"]
    assert labels.data.shape == (3, 48, 64)
    assert labels.data[1].all() and not labels.data[0].any() and not labels.data[2].any()

    choose(slices, "all slices")
    segment(qtbot, widget)
    assert all(labels.data[z].all() for z in range(3))

    from napari_sclip import Segmenter

    expected = Segmenter().segment(stack[2], ["cat", "dog"], contrast_limits=viewer.layers["stack"].contrast_limits)
    np.testing.assert_array_equal(labels.data[2], expected.labels)


def test_confidence_layer(widget, qtbot):
    viewer = widget.viewer
    viewer.add_image(natural_image(50, 70), name="img", rgb=True)
    open_advanced(qtbot, widget)
    click(qtbot, widget._controls["confidence"])
    segment(qtbot, widget)
    confidence = viewer.layers["img confidence"]
    assert confidence.data.shape == (50, 70) and confidence.data.dtype == np.float32
    assert 0 < confidence.data.min() and confidence.data.max() <= 1
    names = [layer.name for layer in viewer.layers]
    assert names.index("img labels") > names.index("img confidence")  # labels stay on top
    assert widget._image_combo.count() == 1  # the confidence layer is not offered for segmenting


def test_sample_data_and_gui_command(display, make_napari_viewer, monkeypatch, tiny_checkpoint):
    from napari_sclip.cli import open_gui

    monkeypatch.setenv("NAPARI_SCLIP_MODEL", TINY_MODEL)
    monkeypatch.setenv("NAPARI_SCLIP_PRETRAINED", str(tiny_checkpoint))
    viewer = make_napari_viewer()
    viewer.open_sample("napari-sclip", "coffee")
    assert viewer.layers["coffee"].rgb
    monkeypatch.setattr("napari.Viewer", lambda **kwargs: viewer)
    opened, widget = open_gui([])
    assert opened is viewer and "astronaut" in viewer.layers
    assert widget.selected_image() is not None


# -- the vocabulary ----------------------------------------------------------------------------------


def test_vocabulary_file_load_and_save_buttons(widget, qtbot, tmp_path, answers):
    source = tmp_path / "in.txt"
    source.write_text("# my classes\nperson, astronaut\n\nsky\n", encoding="utf-8")
    answers["open"] = str(source)
    load, save = (button for button in widget.findChildren(type(widget._run_button)) if button.text() in ("Load…", "Save…"))
    click(qtbot, load)
    assert widget.vocabulary().classes == (("person", "astronaut"), ("sky",))
    assert class_list(widget) == ["1: person  (astronaut)", "2: sky"]

    answers["save"] = str(tmp_path / "out.txt")
    click(qtbot, save)
    assert (tmp_path / "out.txt").read_text(encoding="utf-8") == "person, astronaut\nsky\n"

    answers["save"] = str(tmp_path / "no-such-folder" / "out.txt")
    click(qtbot, save)
    assert widget._status.text().startswith("error: cannot write") and "no-such-folder" in widget._status.text()
    answers["open"] = ""  # the dialog was cancelled
    click(qtbot, load)
    assert widget.vocabulary().classes == (("person", "astronaut"), ("sky",))


def test_class_list_previews_values_against_the_layer(widget, qtbot):
    _segmented(qtbot, widget, (40, 40))
    type_classes(qtbot, widget, ["dog", "bird", "cat"])  # reordered, one added
    assert class_list(widget) == ["2: dog", "3: bird", "1: cat"]
    type_classes(qtbot, widget, ["cat", "cat"])
    assert "appears" in class_list(widget)[0]


def test_picking_an_image_or_its_labels_shows_its_classes(widget, qtbot):
    viewer = widget.viewer
    _segmented(qtbot, widget, (40, 50), ["cat", "dog"], name="pets")
    _segmented(qtbot, widget, (40, 50), ["sky, space", "rocket"], name="launch")
    editor = widget._vocabulary_edit

    choose(widget._image_combo, "pets")  # in the picker
    assert editor.toPlainText() == "cat\ndog"
    assert class_list(widget) == ["1: cat", "2: dog"]
    viewer.layers.selection.active = viewer.layers["launch labels"]  # in napari's layer list
    assert widget._image_combo.currentText() == "launch"
    assert editor.toPlainText() == "sky, space\nrocket"
    viewer.layers.selection.active = viewer.layers["pets"]
    assert editor.toPlainText() == "cat\ndog"


def test_typed_classes_follow_their_image_and_carry_to_a_new_one(widget, qtbot):
    viewer = widget.viewer
    _segmented(qtbot, widget, (40, 50), ["cat", "dog"], name="a")
    type_classes(qtbot, widget, ["cat", "dog", "bird"])  # typed for a, not run yet

    viewer.add_image(natural_image(30, 40), name="b", rgb=True)  # napari makes it the active layer
    assert widget._image_combo.currentText() == "b"
    assert widget._vocabulary_edit.toPlainText() == "cat\ndog\nbird"  # a new image: the text stays
    type_classes(qtbot, widget, ["tree"])
    choose(widget._image_combo, "a")
    assert widget._vocabulary_edit.toPlainText() == "cat\ndog\nbird"  # what was typed for a
    choose(widget._image_combo, "b")
    assert widget._vocabulary_edit.toPlainText() == "tree"
    segment(qtbot, widget)
    assert set(np.unique(viewer.layers["b labels"].data)) == {1}
    choose(widget._image_combo, "a")
    segment(qtbot, widget)  # what was typed for a: bird appended
    assert viewer.layers["a labels"].features["class_name"].tolist() == ["unlabelled", "cat", "dog", "bird"]


def test_an_existing_labels_layer_is_treated_as_someone_s_work(widget, qtbot, tmp_path, answers):
    """Its values are kept and keep their numbers: new classes take free values."""
    viewer = widget.viewer
    viewer.add_image(natural_image(40, 50), name="img", rgb=True)
    manual = np.zeros((40, 50), np.uint8)
    manual[5:15, 5:15] = 1  # drawn by hand before the plugin was used
    viewer.add_labels(manual.copy(), name="img labels")
    choose(widget._image_combo, "img")
    type_classes(qtbot, widget, ["cat", "dog"])
    assert class_list(widget) == ["2: cat", "3: dog"]
    segment(qtbot, widget)
    labels = viewer.layers["img labels"]
    assert (labels.data[5:15, 5:15] == 1).all()  # kept
    assert set(np.unique(labels.data[20:, 20:])) <= {2, 3}  # the rest is segmented
    export(qtbot, widget, answers, tmp_path / "ds")
    classes = (tmp_path / "ds" / "classes.txt").read_text().split("\n")
    assert classes[:3] == ["label 1", "cat", "dog"]


# -- datasets ---------------------------------------------------------------------------------------


def _dataset(tmp_path):
    from PIL import Image

    from napari_sclip.classes import ClassRegistry
    from napari_sclip.dataset.writer import DatasetWriter, Sample

    registry = ClassRegistry()
    registry.update((("cat",), ("dog", "puppy")))
    labels = np.ones((40, 50), np.uint8)
    labels[:6, :6] = 2
    labels[30:, 30:] = 2
    edited = np.zeros((40, 50), bool)
    edited[:6, :6] = True  # a person's correction, stored as provenance
    source = tmp_path / "pet.png"
    Image.fromarray(natural_image(40, 50)).save(source)
    writer = DatasetWriter(tmp_path / "ds", registry)
    writer.write(Sample("pet", labels, source=source, edited=edited, meta={"model": "earlier", "window": 99}))
    writer.rebuild_index()
    return tmp_path / "ds"


def test_a_dataset_reopens_with_its_classes_for_more_editing(widget, qtbot, tmp_path, answers):
    folder = _dataset(tmp_path)
    viewer = widget.viewer
    answers["folder"] = str(folder)
    click(qtbot, widget._open_button)
    review_panel(widget, qtbot)
    assert [layer.name for layer in viewer.layers] == ["pet", "pet labels"]
    assert widget._image_combo.currentText() == "pet"
    assert widget._vocabulary_edit.toPlainText() == "cat\ndog, puppy"  # the dataset's, not the default
    segment(qtbot, widget)  # one click straight away retires nothing
    assert answers["asked"] == []
    reopened = viewer.layers["pet labels"]
    assert (reopened.data[:6, :6] == 2).all()  # the stored correction survives the re-run
    assert set(np.unique(reopened.data[10:, 10:])) <= {1, 2}

    panel = review_panel(widget, qtbot)
    click(qtbot, panel._save)  # back into the same dataset
    meta = _stored_meta(folder, "pet")
    assert meta["model"] == TINY_MODEL and meta["window"] == 224  # the new run's provenance
    assert meta["source"]["path"] == str(tmp_path / "pet.png")  # the sample's identity stays
    assert meta["edits"]["painted_pixels"] == 36


def test_a_new_class_from_a_rerun_during_review_reaches_the_dataset(widget, qtbot, tmp_path, answers):
    """Re-segmenting a sample under review with a class the dataset lacks: the save names it in the
    manifest before its mask uses it, so its pixels keep their class instead of becoming ignore."""
    from PIL import Image

    from napari_sclip.dataset.format import read_manifest

    folder = _dataset(tmp_path)
    answers["folder"] = str(folder)
    click(qtbot, widget._open_button)
    review_panel(widget, qtbot)
    type_classes(qtbot, widget, ["zebra"])
    answers["question"] = QMessageBox.StandardButton.Yes  # cat and dog may go
    segment(qtbot, widget)
    labels = widget.viewer.layers["pet labels"]
    zebra = int(labels.data[20, 20])
    assert zebra not in (0, 1, 2)
    click(qtbot, review_panel(widget, qtbot)._save)
    manifest, registry, train_ids = read_manifest(folder)
    assert registry.names[zebra] == ("zebra",) and manifest["vocabulary_version"] == 2
    mask = np.asarray(Image.open(next(folder.glob("*/masks/pet.png"))))
    assert (mask[labels.data == zebra] == train_ids[zebra]).all()
    assert (mask[:6, :6] == 255).all()  # dog went (the person agreed): its kept pixels are unlabelled


def test_the_widget_s_reviewed_box_and_the_review_panel_agree(widget, qtbot, tmp_path, answers):
    from napari_sclip.dataset.writer import DatasetWriter, Sample

    registry = ClassRegistry()
    registry.update((("cat",), ("dog",)))
    with DatasetWriter(tmp_path / "ds", registry, {"train": 1.0}) as writer:
        for name in ("a", "b"):
            writer.write(Sample(name, np.ones((30, 40), np.uint8), image=natural_image(30, 40)))
    answers["folder"] = str(tmp_path / "ds")
    click(qtbot, widget._open_button)
    panel = review_panel(widget, qtbot)
    click(qtbot, panel._reviewed)
    assert widget._reviewed_box.isChecked()  # the panel's mark, in the widget
    click(qtbot, panel._next)
    assert panel.session.current_id == "b" and not widget._reviewed_box.isChecked()
    click(qtbot, widget._reviewed_box)  # the widget's mark, saved by the review at once
    assert panel.session.status("b") == "reviewed" and panel._reviewed.isChecked()
    assert panel._counts.text().startswith("2 reviewed")


def test_open_dataset_button_refuses_a_plain_folder(widget, qtbot, tmp_path, answers):
    (tmp_path / "plain").mkdir()
    answers["folder"] = str(tmp_path / "plain")
    click(qtbot, widget._open_button)
    assert "is not a napari-sclip dataset" in widget._status.text()
    assert len(widget.viewer.layers) == 0
    answers["folder"] = ""  # cancelled
    click(qtbot, widget._open_button)
    assert len(widget.viewer.layers) == 0


def test_export_button_writes_the_dataset(widget, qtbot, tmp_path, answers):
    from PIL import Image

    labels = _segmented(qtbot, widget, (40, 50))
    labels.data_setitem((np.array([3]), np.array([4])), 0)  # a person erased one pixel
    target = tmp_path / "export"
    export(qtbot, widget, answers, target)
    assert "exported 1 image(s)" in widget._status.text()
    mask = np.asarray(Image.open(next(target.glob("*/masks/img.png"))))
    np.testing.assert_array_equal(mask, np.where(labels.data == 0, 255, labels.data - 1))
    provenance = np.asarray(Image.open(next(target.glob("*/provenance/img.png"))))
    assert provenance[3, 4] == 2 and provenance.sum() == 2  # "set to unlabelled by a person"

    answers["folder"] = ""  # the dialog cancelled: nothing happens
    click(qtbot, widget._export_button)
    assert not widget.running


def test_exported_provenance_is_the_engine_s(widget, qtbot, tmp_path, answers):
    """Every control under Advanced reaches the engine, and the export records the engine's own
    parameters: those the CLI records."""
    from napari_sclip import Segmenter

    viewer = widget.viewer
    image = viewer.add_image(natural_image(60, 80), name="img", rgb=True)
    type_classes(qtbot, widget, ["cat", "dog"])
    open_advanced(qtbot, widget)
    choose(widget._controls["quick_gelu"], "off")
    click(qtbot, widget._controls["pamr"])
    for name, value in (("short_side", 280), ("window", 112), ("stride", 56), ("logit_scale", 60.0),
                        ("prob_threshold", 0.3)):
        box = widget._controls[name]
        box.selectAll()
        qtbot.keyClicks(box, str(value))
        qtbot.keyClick(box, Qt.Key.Key_Tab)
        assert box.value() == value
    segment(qtbot, widget)
    export(qtbot, widget, answers, tmp_path / "ds")
    meta = _stored_meta(tmp_path / "ds", "img")

    engine = Segmenter(quick_gelu=False, feature_cache=False).segment(
        image.data, ["cat", "dog"], short_side=280, window=112, stride=56, logit_scale=60.0,
        prob_threshold=0.3, pamr=True,
    )
    np.testing.assert_array_equal(viewer.layers["img labels"].data, engine.labels)
    expected = json.loads(json.dumps(engine.params))
    assert {key: meta[key] for key in expected if key != "features_reused"} == {
        key: value for key, value in expected.items() if key != "features_reused"}
    assert meta["quick_gelu"] is False and meta["device"] == "cpu" and meta["precision"]
    assert meta["pamr"] is True and meta["window"] == 112

    choose(widget._controls["quick_gelu"], "auto (from the weights)")  # the tiny model's config: QuickGELU
    segment(qtbot, widget)
    export(qtbot, widget, answers, tmp_path / "ds")
    assert _stored_meta(tmp_path / "ds", "img")["quick_gelu"] is True


def test_engine_warnings_show_in_the_status_and_as_a_notification(widget, qtbot):
    from napari.utils.notifications import notification_manager

    widget.viewer.add_image(natural_image(40, 50), name="img", rgb=True)
    long_name = " ".join(["very"] * 80) + " long cat"  # longer than CLIP's context: the engine warns
    type_classes(qtbot, widget, [long_name, "dog"])
    seen = len(notification_manager.records)
    segment(qtbot, widget)
    status = widget._status.text()
    assert status.startswith("done:") and "warning: class name" in status and "truncated" in status
    warnings = [str(n.message) for n in notification_manager.records[seen:] if "truncated" in str(n.message)]
    assert len(warnings) == 1 and warnings[0].startswith("SCLIP: class name")


def test_export_writes_only_the_slices_segmented_or_edited(widget, qtbot, tmp_path, answers):
    viewer = widget.viewer
    stack = np.stack([natural_image(32, 40)] * 6)
    viewer.add_image(stack, name="stack", rgb=True)
    type_classes(qtbot, widget, ["cat", "dog"])
    viewer.dims.set_point(0, 2)
    segment(qtbot, widget)  # the current slice only
    export(qtbot, widget, answers, tmp_path / "one")
    assert sorted(p.stem for p in (tmp_path / "one").glob("*/meta/*.json")) == ["stack-002"]
    assert "exported 1 image(s)" in widget._status.text()

    labels = viewer.layers["stack labels"]
    labels.data_setitem((np.array([4]), np.array([7]), np.array([9])), 2)  # a stroke in slice 4
    export(qtbot, widget, answers, tmp_path / "two")
    assert sorted(p.stem for p in (tmp_path / "two").glob("*/meta/*.json")) == ["stack-002", "stack-004"]
    painted = _stored_meta(tmp_path / "two", "stack-004")
    assert painted["slice"] == [4] and painted["edits"]["painted_pixels"] == 1 and "model" not in painted
    assert _stored_meta(tmp_path / "two", "stack-002")["model"] == TINY_MODEL


def test_export_the_selected_images_or_all_and_round_trip(widget, qtbot, tmp_path, answers):
    """Selected layers choose what is exported; a dataset opened in napari and exported again
    gives the same files."""
    from conftest import same_files_apart_from_timestamps

    viewer = widget.viewer
    _segmented(qtbot, widget, (40, 50))
    _segmented(qtbot, widget, (30, 60), name="second")
    viewer.layers["second labels"].data_setitem((np.array([2]), np.array([3])), 0)

    viewer.layers.selection = {viewer.layers["second labels"]}
    export(qtbot, widget, answers, tmp_path / "chosen")
    assert sorted(p.stem for p in (tmp_path / "chosen").glob("*/masks/*.png")) == ["second"]
    assert "exported 1 image(s)" in widget._status.text()

    viewer.layers.selection = set()
    export(qtbot, widget, answers, tmp_path / "all")
    assert sorted(p.stem for p in (tmp_path / "all").glob("*/masks/*.png")) == ["img", "second"]

    viewer.layers.clear()
    shutil.copytree(tmp_path / "all", tmp_path / "before")
    answers["folder"] = str(tmp_path / "all")
    click(qtbot, widget._open_button)  # a review: marking and unmarking rewrites each sample
    panel = review_panel(widget, qtbot)
    for _ in range(2):
        click(qtbot, panel._reviewed)
        click(qtbot, panel._reviewed)
        click(qtbot, panel._next)
    click(qtbot, panel._close)
    same_files_apart_from_timestamps(tmp_path / "before", tmp_path / "all")


def test_export_can_be_cancelled(widget, qtbot, tmp_path, monkeypatch, answers):
    from napari_sclip.dataset import export as export_module

    stack = np.stack([natural_image(30, 40)] * 6)
    widget.viewer.add_image(stack, name="stack", rgb=True)
    widget.viewer.add_labels(np.ones((6, 30, 40), np.uint8), name="stack labels")  # someone's, every slice
    real = export_module.DatasetWriter.write

    def slow_write(self, sample):
        time.sleep(0.2)
        return real(self, sample)

    monkeypatch.setattr(export_module.DatasetWriter, "write", slow_write)
    answers["folder"] = str(tmp_path / "ds")
    click(qtbot, widget._export_button)
    qtbot.waitUntil(lambda: widget._progress_bar.value() > 0, timeout=30_000)
    click(qtbot, widget._run_button)  # "Cancel"
    qtbot.waitUntil(lambda: not widget.running, timeout=30_000)
    assert widget._status.text().startswith("export cancelled after")
    written = sorted(p.stem for p in (tmp_path / "ds").glob("*/meta/*.json"))
    assert 0 < len(written) < 6
    indexed = [json.loads(line)["id"] for f in (tmp_path / "ds").glob("*/metadata.jsonl")
               for line in f.read_text().splitlines()]
    assert sorted(indexed) == written  # the index matches what was written
    assert widget._run_button.text() == "Segment"


def test_export_without_labels_says_so(widget, qtbot, answers):
    widget.viewer.add_image(natural_image(10, 10), name="img", rgb=True)
    answers["folder"] = "/nonexistent"
    click(qtbot, widget._export_button)
    assert "nothing to export" in widget._status.text()


def test_reviewed_status_is_exported_reopened_and_reset_by_a_rerun(widget, qtbot, tmp_path, answers):
    viewer = widget.viewer
    reviewed = widget._reviewed_box
    assert not reviewed.isEnabled()  # no labels yet
    labels = _segmented(qtbot, widget, (40, 50))
    assert reviewed.isEnabled() and not reviewed.isChecked()
    click(qtbot, reviewed)
    assert reviewed.isChecked()
    export(qtbot, widget, answers, tmp_path / "ds")
    assert _stored_meta(tmp_path / "ds", "img")["review_status"] == "reviewed"
    rows = [json.loads(line) for f in (tmp_path / "ds").glob("*/metadata.jsonl") for line in f.read_text().splitlines()]
    assert rows[0]["review_status"] == "reviewed"

    viewer.layers.clear()
    answers["folder"] = str(tmp_path / "ds")
    click(qtbot, widget._open_button)
    review_panel(widget, qtbot)
    assert widget._image_combo.currentText() == "img"
    assert reviewed.isChecked()  # the status came back with the dataset
    segment(qtbot, widget)
    assert not reviewed.isChecked()  # new model labels need a new review
    assert labels is not viewer.layers["img labels"]


# -- settings ---------------------------------------------------------------------------------------


def test_method_choice_fills_its_defaults_and_is_recorded(widget, qtbot):
    from napari_sclip.engine.methods import METHODS, get_method

    method = widget._controls["method"]
    assert [method.itemText(i) for i in range(method.count())] == [m.title for m in METHODS.values()]
    choose(method, get_method("clearclip").title)
    options = widget.options()
    assert (options.method, options.short_side, options.window, options.stride) == ("clearclip", 448, 448, 224)
    assert options.logit_scale == 50.0 and not options.pamr
    assert "Query-query" in widget._method_note.text()
    choose(method, get_method("naclip").title)
    assert widget.options().pamr and widget.options().window == 224
    widget.set_options(window=112, stride=56)  # the caller may override any default
    labels = _segmented(qtbot, widget, (60, 70))
    provenance = labels.metadata["napari_sclip"]["slices"][0]["provenance"]
    assert (provenance["method"], provenance["pamr"], provenance["window"]) == ("naclip", True, 112)
    engine = widget._get_segmenter(widget.options()).segment(
        widget.viewer.layers["img"].data, ["cat", "dog"], method="naclip", window=112, stride=56
    )
    np.testing.assert_array_equal(labels.data, engine.labels)


def test_options_are_one_typed_record(widget, qtbot, tmp_path, answers):
    from dataclasses import asdict, replace

    options = widget.options()
    changed = replace(options, method="maskclip", window=160, stride=80, quick_gelu=True, all_slices=True,
                      confidence=True, overwrite=True, prob_threshold=0.25, model="other", pretrained="x.pt")
    widget.set_options(**asdict(changed))
    assert widget.options() == changed
    with pytest.raises(TypeError, match="unknown option"):
        widget.set_options(windw=3)

    answers["open"] = str(tmp_path / "weights.pt")
    open_advanced(qtbot, widget)
    browse = next(b for b in widget.findChildren(type(widget._run_button)) if b.text() == "…")
    click(qtbot, browse)
    assert widget.options().pretrained == str(tmp_path / "weights.pt")


def test_advanced_opens_and_closes_on_click(widget, qtbot):
    assert not widget._advanced.isExpanded()
    click(qtbot, widget._advanced._toggle_btn)
    qtbot.waitUntil(widget._advanced.isExpanded, timeout=5_000)
    qtbot.waitUntil(lambda: widget._controls["quick_gelu"].isVisible(), timeout=5_000)
    click(qtbot, widget._advanced._toggle_btn)
    qtbot.waitUntil(lambda: not widget._advanced.isExpanded(), timeout=5_000)


def test_vocabulary_edit_on_a_stack_reuses_each_slices_features(widget, qtbot):
    from napari_sclip import Segmenter
    from napari_sclip.engine.feature_cache import FEATURE_CACHE

    viewer = widget.viewer
    stack = np.stack([np.roll(natural_image(48, 64), 9 * z, axis=1) for z in range(3)])
    viewer.add_image(stack, name="stack", rgb=True)
    choose(widget._controls["all_slices"], "all slices")
    type_classes(qtbot, widget, ["cat", "dog"])
    segment(qtbot, widget)
    assert "reused" not in widget._status.text() and len(FEATURE_CACHE) == 3  # a key per slice

    type_classes(qtbot, widget, ["cat", "dog", "bird"])
    segment(qtbot, widget)
    assert "image features reused" in widget._status.text()
    labels = viewer.layers["stack labels"].data
    fresh = Segmenter(feature_cache=False)
    for z in range(3):
        np.testing.assert_array_equal(labels[z], fresh.segment(stack[z], ["cat", "dog", "bird"]).labels)

    viewer.layers["stack"].data = stack[:, ::-1].copy()  # the pixels changed: nothing stale is reused
    segment(qtbot, widget)
    assert "reused" not in widget._status.text()


# -- layers people rename, remove, or open in two windows -------------------------------------------------


def test_renaming_an_image_takes_its_labels_along(widget, qtbot):
    viewer = widget.viewer
    _segmented(qtbot, widget, (40, 50))
    labels = viewer.layers["img labels"]
    viewer.layers["img"].name = "photo"
    assert widget._image_combo.currentText() == "photo"
    assert labels.name == "photo labels"
    labels.data_setitem((np.array([1]), np.array([1])), 0)
    segment(qtbot, widget)  # the same layer, edits kept
    assert [layer.name for layer in viewer.layers] == ["photo", "photo labels"]
    assert labels.data[1, 1] == 0


def test_labels_whose_image_was_removed(widget, qtbot, tmp_path, answers):
    viewer = widget.viewer
    _segmented(qtbot, widget, (40, 50), name="gone")
    _segmented(qtbot, widget, (40, 50), name="kept")
    viewer.layers.remove("gone")
    assert [widget._image_combo.itemText(i) for i in range(widget._image_combo.count())] == ["kept"]
    viewer.layers.selection = set()
    export(qtbot, widget, answers, tmp_path / "ds")
    assert sorted(p.stem for p in (tmp_path / "ds").glob("*/meta/*.json")) == ["kept"]
    assert "skipped gone labels (image layer not open)" in widget._status.text()

    viewer.add_image(natural_image(40, 50), name="gone", rgb=True)  # the image opened again
    assert widget._vocabulary_edit.toPlainText() == "cat\ndog"
    segment(qtbot, widget)
    assert "gone labels [1]" not in viewer.layers


def test_two_viewers_keep_their_own_layers(display, make_napari_viewer, tiny_checkpoint, monkeypatch, qtbot):
    monkeypatch.setenv("NAPARI_SCLIP_MODEL", TINY_MODEL)
    monkeypatch.setenv("NAPARI_SCLIP_PRETRAINED", str(tiny_checkpoint))
    monkeypatch.setenv("NAPARI_SCLIP_DEVICE", "cpu")
    first, second = make_napari_viewer(show=True), make_napari_viewer(show=True)
    widgets = [viewer.window.add_plugin_dock_widget("napari-sclip", "SCLIP segmentation")[1]
               for viewer in (first, second)]
    for widget, classes in zip(widgets, (["cat", "dog"], ["sky", "tree", "rocket"])):
        _segmented(qtbot, widget, (40, 50), classes)  # the same names in both windows
    assert widgets[0].viewer.layers["img labels"].features["class_name"].tolist() == ["unlabelled", "cat", "dog"]
    first_labels = widgets[0].viewer.layers["img labels"]
    first_labels.data_setitem((np.array([0]), np.array([0])), 0)
    assert RECORDS.get(first_labels).state.edited.sum() == 1
    second_labels = widgets[1].viewer.layers["img labels"]
    assert RECORDS.get(second_labels).state.edited.sum() == 0
    assert widgets[1]._vocabulary_edit.toPlainText() == "sky\ntree\nrocket"


def test_a_duplicated_labels_layer_has_its_own_edits(widget, qtbot):
    """napari copies metadata shallowly: the duplicate must not share the original's edit mask."""
    from napari.layers._layer_actions import _duplicate_layer

    labels = _segmented(qtbot, widget, (40, 50))
    labels.data_setitem((np.array([1]), np.array([1])), 2)
    widget.viewer.layers.selection = {labels}
    _duplicate_layer(widget.viewer.layers)
    copy = widget.viewer.layers["img labels copy"]
    copy.data_setitem((np.array([5, 6]), np.array([5, 6])), 1)
    assert RECORDS.get(copy).state.edited.sum() == 3  # its own mask, carried over, then its strokes
    assert RECORDS.get(labels).state.edited.sum() == 1


def test_the_picker_names_the_active_image_also_when_docked_after_several(display, make_napari_viewer, qtbot):
    """napari makes each new layer active: the picker names that image, whether the widget was
    docked before or after the images were added."""
    viewer = make_napari_viewer(show=True)
    viewer.add_image(natural_image(20, 30), name="first", rgb=True)
    viewer.add_image(natural_image(20, 30), name="second", rgb=True)
    _, late = viewer.window.add_plugin_dock_widget("napari-sclip", "SCLIP segmentation")
    assert viewer.layers.selection.active.name == "second"
    assert late.selected_image().name == "second"
    viewer.add_image(natural_image(20, 30), name="third", rgb=True)
    assert late.selected_image().name == "third"
    viewer.layers.selection.active = viewer.layers["first"]
    assert late.selected_image().name == "first"


def test_advanced_opens_without_squeezing_the_rows(widget, qtbot):
    """A short dock and a long status line: the rows keep their height (the widget scrolls)."""
    from qtpy.QtWidgets import QScrollArea

    widget._status.setText("error: " + "a long message that wraps over many lines " * 20)
    widget.resize(300, 300)
    widget._advanced.expand(animate=False)
    qtbot.waitUntil(lambda: widget._advanced.isExpanded())
    model = widget._controls["model"]
    assert model.height() >= model.minimumSizeHint().height()
    assert widget.findChild(QScrollArea).verticalScrollBar().maximum() > 0
    assert not widget._run_button.visibleRegion().isEmpty()  # Segment stays in view


def test_a_review_that_moves_on_during_a_run_drops_its_results(widget, qtbot, tmp_path, answers, monkeypatch):
    """The review puts the next sample into the same image layer: a run on the last one must not
    write its labels onto it."""
    from napari_sclip.dataset.writer import DatasetWriter, Sample

    registry = ClassRegistry()
    registry.update((("cat",), ("dog",)))
    with DatasetWriter(tmp_path / "ds", registry, {"train": 1.0}) as writer:
        for k, name in enumerate(("a", "b")):
            writer.write(Sample(name, np.ones((60, 80), np.uint8), image=np.roll(natural_image(60, 80), k, axis=0)))
    answers["folder"] = str(tmp_path / "ds")
    click(qtbot, widget._open_button)
    panel = review_panel(widget, qtbot)
    started = slow_runs(monkeypatch)
    click(qtbot, widget._run_button)
    qtbot.waitUntil(lambda: len(started) >= 2, timeout=60_000)
    click(qtbot, panel._next)
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    assert widget._status.text() == "the image changed during the run; results dropped"
    assert panel.session.current_id == "b"
    assert (widget.viewer.layers["b labels"].data == 1).all() and not panel.session.unsaved


def test_a_stroke_undone_during_a_review_is_not_kept_by_a_rerun(widget, qtbot, tmp_path, answers):
    """napari's undo does not report its pixels: the review settles the edits before a run keeps
    them, so the undone stroke's pixels get the model's labels like the rest."""
    from napari_sclip.dataset.writer import DatasetWriter, Sample

    registry = ClassRegistry()
    registry.update((("cat",), ("dog",)))
    with DatasetWriter(tmp_path / "ds", registry, {"train": 1.0}) as writer:
        writer.write(Sample("a", np.ones((40, 50), np.uint8), image=natural_image(40, 50)))
    answers["folder"] = str(tmp_path / "ds")
    click(qtbot, widget._open_button)
    review_panel(widget, qtbot)
    labels = widget.viewer.layers["a labels"]
    labels.paint((20, 20), 2, refresh=True)
    labels.undo()
    type_classes(qtbot, widget, ["dog"])  # one class: the run labels every pixel dog
    answers["question"] = QMessageBox.StandardButton.Yes  # cat may go (a kept cat pixel would become 0)
    segment(qtbot, widget)
    assert (labels.data == 2).all()


def test_the_model_picker_offers_the_presets_and_custom(widget, qtbot):
    from napari_sclip.engine.presets import PRESETS

    picker = widget._model_picker
    titles = [picker.itemText(i) for i in range(picker.count())]
    assert titles[-1] == "custom…" and len(titles) == len(PRESETS) + 1
    assert "BioCLIP (ViT-B/16), 598 MB" in titles and "OpenAI ViT-L/14, 1.7 GB" in titles
    assert picker.currentText() == "custom…"  # the environment names the tiny test model
    choose(picker, "BioCLIP (ViT-B/16), 598 MB")
    assert (widget.options().model, widget.options().pretrained) == ("bioclip", "")
    assert "tree of life" in widget._model_note.text() and "598 MB download" in widget._model_note.text()
    choose(picker, "QuiltNet ViT-B/16, 598 MB")
    assert "accept the terms" in widget._model_note.text()
    # Typing the default spelt out shows its preset; anything else is custom.
    open_advanced(qtbot, widget)
    widget._controls["model"].clear()
    qtbot.keyClicks(widget._controls["model"], "ViT-B-16")
    widget._controls["pretrained"].clear()
    qtbot.keyClicks(widget._controls["pretrained"], "openai")
    assert picker.currentText() == "OpenAI ViT-B/16, 598 MB"
    qtbot.keyClicks(widget._controls["pretrained"], "x")
    assert picker.currentText() == "custom…"


def test_custom_model_from_a_folder_runs_and_shows_its_memory(widget, qtbot, tmp_path):
    """custom… opens the model fields; a local-dir folder of another patch size segments."""
    from test_backbones import open_clip_folder, random_clip, tiny_config

    cfg = tiny_config(32, True)
    folder = open_clip_folder(tmp_path / "p32", cfg, random_clip(cfg))
    widget.viewer.add_image(natural_image(90, 120), name="img", rgb=True)
    picker = widget._model_picker
    assert picker.currentText() == "custom…"  # the environment's tiny model: choosing it again
    picker.activated.emit(picker.currentIndex())  # is what Qt reports of a person's pick
    qtbot.waitUntil(widget._advanced.isExpanded, timeout=5_000)
    widget._controls["model"].clear()
    qtbot.keyClicks(widget._controls["model"], f"local-dir:{folder}")
    widget._controls["pretrained"].clear()
    note = widget._model_note.text()
    assert "32 px patches, 3 blocks" in note and "Needs up to" in note and "for this image" in note
    type_classes(qtbot, widget, ["cat", "dog"])
    segment(qtbot, widget)
    provenance = widget.viewer.layers["img labels"].metadata["napari_sclip"]["slices"][0]["provenance"]
    assert provenance["model"] == f"local-dir:{folder}" and provenance["patch_size"] == 32
