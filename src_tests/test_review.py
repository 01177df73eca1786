"""Reviewing a dataset in napari (Xvfb): one sample at a time, edits saved as the reviewer moves
on, review marks that persist, and a queue ordered from the index alone.

Datasets are written by :class:`DatasetWriter` with known labels and confidence (no model), so
that every figure can be checked against the arrays that went in.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from qtpy.QtCore import Qt

from napari_sclip.classes import ClassRegistry
from napari_sclip.dataset.paths import DatasetError
from napari_sclip.dataset.reader import read_sample, sample_ids
from napari_sclip.dataset.review import QueueOptions
from napari_sclip.dataset.writer import DatasetWriter, Sample

from conftest import natural_image

CLASSES = {1: ("grass",), 2: ("sky", "clouds"), 3: ("person",)}


def make_dataset(root, count: int, height: int = 48, width: int = 64) -> dict[str, dict]:
    """``count`` samples ``s000``...: sample k has mean confidence about (k + 1) / (count + 1) and
    classes 1 and 2 (every third sample also 3).  Returns what went in, by id."""
    registry = ClassRegistry(dict(CLASSES), [1, 2, 3])
    base = natural_image(height, width)
    made = {}
    with DatasetWriter(root, registry, {"train": 1.0}) as writer:
        for k in range(count):
            labels = np.ones((height, width), np.uint8)
            labels[: height // 2] = 2
            if k % 3 == 0:
                labels[-6:, -6:] = 3
            confidence = np.full((height, width), (k + 1) / (count + 1), np.float32)
            image = np.roll(base, k, axis=1)
            image_id = writer.write(Sample(f"s{k:03d}", labels, image=image, confidence=confidence))
            made[image_id] = {"labels": labels, "confidence": confidence, "image": image}
    return made


@pytest.fixture
def viewer(display, make_napari_viewer):
    return make_napari_viewer(show=True)


def test_the_queue_opens_on_the_first_unreviewed_sample_and_moves_with_keys(viewer, qtbot, tmp_path):
    from napari_sclip.plugin.review import open_review

    made = make_dataset(tmp_path / "ds", 5)
    review = open_review(viewer, tmp_path / "ds")
    try:
        assert len(review) == 5 and review.current_id == "s000"
        assert [layer.name for layer in viewer.layers] == ["s000", "s000 confidence", "s000 labels"]
        np.testing.assert_array_equal(viewer.layers["s000 labels"].data, made["s000"]["labels"])
        canvas = viewer.window._qt_viewer.canvas.native
        qtbot.keyClick(canvas, Qt.Key.Key_PageDown)
        assert review.current_id == "s001"
        assert [layer.name for layer in viewer.layers] == ["s001", "s001 confidence", "s001 labels"]
        np.testing.assert_array_equal(viewer.layers["s001"].data, made["s001"]["image"])
        qtbot.keyClick(canvas, Qt.Key.Key_PageUp)
        assert review.current_id == "s000"
        review.goto("s004")
        assert review.position == 4
        review.next()  # the last one: stays
        assert review.current_id == "s004"
    finally:
        review.close()


def test_edits_are_saved_on_moving_on_and_undo_stays_within_a_sample(viewer, qtbot, tmp_path):
    from napari_sclip.plugin.review import open_review

    made = make_dataset(tmp_path / "ds", 3)
    review = open_review(viewer, tmp_path / "ds")
    labels = viewer.layers["s000 labels"]
    labels.selected_label = 3
    labels.paint((5, 5), 3, refresh=True)  # napari's brush, with its undo history
    painted = np.asarray(labels.data).copy()
    assert review.unsaved
    review.next()
    assert not review.unsaved
    labels = viewer.layers["s001 labels"]
    labels.undo()  # nothing of s000's strokes to undo here
    np.testing.assert_array_equal(labels.data, made["s001"]["labels"])
    assert not review.unsaved
    labels.paint((20, 20), 3, refresh=True)
    labels.undo()  # a stroke undone is no edit
    assert not review.unsaved
    review.next()
    assert review.status("s001") == "unreviewed"
    assert review.status("s000") == "edited"
    review.close()

    from napari_sclip.dataset.format import read_manifest

    root = tmp_path / "ds"
    _, _, train_ids = read_manifest(root)
    stored = read_sample(root, "train", "s000", train_ids)
    np.testing.assert_array_equal(stored.labels, painted)
    changed = painted != made["s000"]["labels"]
    assert changed.sum() > 20
    np.testing.assert_array_equal(stored.edited, changed)
    assert stored.meta["review_status"] == "edited"
    assert stored.meta["edits"]["painted_pixels"] == changed.sum()
    np.testing.assert_allclose(stored.confidence, np.round(made["s000"]["confidence"] * 255) / 255)


def test_reviewed_is_one_key_and_survives_reopening_with_counts(viewer, qtbot, tmp_path):
    from napari_sclip.plugin.review import open_review

    make_dataset(tmp_path / "ds", 4)
    review = open_review(viewer, tmp_path / "ds")
    canvas = viewer.window._qt_viewer.canvas.native
    qtbot.keyClick(canvas, Qt.Key.Key_R, Qt.KeyboardModifier.ShiftModifier)
    assert review.status("s000") == "reviewed"
    qtbot.keyClick(canvas, Qt.Key.Key_PageDown)
    qtbot.keyClick(canvas, Qt.Key.Key_R, Qt.KeyboardModifier.ShiftModifier)
    counts = review.counts()
    assert (counts.reviewed, counts.edited, counts.unreviewed, counts.total) == (2, 0, 2, 4)
    review.close()

    again = open_review(viewer, tmp_path / "ds")
    try:
        assert again.current_id == "s002"  # where the review stopped: the first not reviewed
        assert again.ids[:2] == ["s002", "s003"]
        assert again.counts().reviewed == 2
    finally:
        again.close()
    rows = [json.loads(line) for line in (tmp_path / "ds" / "train" / "metadata.jsonl").read_text().splitlines()]
    assert {row["id"]: row["review_status"] for row in rows} == {
        "s000": "reviewed", "s001": "reviewed", "s002": "unreviewed", "s003": "unreviewed"}


def test_the_queue_orders_and_filters_by_confidence_class_and_status(viewer, tmp_path):
    from napari_sclip.plugin.review import open_review

    make_dataset(tmp_path / "ds", 6)
    review = open_review(viewer, tmp_path / "ds", QueueOptions(order="least confident first"))
    try:
        assert review.ids == [f"s{k:03d}" for k in range(6)]
        review.set_options(QueueOptions(order="most uncertain pixels first", threshold=0.5))
        # confidence (k + 1) / 7: samples 0, 1, 2 are below 0.5 everywhere, the others nowhere
        assert review.ids[:3] == ["s000", "s001", "s002"]
        person = _train_id(tmp_path / "ds", "person")
        review.set_options(QueueOptions(class_id=person))
        assert review.ids == ["s000", "s003"]
        review.mark_reviewed()
        review.set_options(QueueOptions(status="not reviewed"))
        assert review.current_id not in review.ids or review.status(review.current_id) != "reviewed"
        assert "s000" not in review.ids and len(review) == 5
    finally:
        review.close()


def _train_id(root, name: str) -> int:
    from napari_sclip.dataset.format import read_manifest

    _, registry, train_ids = read_manifest(root)
    return next(train_ids[uid] for uid, names in registry.names.items() if names[0] == name)


def test_a_dataset_under_review_is_held(viewer, tmp_path):
    from napari_sclip.dataset.paths import DatasetError
    from napari_sclip.plugin.review import open_review

    make_dataset(tmp_path / "ds", 2)
    review = open_review(viewer, tmp_path / "ds")
    try:
        with pytest.raises(DatasetError, match="in use by a review in napari.*close that review"):
            DatasetWriter(tmp_path / "ds")
    finally:
        review.close()
    DatasetWriter(tmp_path / "ds").close()
    assert len(sample_ids(tmp_path / "ds")) == 2


def opened(qtbot, panel):
    """``panel`` once its dataset is open (the index is read in a worker)."""
    qtbot.waitUntil(lambda: panel.session is not None and not panel.session.opening, timeout=20_000)
    return panel


def _panel(viewer, qtbot):
    from napari_sclip.plugin.review_panel import PANEL_NAME

    return opened(qtbot, viewer.window.dock_widgets[PANEL_NAME])


def test_file_open_of_the_manifest_docks_the_review_panel_and_its_buttons_work(viewer, qtbot, tmp_path):
    from test_widget import choose, click

    made = make_dataset(tmp_path / "ds", 12)
    assert viewer.open(str(tmp_path / "ds" / "dataset.json"), plugin=None) == []
    panel = _panel(viewer, qtbot)
    assert [layer.name for layer in viewer.layers] == ["s000", "s000 confidence", "s000 labels"]
    assert any(name.startswith("SCLIP segmentation") for name in viewer.window.dock_widgets)  # to segment again
    assert panel._counts.text() == "0 reviewed · 0 edited · 12 unreviewed of 12"
    click(qtbot, panel._next)
    assert panel.session.current_id == "s001" and panel._message.text() == "s001: 2 of 12 in the queue"
    click(qtbot, panel._reviewed)
    assert panel._counts.text() == "1 reviewed · 0 edited · 11 unreviewed of 12" and panel._progress.value() == 1
    viewer.layers["s001 labels"].paint((3, 3), 3, refresh=True)
    click(qtbot, panel._next)  # saved on the way: its row says so
    assert panel._model.stringList()[:3] == ["s000  (unreviewed)", "s001  (reviewed)", "s002  (unreviewed)"]
    choose(panel._order, "least confident first")
    choose(panel._status_filter, "not reviewed")
    assert panel.session.ids[0] == "s000" and "s001" not in panel.session.ids
    choose(panel._class, "person")
    assert panel.session.ids == ["s000", "s003", "s006", "s009"]
    row = panel._list.visualRect(panel._model.index(2)).center()
    qtbot.mouseClick(panel._list.viewport(), Qt.MouseButton.LeftButton, pos=row)
    assert panel.session.current_id == "s006"
    np.testing.assert_array_equal(viewer.layers["s006 labels"].data, made["s006"]["labels"])
    click(qtbot, panel._close)
    assert "SCLIP review" not in viewer.window.dock_widgets
    DatasetWriter(tmp_path / "ds").close()  # given up


def test_closing_the_window_saves_the_sample_and_gives_the_dataset_up(display, make_napari_viewer, qtbot, tmp_path):
    from napari_sclip.plugin.review_panel import show_review

    viewer = make_napari_viewer(show=True)
    make_dataset(tmp_path / "ds", 2)
    opened(qtbot, show_review(viewer, tmp_path / "ds"))
    viewer.layers["s000 labels"].paint((4, 4), 3, refresh=True)
    viewer.close()
    DatasetWriter(tmp_path / "ds").close()
    assert json.loads((tmp_path / "ds" / "train" / "meta" / "s000.json").read_text())["review_status"] == "edited"


def test_a_second_dataset_replaces_the_first_review(viewer, qtbot, tmp_path):
    from napari_sclip.plugin.review_panel import show_review

    make_dataset(tmp_path / "one", 2)
    make_dataset(tmp_path / "two", 3)
    opened(qtbot, show_review(viewer, tmp_path / "one"))
    panel = opened(qtbot, show_review(viewer, tmp_path / "two"))
    assert len(panel.session) == 3
    DatasetWriter(tmp_path / "one").close()  # the first was given up
    panel.close_review()


def test_the_review_command_says_what_is_wrong_in_one_line(tmp_path):
    import subprocess
    import sys

    (tmp_path / "plain").mkdir()
    make_dataset(tmp_path / "ds", 1)
    for path, message in ((tmp_path / "plain", "is not a napari-sclip dataset"), (tmp_path / "typo", "does not exist"),
                          (tmp_path / "ds" / "train", f"it is inside the dataset {tmp_path / 'ds'}: open that")):
        result = subprocess.run([sys.executable, "-m", "napari_sclip.cli", "review", str(path)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode != 0
        assert result.stderr.strip().count("\n") == 0 and message in result.stderr, result.stderr


def test_a_damaged_sample_is_one_line_and_the_review_stays_where_it_was(viewer, qtbot, tmp_path):
    from test_widget import click

    from napari_sclip.plugin.review_panel import show_review

    make_dataset(tmp_path / "ds", 3)
    (tmp_path / "ds" / "train" / "masks" / "s001.png").write_bytes(b"not a png")
    panel = opened(qtbot, show_review(viewer, tmp_path / "ds"))
    viewer.layers["s000 labels"].paint((4, 4), 3, refresh=True)
    click(qtbot, panel._next)
    assert panel._message.text().startswith("error: cannot read") and "s001.png" in panel._message.text()
    assert panel.session.current_id == "s000" and "s000 labels" in viewer.layers
    assert panel.session.status("s000") == "edited"  # saved before the move was refused
    panel.session.goto("s002")  # the rest of the queue still opens
    assert panel.session.current_id == "s002"
    panel.close_review()


# -- correction tools ---------------------------------------------------------------------------------


def make_varied(root, height: int = 40, width: int = 60) -> dict:
    """One sample: sky above grass, a person's square in the grass, confidence rising left to right."""
    registry = ClassRegistry(dict(CLASSES), [1, 2, 3])
    labels = np.ones((height, width), np.uint8)
    labels[: height // 2] = 2
    labels[25:35, 10:20] = 3
    confidence = np.tile(np.linspace(0, 1, width, dtype=np.float32), (height, 1))
    with DatasetWriter(root, registry, {"train": 1.0}) as writer:
        writer.write(Sample("v", labels, image=natural_image(height, width), confidence=confidence))
    return {"labels": labels, "confidence": np.round(confidence * 255) / 255}


def canvas_point(viewer, data_point):
    """The canvas pixel that shows ``data_point`` of the (unscaled, 2D) layers."""
    from qtpy.QtCore import QPoint

    canvas = viewer.window._qt_viewer.canvas
    x, y = canvas.view.scene.transform.map([data_point[1], data_point[0]])[:2]  # vispy: scene -> canvas
    ratio = canvas.native.devicePixelRatioF()
    return QPoint(int(round(x / ratio)), int(round(y / ratio)))


def test_number_keys_pick_the_class_to_paint_and_ctrl_number_sets_the_region_under_the_cursor(viewer, qtbot, tmp_path):
    from napari_sclip.plugin.review_panel import show_review

    made = make_varied(tmp_path / "ds")
    panel = opened(qtbot, show_review(viewer, tmp_path / "ds"))
    labels = viewer.layers["v labels"]
    canvas = viewer.window._qt_viewer.canvas.native
    qtbot.keyClick(canvas, Qt.Key.Key_3)
    assert labels.selected_label == 3 and labels.mode == "paint"  # not napari's "3": polygon mode
    qtbot.keyClick(canvas, Qt.Key.Key_0)
    assert labels.selected_label == 0
    rows = [panel._classes.item(k).text() for k in range(panel._classes.count())]
    assert rows == ["0: ignore  (0 px)", "1: grass  (1100 px)", "2: sky  (1200 px)", "3: person  (100 px)"]

    qtbot.wait(50)  # the window's layout with the panel, then the view fits the image
    qtbot.mouseMove(canvas, canvas_point(viewer, (30, 15)))  # over the person's square
    qtbot.waitUntil(lambda: tuple(np.round(labels.world_to_data(viewer.cursor.position))[-2:]) == (30, 15), timeout=3000)
    qtbot.keyClick(canvas, Qt.Key.Key_1, Qt.KeyboardModifier.ControlModifier)  # the square becomes grass
    expected = made["labels"].copy()
    expected[25:35, 10:20] = 1
    np.testing.assert_array_equal(labels.data, expected)
    qtbot.waitUntil(lambda: panel._classes.item(3).text() == "3: person  (0 px)", timeout=3000)
    qtbot.keyClick(canvas, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    np.testing.assert_array_equal(labels.data, made["labels"])
    panel.close_review()


def test_the_region_tool_asks_for_the_class_of_a_clicked_region(viewer, qtbot, tmp_path):
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication
    from test_widget import click

    from napari_sclip.plugin.review_panel import show_review

    made = make_varied(tmp_path / "ds")
    panel = opened(qtbot, show_review(viewer, tmp_path / "ds"))
    labels = viewer.layers["v labels"]
    click(qtbot, panel._region)
    assert panel.session.region_tool and labels.mode == "pan_zoom"
    asked = []

    def press_zero():  # the menu's "&0 ignore", by its key
        menu = QApplication.activePopupWidget()
        asked.append([action.text() for action in menu.actions()])
        qtbot.keyClick(menu, Qt.Key.Key_0)

    QTimer.singleShot(300, press_zero)
    qtbot.mouseClick(viewer.window._qt_viewer.canvas.native, Qt.MouseButton.LeftButton,
                     pos=canvas_point(viewer, (5, 30)))  # the sky
    assert asked == [["&0 ignore", "&1 grass", "&2 sky", "&3 person"]]
    expected = made["labels"].copy()
    expected[:20] = 0
    np.testing.assert_array_equal(labels.data, expected)
    assert labels.colormap.color_dict[0][3] > 0  # ignore is shown, not transparent
    panel.session.next()  # the only sample: stays, nothing to save yet
    click(qtbot, panel._save)
    meta = json.loads((tmp_path / "ds" / "train" / "meta" / "v.json").read_text())
    assert meta["edits"] == {"painted_pixels": 0, "ignored_pixels": 20 * 60}
    panel.close_review()


def test_accept_by_confidence_is_previewed_then_applied_as_one_undo_step(viewer, qtbot, tmp_path):
    from test_widget import click

    from napari_sclip.plugin.review_panel import show_review

    made = make_varied(tmp_path / "ds")
    panel = opened(qtbot, show_review(viewer, tmp_path / "ds"))
    labels = viewer.layers["v labels"]
    panel._accept_threshold.setValue(0.25)
    click(qtbot, panel._preview)
    below = made["confidence"] < 0.25
    preview = viewer.layers["v: set to ignore below 0.25"]
    np.testing.assert_array_equal(preview.data.astype(bool), below)
    assert panel._message.text().startswith(f"{below.sum()} labelled pixels are below 0.25")
    np.testing.assert_array_equal(labels.data, made["labels"])  # a preview changes nothing
    click(qtbot, panel._accept)
    np.testing.assert_array_equal(labels.data, np.where(below, 0, made["labels"]))
    assert "v: set to ignore below 0.25" not in viewer.layers
    labels.undo()
    np.testing.assert_array_equal(labels.data, made["labels"])
    labels.redo()
    click(qtbot, panel._save)
    meta = json.loads((tmp_path / "ds" / "train" / "meta" / "v.json").read_text())
    assert meta["edits"]["ignored_pixels"] == below.sum() and meta["review_status"] == "edited"
    panel.close_review()


def test_a_2000_sample_dataset_reviewed_closed_and_reopened(display, make_napari_viewer, qtbot, tmp_path):
    """The issue's walk: open 2,000 samples, move on with keys (autosaved), paint, mark, jump far
    down the list, close the window; reopen: edits, marks and counts are there."""
    from napari_sclip.dataset.format import read_manifest

    make_dataset(tmp_path / "ds", 2000, 16, 16)
    viewer = make_napari_viewer(show=True)
    viewer.open(str(tmp_path / "ds" / "dataset.json"), plugin=None)
    panel = _panel(viewer, qtbot)
    assert len(panel.session) == 2000 and panel._model.rowCount() == 2000
    canvas = viewer.window._qt_viewer.canvas.native
    for _ in range(3):
        viewer.layers[-1].paint((8, 8), 3, refresh=True)
        qtbot.keyClick(canvas, Qt.Key.Key_R, Qt.KeyboardModifier.ShiftModifier)
        qtbot.keyClick(canvas, Qt.Key.Key_PageDown)
    viewer.layers[-1].paint((2, 2), 3, refresh=True)  # s003: edited, saved on closing
    far = panel._model.index(1750)
    panel._list.scrollTo(far)
    qtbot.mouseClick(panel._list.viewport(), Qt.MouseButton.LeftButton, pos=panel._list.visualRect(far).center())
    assert panel.session.current_id == panel.session.ids[1750] and panel.session.position == 1750
    counts = panel.session.counts()
    assert (counts.reviewed, counts.edited, counts.unreviewed) == (3, 1, 1996)
    viewer.close()

    again = make_napari_viewer(show=True)
    again.open(str(tmp_path / "ds" / "dataset.json"), plugin=None)
    panel = _panel(again, qtbot)
    assert panel.session.current_id == "s004"  # the first untouched: where the walk stopped (s003 is edited)
    assert panel._counts.text() == "3 reviewed · 1 edited · 1996 unreviewed of 2000"
    _, _, train_ids = read_manifest(tmp_path / "ds")
    for image_id, status in (("s000", "reviewed"), ("s002", "reviewed"), ("s003", "edited")):
        stored = read_sample(tmp_path / "ds", "train", image_id, train_ids)
        assert stored.meta["review_status"] == status and stored.edited.any() and (stored.labels == 3).any()
    panel.close_review()


def test_samples_with_the_same_pixels_are_saved_each_under_its_own_id(viewer, tmp_path):
    """Two samples made from the same pixels (no file): saving one never writes over the other."""
    from napari_sclip.dataset.format import read_manifest
    from napari_sclip.plugin.review import open_review

    registry = ClassRegistry(dict(CLASSES), [1, 2, 3])
    image = natural_image(30, 40)
    with DatasetWriter(tmp_path / "ds", registry, {"train": 1.0}) as writer:
        for name in ("a", "b"):
            writer.write(Sample(name, np.ones((30, 40), np.uint8), image=image))
    review = open_review(viewer, tmp_path / "ds")
    viewer.layers["a labels"].data_setitem((np.array([1]), np.array([1])), 2)
    review.mark_reviewed()
    review.next()
    viewer.layers["b labels"].data_setitem((np.array([5]), np.array([5])), 3)
    review.next()
    review.close()
    _, _, train_ids = read_manifest(tmp_path / "ds")
    a = read_sample(tmp_path / "ds", "train", "a", train_ids)
    b = read_sample(tmp_path / "ds", "train", "b", train_ids)
    assert a.labels[1, 1] == 2 and a.labels[5, 5] == 1 and a.meta["review_status"] == "reviewed"
    assert b.labels[5, 5] == 3 and b.labels[1, 1] == 1 and b.meta["review_status"] == "edited"
    assert sorted(i for _, i in sample_ids(tmp_path / "ds")) == ["a", "b"]


def test_a_hand_made_sample_with_a_tiff_image_and_no_source_is_saved(viewer, tmp_path):
    """check_meta allows any image extension and no source: the review still saves it (as PNG)."""
    import tifffile

    from napari_sclip.plugin.review import open_review

    make_dataset(tmp_path / "ds", 1)
    meta_path = tmp_path / "ds" / "train" / "meta" / "s000.json"
    meta = json.loads(meta_path.read_text())
    png = tmp_path / "ds" / "train" / meta["image"]
    from PIL import Image

    tifffile.imwrite(png.with_suffix(".tif"), np.asarray(Image.open(png)))
    png.unlink()
    meta["image"] = "images/s000.tif"
    del meta["source"]
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "ds" / ".napari-sclip-journal.jsonl").unlink()
    review = open_review(viewer, tmp_path / "ds")
    viewer.layers["s000 labels"].data_setitem((np.array([1]), np.array([1])), 3)
    assert review.save()
    review.close()
    saved = json.loads(meta_path.read_text())
    assert saved["image"] == "images/s000.png" and saved["review_status"] == "edited"
    assert sorted(p.name for p in (tmp_path / "ds" / "train" / "images").iterdir()) == ["s000.png"]
    assert sorted(i for _, i in sample_ids(tmp_path / "ds")) == ["s000"]


def test_a_save_that_fails_keeps_the_edits_the_sample_and_the_review_open(viewer, qtbot, tmp_path, monkeypatch):
    """A full disk: moving on, marking and Close review each say so in one line and keep
    everything; once there is room again, the edits are saved."""
    from test_widget import click

    from napari_sclip.dataset.writer import DatasetWriter as Writer
    from napari_sclip.plugin.review_panel import show_review

    make_dataset(tmp_path / "ds", 2)
    panel = opened(qtbot, show_review(viewer, tmp_path / "ds"))
    real = Writer.rewrite

    def full(self, image_id, sample):
        raise DatasetError(f"{self.root}: no space left on device")

    monkeypatch.setattr(Writer, "rewrite", full)
    viewer.layers["s000 labels"].paint((4, 4), 3, refresh=True)
    click(qtbot, panel._next)
    assert panel.session.current_id == "s000" and panel._message.text().endswith("no space left on device")
    click(qtbot, panel._reviewed)
    assert not panel._reviewed.isChecked() and panel.session.status("s000") == "unreviewed"
    click(qtbot, panel._close)
    assert panel.session is not None and "SCLIP review" in viewer.window.dock_widgets
    assert panel._message.text().startswith("not closed, the edits are not saved")
    with pytest.raises(DatasetError, match="still open"):  # another dataset waits for this one
        show_review(viewer, tmp_path / "ds")
    monkeypatch.setattr(Writer, "rewrite", real)
    click(qtbot, panel._close)
    assert "SCLIP review" not in viewer.window.dock_widgets
    stored = json.loads((tmp_path / "ds" / "train" / "meta" / "s000.json").read_text())
    assert stored["review_status"] == "edited"  # the strokes, not the mark that failed


def test_an_unreadable_first_image_is_one_line_and_the_rest_opens(viewer, qtbot, tmp_path):
    from napari_sclip.plugin.review_panel import show_review

    make_dataset(tmp_path / "ds", 2)
    (tmp_path / "ds" / "train" / "images" / "s000.png").write_bytes(b"")
    panel = opened(qtbot, show_review(viewer, tmp_path / "ds"))
    assert panel._message.text().startswith("error: ") and "s000.png" in panel._message.text()
    assert panel.session.current_id is None and panel.session.position == -1
    panel.session.goto("s001")
    assert panel.session.current_id == "s001"
    panel.close_review()


def test_an_empty_filter_leaves_the_sample_shown_and_the_keys_harmless(viewer, qtbot, tmp_path):
    from test_widget import choose

    from napari_sclip.plugin.review_panel import show_review

    make_dataset(tmp_path / "ds", 3)
    panel = opened(qtbot, show_review(viewer, tmp_path / "ds"))
    choose(panel._status_filter, "reviewed")  # none yet
    assert panel.session.ids == [] and panel.session.position == -1 and panel.session.current_id == "s000"
    canvas = viewer.window._qt_viewer.canvas.native
    qtbot.keyClick(canvas, Qt.Key.Key_PageUp)
    qtbot.keyClick(canvas, Qt.Key.Key_PageDown)
    assert panel.session.current_id == "s000"
    panel.close_review()


def test_opening_the_same_dataset_again_while_it_opens_waits_for_the_first(viewer, qtbot, tmp_path, monkeypatch):
    import time

    from napari_sclip.plugin import review
    from napari_sclip.plugin.review_panel import show_review

    make_dataset(tmp_path / "ds", 2)
    real = review.hold_dataset
    monkeypatch.setattr(review, "hold_dataset", lambda root: (time.sleep(0.5), real(root))[1])
    first = show_review(viewer, tmp_path / "ds")  # still opening when the second comes
    assert first._message.text() == f"reading the index of 2 samples in {tmp_path / 'ds'}…"
    panel = opened(qtbot, show_review(viewer, tmp_path / "ds"))
    assert panel.session.current_id == "s000"
    panel.close_review()


def test_opening_a_dataset_twice_or_three_times_at_once_opens_the_last(viewer, qtbot, tmp_path):
    from napari_sclip.plugin.review_panel import show_review

    make_dataset(tmp_path / "ds", 2)
    show_review(viewer, tmp_path / "ds")
    show_review(viewer, tmp_path / "ds")
    panel = opened(qtbot, show_review(viewer, tmp_path / "ds"))
    assert panel.session.current_id == "s000" and panel._message.text() == "s000: 1 of 2 in the queue"
    assert [layer.name for layer in viewer.layers] == ["s000", "s000 confidence", "s000 labels"]
    panel.close_review()
    closed = ["s000 (review closed)", "s000 (review closed) confidence", "s000 (review closed) labels"]
    assert [layer.name for layer in viewer.layers] == closed  # kept, out of the way of the next review
    panel = opened(qtbot, show_review(viewer, tmp_path / "ds"))
    assert [layer.name for layer in viewer.layers] == [*closed, "s000", "s000 confidence", "s000 labels"]
    panel.close_review()


def test_no_move_while_a_run_writes_into_the_labels(viewer, qtbot, tmp_path):
    """The widget locks the labels layer while it writes a run in bands: moving on then would
    put the rest of the run into the next sample."""
    from test_widget import click

    from napari_sclip.plugin.layers import locked
    from napari_sclip.plugin.review_panel import show_review

    make_dataset(tmp_path / "ds", 2)
    panel = opened(qtbot, show_review(viewer, tmp_path / "ds"))
    labels = viewer.layers["s000 labels"]
    with locked(labels):
        click(qtbot, panel._next)
        assert panel.session.current_id == "s000"
        assert panel._message.text().startswith("error: the labels are being written by a Segment run")
    click(qtbot, panel._next)
    assert panel.session.current_id == "s001"
    panel.close_review()


def test_a_sample_whose_confidence_has_another_shape_is_one_line(viewer, tmp_path):
    from PIL import Image

    from napari_sclip.plugin.review import open_review

    make_dataset(tmp_path / "ds", 2)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "ds" / "train" / "confidence" / "s000.png")
    review = open_review(viewer, tmp_path / "ds")
    assert "confidence/s000.png does not match the shape of its mask" in review.open_error
    review.goto("s001")
    review.close()


