"""The SCLIP widget in a real napari viewer (Xvfb), with the tiny test model.

The model is chosen through the environment variables, as a site admin would.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from napari_sclip.colors import label_color

from conftest import TINY_MODEL, natural_image

pytestmark = pytest.mark.gui


@pytest.fixture
def widget(display, make_napari_viewer, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("NAPARI_SCLIP_MODEL", TINY_MODEL)
    monkeypatch.setenv("NAPARI_SCLIP_PRETRAINED", str(tiny_checkpoint))
    monkeypatch.setenv("NAPARI_SCLIP_DEVICE", "cpu")
    viewer = make_napari_viewer()
    _, dock = viewer.window.add_plugin_dock_widget("napari-sclip", "SCLIP segmentation")
    return dock


def _run(qtbot, widget, timeout=120_000):
    widget.segment()
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)


def _segmented(qtbot, widget, shape, classes=("cat", "dog")):
    """Add an RGB image "img", segment it into ``classes`` and return its labels layer."""
    widget.viewer.add_image(natural_image(*shape), name="img", rgb=True)
    widget.set_vocabulary(list(classes))
    _run(qtbot, widget)
    return widget.viewer.layers["img labels"]


def test_opens_through_the_manifest_with_env_defaults(widget, tiny_checkpoint):
    from napari_sclip.plugin.widget import SclipWidget

    assert isinstance(widget, SclipWidget)
    assert widget._model_edit.text() == TINY_MODEL
    assert widget._weights_edit.text() == str(tiny_checkpoint)
    assert widget._device_combo.currentText() == "cpu"


def test_segment_makes_a_named_coloured_labels_layer(widget, qtbot):
    viewer = widget.viewer
    image = viewer.add_image(natural_image(90, 120), name="photo", rgb=True, scale=(2, 3), translate=(5, 7))
    widget.set_vocabulary(["person, astronaut", "sky", "rocket"])
    _run(qtbot, widget)
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

    widget.set_vocabulary(["cat", "dog", "bird"])  # appended: cat and dog keep 1 and 2
    widget._logit_scale.setValue(100.0)
    _run(qtbot, widget)
    np.testing.assert_array_equal(labels.data[38:43, 48:53], stroke)
    assert set(np.unique(labels.data)) <= {1, 2, 3}
    assert "kept" in widget._status.text()

    labels.undo()  # one Ctrl+Z undoes the whole re-run
    np.testing.assert_array_equal(labels.data, before)


def test_overwrite_my_edits(widget, qtbot):
    labels = _segmented(qtbot, widget, (60, 60))
    model_output = labels.data.copy()
    labels.data_setitem((np.array([10]), np.array([10])), 0)  # erased by hand
    widget._overwrite_box.setChecked(True)
    _run(qtbot, widget)
    np.testing.assert_array_equal(labels.data, model_output)


def test_removing_a_painted_class_asks_first(widget, qtbot, monkeypatch):
    from qtpy.QtWidgets import QMessageBox

    labels = _segmented(qtbot, widget, (60, 60))
    painted = 3 - int(labels.data[5, 5])  # the class the model did not choose there
    labels.data_setitem((np.array([5]), np.array([5])), painted)
    kept_class = ["cat", "dog"][2 - painted]
    before = labels.data.copy()

    asked = []
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a) or QMessageBox.StandardButton.No)
    widget.set_vocabulary([kept_class])
    widget.segment()
    assert asked and not widget.running  # declined: nothing runs, nothing changes
    np.testing.assert_array_equal(labels.data, before)

    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.Yes)
    _run(qtbot, widget)
    assert labels.data[5, 5] == 0  # the painted pixel of the removed class is now unlabelled
    assert set(np.unique(labels.data)) <= {0, 3 - painted}


def test_cancel_leaves_nothing_behind(widget, qtbot, monkeypatch):
    from napari_sclip.plugin import runner

    viewer = widget.viewer
    viewer.add_image(natural_image(700, 900), name="big", rgb=True)
    widget.set_vocabulary(["cat", "dog"])
    started = []
    original = runner.run_job

    def slow_job(segmenter, job):
        for step in original(segmenter, job):
            started.append(step)
            time.sleep(0.05)
            yield step

    monkeypatch.setattr("napari_sclip.plugin.widget.run_job", slow_job)
    widget.segment()
    assert widget._run_button.text() == "Cancel"
    qtbot.waitUntil(lambda: len(started) >= 3, timeout=60_000)
    widget._run_button.click()  # Cancel
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    assert "big labels" not in viewer.layers
    assert widget._run_button.text() == "Segment" and "cancelled" in widget._status.text()


def test_errors_become_a_message_and_the_widget_recovers(widget, qtbot, tmp_path):
    viewer = widget.viewer
    viewer.add_image(natural_image(40, 40), name="img", rgb=True)
    widget._weights_edit.setText(str(tmp_path / "missing.pt"))
    _run(qtbot, widget)
    assert "weights file not found" in widget._status.text()
    assert "img labels" not in viewer.layers
    assert widget._run_button.text() == "Segment"

    widget.set_vocabulary("cat\nCat\n")  # duplicate names: refused before any work starts
    widget.segment()
    assert not widget.running and "appears in classes 1 and 2" in widget._status.text()


def test_gui_thread_stays_responsive(widget, qtbot):
    """The largest gap between QTimer ticks while a CPU segmentation runs stays under 200 ms."""
    from qtpy.QtCore import QTimer

    viewer = widget.viewer
    viewer.add_image(natural_image(600, 900), name="img", rgb=True)
    widget.set_vocabulary(["cat", "dog", "grass"])
    widget._short_side.setValue(1024)  # about a hundred windows: a run of a second or more
    _run(qtbot, widget)  # warm: model loaded, text cached

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    widget._stride.setValue(96)  # new windows: the features are computed, not reused
    _run(qtbot, widget)
    timer.stop()
    assert "reused" not in widget._status.text()
    gaps = np.diff(ticks)
    assert len(ticks) > 20
    assert gaps.max() < 0.2, f"GUI thread blocked for {gaps.max() * 1000:.0f} ms"


def test_stack_current_and_all_slices(widget, qtbot):
    viewer = widget.viewer
    stack = np.stack([natural_image(48, 64)[..., k] for k in range(3)]).astype(np.uint16) * 200
    viewer.add_image(stack, name="stack")
    widget.set_vocabulary(["cat", "dog"])
    assert widget._slice_combo.isEnabled()

    viewer.dims.set_current_step(0, 1)
    widget._slice_combo.setCurrentText("current slice")
    _run(qtbot, widget)
    labels = viewer.layers["stack labels"]
    assert labels.data.shape == (3, 48, 64)
    assert labels.data[1].all() and not labels.data[0].any() and not labels.data[2].any()

    widget._slice_combo.setCurrentText("all slices")
    _run(qtbot, widget)
    assert all(labels.data[z].all() for z in range(3))

    from napari_sclip import Segmenter

    expected = Segmenter().segment(stack[2], ["cat", "dog"], contrast_limits=viewer.layers["stack"].contrast_limits)
    np.testing.assert_array_equal(labels.data[2], expected.labels)


def test_confidence_layer(widget, qtbot):
    viewer = widget.viewer
    viewer.add_image(natural_image(50, 70), name="img", rgb=True)
    widget._confidence_box.setChecked(True)
    _run(qtbot, widget)
    confidence = viewer.layers["img confidence"]
    assert confidence.data.shape == (50, 70) and confidence.data.dtype == np.float32
    assert 0 < confidence.data.min() and confidence.data.max() <= 1
    names = [layer.name for layer in viewer.layers]
    assert names.index("img labels") > names.index("img confidence")  # labels stay on top


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


def test_vocabulary_file_load_and_save(widget, tmp_path, monkeypatch):
    from qtpy.QtWidgets import QFileDialog

    source = tmp_path / "in.txt"
    source.write_text("# my classes\nperson, astronaut\n\nsky\n", encoding="utf-8")
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(source), ""))
    widget._load_vocabulary()
    assert widget.vocabulary().classes == (("person", "astronaut"), ("sky",))
    items = [widget._class_list.item(i).text() for i in range(widget._class_list.count())]
    assert items == ["1: person  (astronaut)", "2: sky"]

    target = tmp_path / "out.txt"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(target), ""))
    widget._save_vocabulary()
    assert target.read_text(encoding="utf-8") == "person, astronaut\nsky\n"


def test_class_list_previews_values_against_the_layer(widget, qtbot):
    viewer = widget.viewer
    viewer.add_image(natural_image(40, 40), name="img", rgb=True)
    widget.set_vocabulary(["cat", "dog"])
    _run(qtbot, widget)
    widget.set_vocabulary(["dog", "bird", "cat"])  # reordered, one added
    items = [widget._class_list.item(i).text() for i in range(widget._class_list.count())]
    assert items == ["2: dog", "3: bird", "1: cat"]
    widget.set_vocabulary("cat\ncat\n")
    assert "twice" in widget._class_list.item(0).text() or "appears" in widget._class_list.item(0).text()


def test_an_existing_labels_layer_is_treated_as_someone_s_work(widget, qtbot):
    viewer = widget.viewer
    viewer.add_image(natural_image(40, 50), name="img", rgb=True)
    manual = np.zeros((40, 50), np.uint8)
    manual[5:15, 5:15] = 7  # drawn by hand before the plugin was used
    viewer.add_labels(manual.copy(), name="img labels")
    widget.set_vocabulary(["cat", "dog"])
    _run(qtbot, widget)
    labels = viewer.layers["img labels"]
    assert (labels.data[5:15, 5:15] == 7).all()  # kept
    assert set(np.unique(labels.data[20:, 20:])) <= {1, 2}  # the rest is segmented


def test_a_dataset_reopens_for_more_editing(widget, qtbot, tmp_path):
    from PIL import Image

    from napari_sclip.classes import ClassRegistry
    from napari_sclip.dataset.writer import DatasetWriter, Sample

    registry = ClassRegistry()
    registry.update((("cat",), ("dog",)))
    labels = np.ones((40, 50), np.uint8)
    labels[:6, :6] = 2
    edited = np.zeros((40, 50), bool)
    edited[:6, :6] = True  # a person's correction, stored as provenance
    source = tmp_path / "pet.png"
    Image.fromarray(natural_image(40, 50)).save(source)
    writer = DatasetWriter(tmp_path / "ds", registry)
    writer.write(Sample("pet", labels, source=source, edited=edited))
    writer.rebuild_index()

    viewer = widget.viewer
    viewer.open(str(tmp_path / "ds"), plugin="napari-sclip")
    assert [layer.name for layer in viewer.layers] == ["pet", "pet labels"]
    widget._image_combo.setCurrentText("pet")
    widget.set_vocabulary(["cat", "dog", "bird"])
    _run(qtbot, widget)
    reopened = viewer.layers["pet labels"]
    assert (reopened.data[:6, :6] == 2).all()  # the stored correction survives the re-run
    assert set(np.unique(reopened.data[10:, 10:])) <= {1, 2, 3}


def test_export_dataset_and_reopen(widget, qtbot, tmp_path):
    from PIL import Image

    from napari_sclip.plugin.io import write_dataset

    labels = _segmented(qtbot, widget, (40, 50))
    labels.data_setitem((np.array([3]), np.array([4])), 0)  # a person erased one pixel
    widget._confidence_box.setChecked(True)
    target = tmp_path / "export"
    widget.export_dataset(str(target))
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    assert "exported 1 image(s)" in widget._status.text()
    mask = np.asarray(Image.open(next(target.glob("*/masks/img.png"))))
    np.testing.assert_array_equal(mask, np.where(labels.data == 0, 255, labels.data - 1))
    provenance = np.asarray(Image.open(next(target.glob("*/provenance/img.png"))))
    assert provenance[3, 4] == 2 and provenance.sum() == 2  # "set to unlabelled by a person"
    meta = json.loads(next(target.glob("*/meta/img.json")).read_text())
    assert meta["model"] == TINY_MODEL and meta["window"] == 224

    # napari's own "save layers" path (the writer contribution) gives the same masks
    viewer = widget.viewer
    layer_data = [viewer.layers["img"].as_layer_data_tuple(), labels.as_layer_data_tuple()]
    write_dataset(str(tmp_path / "saved"), layer_data)
    saved = np.asarray(Image.open(next((tmp_path / "saved").glob("*/masks/img.png"))))
    np.testing.assert_array_equal(saved, mask)


def test_export_the_selected_images_or_all_and_round_trip(widget, qtbot, tmp_path):
    """Selected layers choose what is exported; a dataset opened in napari and exported again
    gives the same files."""
    from conftest import same_files_apart_from_timestamps

    viewer = widget.viewer
    _segmented(qtbot, widget, (40, 50))
    viewer.add_image(natural_image(30, 60), name="second", rgb=True)
    widget._image_combo.setCurrentText("second")
    _run(qtbot, widget)
    viewer.layers["second labels"].data_setitem((np.array([2]), np.array([3])), 0)

    viewer.layers.selection = {viewer.layers["second labels"]}
    widget.export_dataset(str(tmp_path / "chosen"))
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    assert sorted(p.stem for p in (tmp_path / "chosen").glob("*/masks/*.png")) == ["second"]
    assert "exported 1 image(s)" in widget._status.text()

    viewer.layers.selection = set()
    widget.export_dataset(str(tmp_path / "all"))
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    assert sorted(p.stem for p in (tmp_path / "all").glob("*/masks/*.png")) == ["img", "second"]

    viewer.layers.clear()
    viewer.open(str(tmp_path / "all"), plugin="napari-sclip")
    viewer.layers.selection = set()
    widget.export_dataset(str(tmp_path / "again"))
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    same_files_apart_from_timestamps(tmp_path / "all", tmp_path / "again")


def test_export_can_be_cancelled(widget, qtbot, tmp_path, monkeypatch):
    from napari_sclip.dataset import export as export_module

    _segmented(qtbot, widget, (40, 50))
    stack = np.stack([natural_image(30, 40)] * 6)
    widget.viewer.add_image(stack, name="stack", rgb=True)
    widget.viewer.add_labels(np.ones((6, 30, 40), np.uint8), name="stack labels")
    real = export_module.DatasetWriter.write

    def slow_write(self, sample):
        time.sleep(0.2)
        return real(self, sample)

    monkeypatch.setattr(export_module.DatasetWriter, "write", slow_write)
    widget.export_dataset(str(tmp_path / "ds"))
    qtbot.waitUntil(lambda: widget._progress_bar.value() > 0, timeout=30_000)
    widget._run_button.click()  # "Cancel"
    qtbot.waitUntil(lambda: not widget.running, timeout=30_000)
    assert widget._status.text().startswith("export cancelled after")
    written = sorted(p.stem for p in (tmp_path / "ds").glob("*/meta/*.json"))
    assert 0 < len(written) < 7
    indexed = [json.loads(line)["id"] for f in (tmp_path / "ds").glob("*/metadata.jsonl")
               for line in f.read_text().splitlines()]
    assert sorted(indexed) == written  # the index matches what was written
    assert widget._run_button.text() == "Segment"


def test_export_without_labels_says_so(widget):
    widget.viewer.add_image(natural_image(10, 10), name="img", rgb=True)
    widget.export_dataset("/nonexistent")
    assert "nothing to export" in widget._status.text()


def test_method_choice_fills_its_defaults_and_is_recorded(widget, qtbot):
    from napari_sclip.engine.methods import METHODS

    assert [widget._method_combo.itemData(i) for i in range(widget._method_combo.count())] == list(METHODS)
    widget.set_method("clearclip")
    assert (widget._short_side.value(), widget._window.value(), widget._stride.value()) == (448, 448, 224)
    assert widget._logit_scale.value() == 50.0 and not widget._pamr_box.isChecked()
    assert "Query-query" in widget._method_note.text()
    widget.set_method("naclip")
    assert widget._pamr_box.isChecked() and widget._window.value() == 224
    widget._window.setValue(112)  # the caller may override any default
    widget._stride.setValue(56)
    labels = _segmented(qtbot, widget, (60, 70))
    params = labels.metadata["napari_sclip"]["params"]
    assert (params["method"], params["pamr"], params["window"]) == ("naclip", True, 112)
    engine = widget._get_segmenter().segment(
        widget.viewer.layers["img"].data, ["cat", "dog"], method="naclip", window=112, stride=56
    )
    np.testing.assert_array_equal(labels.data, engine.labels)


def test_vocabulary_edit_on_a_stack_reuses_each_slices_features(widget, qtbot):
    from napari_sclip import Segmenter
    from napari_sclip.engine.feature_cache import FEATURE_CACHE

    viewer = widget.viewer
    stack = np.stack([np.roll(natural_image(48, 64), 9 * z, axis=1) for z in range(3)])
    viewer.add_image(stack, name="stack", rgb=True)
    widget._slice_combo.setCurrentText("all slices")
    widget.set_vocabulary(["cat", "dog"])
    _run(qtbot, widget)
    assert "reused" not in widget._status.text() and len(FEATURE_CACHE) == 3  # a key per slice

    widget.set_vocabulary(["cat", "dog", "bird"])
    _run(qtbot, widget)
    assert "image features reused" in widget._status.text()
    labels = viewer.layers["stack labels"].data
    fresh = Segmenter(feature_cache=False)
    for z in range(3):
        np.testing.assert_array_equal(labels[z], fresh.segment(stack[z], ["cat", "dog", "bird"]).labels)

    viewer.layers["stack"].data = stack[:, ::-1].copy()  # the pixels changed: nothing stale is reused
    _run(qtbot, widget)
    assert "reused" not in widget._status.text()


def test_reviewed_status_is_exported_reopened_and_reset_by_a_rerun(widget, qtbot, tmp_path):
    viewer = widget.viewer
    assert not widget._reviewed_box.isEnabled()  # no labels yet
    labels = _segmented(qtbot, widget, (40, 50))
    assert widget._reviewed_box.isEnabled() and not widget._reviewed_box.isChecked()
    widget._reviewed_box.setChecked(True)
    widget.export_dataset(str(tmp_path / "ds"))
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    meta = json.loads(next((tmp_path / "ds").glob("*/meta/img.json")).read_text())
    assert meta["review_status"] == "reviewed"
    rows = [json.loads(line) for f in (tmp_path / "ds").glob("*/metadata.jsonl") for line in f.read_text().splitlines()]
    assert rows[0]["review_status"] == "reviewed"

    viewer.layers.clear()
    viewer.open(str(tmp_path / "ds"), plugin="napari-sclip")
    widget._image_combo.setCurrentText("img")
    assert widget._reviewed_box.isChecked()  # the status came back with the dataset
    _run(qtbot, widget)
    assert not widget._reviewed_box.isChecked()  # new model labels need a new review
    assert labels is not viewer.layers["img labels"]
