"""The review panel's Evaluate section (Qt): score methods and thresholds on the samples reviewed
so far, see the table and the chart, and set the best for the next Segment runs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from qtpy.QtCore import Qt
from qtpy.QtGui import QFontDatabase, QPixmap
from qtpy.QtWidgets import (
    QCheckBox,
    QDialog,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from napari_sclip.engine import config
from napari_sclip.engine.errors import SclipError
from napari_sclip.engine.methods import DEFAULT_METHOD, METHODS
from napari_sclip.engine.sources import normalise_choice
from napari_sclip.plugin.evaluation import Evaluation, EvaluationRequest, evaluation_job

_log = logging.getLogger(__name__)
#: The thresholds offered at first.
DEFAULT_THRESHOLDS = "0, 0.1, 0.2, 0.3, 0.4, 0.5"


class EvaluateSection(QWidget):
    """Folded until its title box is ticked.  ``widget()`` gives the SCLIP widget (its model and the target of
    "Use in the widget"), or ``None``; ``before()`` runs before scoring (the review saves the
    sample shown, so that a sample just marked counts)."""

    def __init__(self, root: Path, widget: Callable[[], object], before: Callable[[], None],
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.root, self._widget, self._before = root, widget, before
        self._worker = None
        #: The last finished evaluation, or ``None``.
        self.evaluation: Evaluation | None = None
        self.unfold = QCheckBox("Evaluate on the reviewed samples")
        self.unfold.setToolTip("Score methods and probability thresholds against the samples you marked reviewed: "
                               "which to use for the rest of the dataset")
        self._methods = {name: QCheckBox(name) for name in METHODS}
        self._methods[DEFAULT_METHOD].setChecked(True)
        for name, box in self._methods.items():
            box.setToolTip(METHODS[name].description)
        self._thresholds = QLineEdit(DEFAULT_THRESHOLDS)
        self._thresholds.setToolTip("Probability thresholds to compare, separated by commas")
        self._run = QPushButton("Evaluate")
        self._run.setToolTip("Run the checked methods on the reviewed samples' images and score them (mIoU)")
        self._run.clicked.connect(lambda *_: self.cancel() if self.running else self.start())
        self._progress = QProgressBar()
        self._progress.setRange(0, 1000)
        self._status = QLabel()
        self._status.setWordWrap(True)
        self._results = QPushButton("Results…")
        self._results.setToolTip("The table of every method and threshold, and per-class IoU of each method's best")
        self._results.clicked.connect(lambda *_: self.show_results())
        self._use = QPushButton("Use in the widget")
        self._use.setToolTip("Set the SCLIP widget's method and threshold to the best ones")
        self._use.clicked.connect(lambda *_: self.use_best())

        content = QWidget()
        layout = QVBoxLayout(content)
        layout.setContentsMargins(0, 0, 0, 0)
        methods = QGridLayout()  # three a row: the panel stays as narrow as its other controls
        for k, box in enumerate(self._methods.values()):
            methods.addWidget(box, k // 3, k % 3)
        layout.addLayout(methods)
        thresholds = QHBoxLayout()
        thresholds.addWidget(QLabel("thresholds"))
        thresholds.addWidget(self._thresholds)
        layout.addLayout(thresholds)
        run = QHBoxLayout()
        run.addWidget(self._run)
        run.addWidget(self._progress)
        layout.addLayout(run)
        layout.addWidget(self._status)
        results = QHBoxLayout()
        results.addWidget(self._results)
        results.addWidget(self._use)
        layout.addLayout(results)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self.unfold)
        outer.addWidget(content)
        self.unfold.toggled.connect(content.setVisible)
        content.setVisible(False)
        self._show_results()

    @property
    def running(self) -> bool:
        return self._worker is not None

    def request(self) -> EvaluationRequest:
        """What the controls ask for (a :class:`SclipError` for an empty or malformed choice)."""
        methods = tuple(name for name, box in self._methods.items() if box.isChecked())
        if not methods:
            raise SclipError("check at least one method")
        try:
            thresholds = tuple(sorted({float(item) for item in self._thresholds.text().split(",") if item.strip()}))
        except ValueError:
            raise SclipError(f"thresholds must be numbers separated by commas, got {self._thresholds.text()!r}") from None
        if not thresholds or not all(0 <= value <= 1 for value in thresholds):
            raise SclipError("give thresholds between 0 and 1, separated by commas")
        options = self._widget_options()
        model, pretrained = normalise_choice(getattr(options, "model", ""), getattr(options, "pretrained", ""))
        return EvaluationRequest(
            self.root, methods, thresholds,
            model=model,
            pretrained=pretrained,
            device=getattr(options, "device", "") or config.default_device(),
            quick_gelu=getattr(options, "quick_gelu", None),
        )

    def start(self) -> None:
        """Score in a worker (what Evaluate does); the button cancels it."""
        from napari.qt.threading import create_worker

        if self.running:
            return
        try:
            request = self.request()
            self._before()
        except SclipError as exc:
            self._failed(exc)
            return
        earlier = self.evaluation.segmenter if self.evaluation is not None else None
        self._worker = create_worker(evaluation_job, request, earlier, _start_thread=False, _ignore_errors=True)
        self._worker.yielded.connect(self._on_progress)
        self._worker.returned.connect(self._on_done)
        self._worker.errored.connect(self._failed)
        self._worker.finished.connect(self._on_finished)
        self._run.setText("Cancel")
        self._status.setText("starting…")
        self._worker.start()

    def cancel(self) -> None:
        if self._worker is not None:
            self._status.setText("cancelling…")
            self._worker.quit()

    def _on_progress(self, step) -> None:
        self._progress.setValue(int(step.fraction * 1000))
        self._status.setText(step.message)

    def _on_done(self, evaluation: Evaluation) -> None:
        self.evaluation = evaluation
        self._status.setText(evaluation.advice)
        self._show_results()

    def _failed(self, error) -> None:
        from napari.utils.notifications import show_error

        if not isinstance(error, SclipError):
            _log.error("evaluation failed", exc_info=error)  # a bug: keep the traceback
        message = " ".join(str(error).split()) if isinstance(error, SclipError) else f"{type(error).__name__}: {error}"
        self._status.setText(f"error: {message}")
        show_error(f"SCLIP evaluate: {message}")

    def _on_finished(self) -> None:
        aborted = self._worker is not None and self._worker.abort_requested
        self._worker = None
        self._run.setText("Evaluate")
        self._progress.setValue(0)
        if aborted:
            self._status.setText("cancelled")

    def _show_results(self) -> None:
        evaluation = self.evaluation
        self._results.setEnabled(evaluation is not None)
        self._use.setEnabled(evaluation is not None and self._widget() is not None)

    def show_results(self) -> QDialog | None:
        """The last evaluation in a window of its own: every setting's row, the best one's
        per-class table, and the chart."""
        if self.evaluation is None:
            return None
        report = self.evaluation.report
        best, scores = report.best
        table = QPlainTextEdit(f"{report.truth}: {report.images} samples\n{report.table()}\n\n"
                               f"best: {best.describe()}\n{scores.table()}")
        table.setReadOnly(True)
        table.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        table.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        pixmap = QPixmap()
        pixmap.loadFromData(self.evaluation.chart, "PNG")
        picture = QLabel()
        picture.setPixmap(pixmap)
        chart = QScrollArea()
        chart.setWidget(picture)
        chart.setMinimumHeight(min(pixmap.height() + 24, 520))
        dialog = QDialog(self)
        dialog.setWindowTitle(f"SCLIP evaluate: {self.root.name}")
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        layout = QVBoxLayout(dialog)
        layout.addWidget(table)
        layout.addWidget(chart)
        dialog.resize(min(max(pixmap.width(), 640) + 40, 1200), 900)
        dialog.show()
        return dialog

    def use_best(self) -> None:
        """Set the SCLIP widget's method and threshold (and logit scale, when swept) to the best."""
        widget = self._widget()
        if self.evaluation is None or widget is None:
            return
        setting, _ = self.evaluation.report.best
        values = {"method": setting.method, "prob_threshold": setting.prob_threshold}
        if setting.logit_scale is not None:
            values["logit_scale"] = setting.logit_scale
        widget.set_options(**values)
        self._status.setText(f"the SCLIP widget now uses {setting.method} with threshold {setting.prob_threshold:g}")

    def _widget_options(self):
        widget = self._widget()
        return widget.options() if widget is not None else None