def _mark_reviewed(root, ids) -> None:
    from napari_sclip.dataset.format import read_manifest

    _, _, train_ids = read_manifest(root)
    with DatasetWriter(root) as writer:
        for image_id in ids:
            stored = read_sample(root, "train", image_id, train_ids)
            writer.rewrite(image_id, Sample(image_id, stored.labels, image=stored.image, confidence=stored.confidence,
                                            meta={**stored.meta, "review_status": "reviewed"}))


def _held_back(monkeypatch):
    """Hold the panel's reading of the index until the returned event is set."""
    import threading

    from napari_sclip.plugin import review

    gate = threading.Event()
    real = review.hold_dataset
    monkeypatch.setattr(review, "hold_dataset", lambda root: (gate.wait(30), real(root))[1])
    return gate


def test_the_first_sample_shows_read_only_while_the_index_is_read(viewer, qtbot, tmp_path, monkeypatch):
    from test_widget import click

    from napari_sclip.plugin.review_panel import PANEL_NAME

    made = make_dataset(tmp_path / "ds", 6)
    _mark_reviewed(tmp_path / "ds", ["s000", "s001"])
    gate = _held_back(monkeypatch)
    assert viewer.open(str(tmp_path / "ds" / "dataset.json"), plugin=None) == []
    panel = viewer.window.dock_widgets[PANEL_NAME]
    qtbot.waitUntil(lambda: panel.session is not None, timeout=20_000)
    session = panel.session
    assert session.opening and session.current_id == "s002"  # where the review will open
    assert [layer.name for layer in viewer.layers] == ["s002", "s002 confidence", "s002 labels"]
    labels = viewer.layers["s002 labels"]
    np.testing.assert_array_equal(labels.data, made["s002"]["labels"])
    assert "s002: reading the index of 6 samples" in panel._message.text()
    assert not panel._next.isEnabled() and not panel._reviewed.isEnabled()
    assert not labels.editable  # read without holding the dataset: nothing to save it into yet
    canvas = viewer.window._qt_viewer.canvas.native
    qtbot.keyClick(canvas, Qt.Key.Key_PageDown)
    assert session.save() is False  # nothing to save
    for refused in (lambda: session.reassign_region((5, 5), 3), lambda: session.accept_by_confidence(1)):
        with pytest.raises(DatasetError, match="still opening"):
            refused()
    assert session.current_id == "s002" and not session.unsaved
    np.testing.assert_array_equal(labels.data, made["s002"]["labels"])
    gate.set()
    opened(qtbot, panel)
    assert panel.session is session and session.current_id == "s002" and session.position == 0
    assert viewer.layers["s002 labels"] is labels and labels.editable  # the same layer, editable now
    assert panel._counts.text() == "2 reviewed · 0 edited · 4 unreviewed of 6"
    assert session.reassign_region((5, 5), 3) > 0
    click(qtbot, panel._next)
    assert session.current_id == "s003" and session.status("s002") == "edited"
    panel.close_review()
    assert [layer.name for layer in viewer.layers] == ["s003 (review closed)", "s003 (review closed) confidence",
                                                       "s003 (review closed) labels"]


