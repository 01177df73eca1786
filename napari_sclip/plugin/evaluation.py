"""Scoring methods on the samples reviewed so far, from napari (no Qt): which method and threshold
to use for the rest of the dataset.  The review panel's Evaluate section runs
:func:`evaluation_job` in a worker."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

from napari_sclip.evaluate.run import Report, dataset_truth, iter_evaluate, labelled, percent, sweep
from napari_sclip.plugin.runner import JobProgress


@dataclass(frozen=True)
class EvaluationRequest:
    """What to score: the dataset's reviewed samples, each method with each probability
    threshold, with the model the SCLIP widget is set to."""

    root: Path
    methods: tuple[str, ...]
    prob_thresholds: tuple[float, ...]
    model: str
    pretrained: str | None  # None: the model's own (a preset, repo or folder)
    device: str
    quick_gelu: bool | None = None


@dataclass(frozen=True)
class Evaluation:
    """A finished evaluation: the report, its chart (PNG bytes) and the advice it gives."""

    report: Report
    chart: bytes
    advice: str
    segmenter: object  # the Segmenter it ran: the next evaluation with the same model reuses it


def evaluation_job(request: EvaluationRequest, segmenter=None) -> Generator[JobProgress, None, Evaluation]:
    """A worker's job: load the engine and the model (unless ``segmenter``, an earlier
    evaluation's, is of the same model), score, and draw the chart."""
    from napari_sclip.evaluate.plot import chart_png
    from napari_sclip.plugin.engine_loader import make_segmenter

    yield JobProgress(0.0, "reading the reviewed samples")
    truth = dataset_truth(request.root)
    wanted = (request.model, request.pretrained, request.device, request.quick_gelu)
    if segmenter is None or (segmenter.model_name, segmenter.pretrained, segmenter.device_name,
                             segmenter.quick_gelu) != wanted:
        yield JobProgress(0.0, "loading the model")
        segmenter = make_segmenter(*wanted)
    settings = sweep(truth, request.methods, prob_thresholds=request.prob_thresholds)
    steps = iter_evaluate(truth, segmenter, settings)
    try:
        while True:
            done, total = next(steps)
            yield JobProgress(done / max(total, 1), f"scoring: {done} of {total} (samples × methods)")
    except StopIteration as finished:
        report = finished.value
    finally:
        steps.close()
    return Evaluation(report, chart_png(report), advice(report), segmenter)


def advice(report: Report) -> str:
    """One line: the best method and threshold, what it scored, and how to use it."""
    setting, scores = report.best
    best = (f"Best on the {report.images} reviewed samples: {setting.method}, threshold {setting.prob_threshold:g} "
            f"(mIoU {percent(scores.miou)}, {percent(labelled(scores))} % labelled)")
    return f"{best}. Beware: {report.caveat}" if report.caveat else best
