"""The review panel's Evaluate section in a real napari window (Xvfb), clicked as a person does,
with the tiny random model: scores of the reviewed samples, the chart, and the best setting sent
to the SCLIP widget."""

from __future__ import annotations

import numpy as np
import pytest
from qtpy.QtWidgets import QDialog, QLabel, QPlainTextEdit
from test_review import make_dataset
from test_widget import click, review_panel, widget  # noqa: F401 - the fixture


def _review(widget, qtbot, tmp_path, reviewed: int):  # noqa: F811 - the fixture's name
    make_dataset(tmp_path / "ds", 4, 40, 48)
    widget.open_dataset(str(tmp_path / "ds"))
    panel = review_panel(widget, qtbot)
    for _ in range(reviewed):
        panel.session.mark_reviewed()
        panel.session.next()
    return panel


@pytest.mark.gui
def test_evaluate_scores_the_reviewed_samples_and_the_widget_takes_the_best(widget, qtbot, tmp_path,  # noqa: F811
                                                                             monkeypatch):
    from napari_sclip.plugin import engine_loader

    panel = _review(widget, qtbot, tmp_path, 2)
    section = panel.evaluate
    click(qtbot, section.unfold)
    click(qtbot, section._methods["maskclip"])
    section._thresholds.setText("0, 0.6")
    click(qtbot, section._run)
    assert section._run.text() == "Cancel"
    qtbot.waitUntil(lambda: section.evaluation is not None and not section.running, timeout=120_000)
    report = section.evaluation.report
    assert report.images == 2 and len(report.results) == 4  # two methods, two thresholds
    assert section._status.text().startswith("Best on the 2 reviewed samples: ")
    best, _ = report.best
    click(qtbot, section._use)
    options = widget.options()
    assert (options.method, options.prob_threshold) == (best.method, best.prob_threshold)
    click(qtbot, section._results)
    dialog, = [child for child in section.findChildren(QDialog) if child.isVisible()]
    table, = dialog.findChildren(QPlainTextEdit)
    rows = table.toPlainText().splitlines()
    assert rows[0].endswith(": 2 samples") and sum(row.startswith("*") for row in rows[1:6]) == 1
    assert rows[7] == f"best: {best.describe()}" and "mIoU" in rows[-3]
    picture, = dialog.findChildren(QLabel)
    assert picture.pixmap().width() > 300 and picture.pixmap().height() > 300
    dialog.close()
    loaded = section.evaluation.segmenter
    made = []
    real = engine_loader.make_segmenter
    monkeypatch.setattr(engine_loader, "make_segmenter", lambda *args: made.append(args) or real(*args))
    click(qtbot, section._run)  # again: the model is not loaded twice
    qtbot.waitUntil(lambda: not section.running, timeout=120_000)
    assert section.evaluation.segmenter is loaded and made == []
    panel.close_review()


@pytest.mark.gui
def test_evaluating_before_anything_is_reviewed_says_so_in_one_line(widget, qtbot, tmp_path):  # noqa: F811
    panel = _review(widget, qtbot, tmp_path, 0)
    section = panel.evaluate
    click(qtbot, section.unfold)
    click(qtbot, section._run)
    qtbot.waitUntil(lambda: not section.running, timeout=60_000)
    assert section._status.text() == (f"error: {tmp_path / 'ds'} has no reviewed samples to score against: mark "
                                      "samples reviewed in napari's review panel (Shift+R marks one; napari-sclip "
                                      f"review {tmp_path / 'ds'} opens it)")
    section._thresholds.setText("0, 2")
    click(qtbot, section._run)
    assert not section.running and section._status.text() == "error: give thresholds between 0 and 1, separated by commas"
    for box in section._methods.values():
        box.setChecked(False)
    click(qtbot, section._run)
    assert section._status.text() == "error: check at least one method"
    panel.close_review()


@pytest.mark.gui
def test_a_sample_just_marked_counts_and_an_evaluation_can_be_cancelled(widget, qtbot, tmp_path, monkeypatch):  # noqa: F811
    import time

    from napari_sclip.evaluate import run

    panel = _review(widget, qtbot, tmp_path, 1)
    panel.session.mark_reviewed()  # the sample shown: saved before scoring
    section = panel.evaluate
    click(qtbot, section.unfold)
    section._thresholds.setText("0")
    click(qtbot, section._run)
    qtbot.waitUntil(lambda: section.evaluation is not None and not section.running, timeout=120_000)
    assert section.evaluation.report.images == 2
    real = run.image_areas
    monkeypatch.setattr(run, "image_areas", lambda *args: (time.sleep(1), real(*args))[1])
    section.evaluation = None
    click(qtbot, section._run)
    qtbot.waitUntil(lambda: "scoring" in section._status.text(), timeout=60_000)
    click(qtbot, section._run)  # Cancel
    qtbot.waitUntil(lambda: not section.running, timeout=60_000)
    assert section._status.text() == "cancelled" and section.evaluation is None
    assert np.isfinite(panel.session.counts().reviewed)
    panel.close_review()


@pytest.mark.gui
def test_evaluate_uses_the_model_picked_in_the_widget(widget, qtbot, tmp_path):  # noqa: F811
    """A preset picked in the SCLIP widget brings its own weights: the evaluation asks for none."""
    panel = _review(widget, qtbot, tmp_path, 1)
    picker = widget._model_picker
    picker.setCurrentIndex(picker.findText("BioCLIP (ViT-B/16), 598 MB"))
    request = panel.evaluate.request()
    assert (request.model, request.pretrained) == ("bioclip", None)
    picker.setCurrentIndex(picker.findText("OpenAI ViT-L/14, 1.7 GB"))
    assert (panel.evaluate.request().model, panel.evaluate.request().pretrained) == ("openai-l14", None)
    panel.close_review()