def test_a_first_look_rewritten_or_removed_while_the_index_is_read_is_not_kept(viewer, qtbot, tmp_path, monkeypatch):
    from napari_sclip.dataset.format import read_manifest
    from napari_sclip.plugin.review_panel import show_review

    root = tmp_path / "ds"
    make_dataset(root, 4)
    _, _, train_ids = read_manifest(root)
    gate = _held_back(monkeypatch)
    panel = show_review(viewer, root)
    qtbot.waitUntil(lambda: panel.session is not None, timeout=20_000)
    assert panel.session.current_id == "s000"
    stored = read_sample(root, "train", "s000", train_ids)
    changed = stored.labels.copy()
    changed[:8, :8] = stored.labels.max()  # same classes, same status: only the pixels differ
    with DatasetWriter(root) as other:  # another program, before the review takes the dataset
        other.rewrite("s000", Sample("s000", changed, image=stored.image, confidence=stored.confidence,
                                     meta=stored.meta))
    gate.set()
    opened(qtbot, panel)
    assert panel.session.current_id == "s000"
    np.testing.assert_array_equal(viewer.layers["s000 labels"].data, changed)  # what is on disk now
    panel.close_review()

    gate = _held_back(monkeypatch)
    panel = show_review(viewer, root)
    qtbot.waitUntil(lambda: panel.session is not None, timeout=20_000)
    assert panel.session.current_id == "s000"
    for path in root.glob("train/*/s000.*"):
        path.unlink()
    gate.set()
    opened(qtbot, panel)
    assert panel.session.current_id == "s001" and len(panel.session) == 3
    panel.close_review()
    DatasetWriter(root).close()  # given back


def test_a_dataset_another_viewer_reviews_shows_no_first_look(display, make_napari_viewer, qtbot, tmp_path):
    from napari_sclip.plugin.review_panel import show_review

    make_dataset(tmp_path / "ds", 2)
    first_viewer, second_viewer = make_napari_viewer(show=True), make_napari_viewer(show=True)
    first = opened(qtbot, show_review(first_viewer, tmp_path / "ds"))
    second = show_review(second_viewer, tmp_path / "ds")
    qtbot.waitUntil(lambda: second._message.text().startswith("error: "), timeout=60_000)
    assert "in use by a review in napari" in second._message.text() and len(second_viewer.layers) == 0
    second.close_review()
    first.close_review()


def test_a_first_look_that_is_not_where_the_review_opens_is_replaced(viewer, qtbot, tmp_path, monkeypatch):
    from napari_sclip.plugin import review
    from napari_sclip.plugin.review_panel import show_review

    make_dataset(tmp_path / "ds", 4)
    _mark_reviewed(tmp_path / "ds", ["s000"])
    monkeypatch.setattr(review, "first_to_review", lambda root: ("train", "s000"))  # a journal out of date
    gate = _held_back(monkeypatch)
    panel = show_review(viewer, tmp_path / "ds")
    qtbot.waitUntil(lambda: panel.session is not None, timeout=20_000)
    assert panel.session.current_id == "s000"
    gate.set()
    opened(qtbot, panel)
    assert panel.session.current_id == "s001" and panel.session.position == 0
    assert [layer.name for layer in viewer.layers] == ["s001", "s001 confidence", "s001 labels"]
    panel.close_review()


def test_no_first_look_while_another_program_holds_the_dataset(tmp_path):
    import dataclasses

    from napari_sclip.dataset.lock import LOCK_NAME, Owner
    from napari_sclip.plugin.review import first_look

    make_dataset(tmp_path / "ds", 2)
    look = first_look(tmp_path / "ds")
    assert look is not None and look.sample.id == "s000"
    other = dataclasses.replace(Owner.this_process(), pid=Owner.this_process().pid + 1)
    (tmp_path / "ds" / LOCK_NAME).write_bytes(other.to_bytes())
    assert first_look(tmp_path / "ds") is None  # it may be writing that very sample
