"""Scoring methods and settings against ground truth: what ``napari-sclip evaluate`` runs (no
napari).

The ground truth (:class:`Truth`) is one of three kinds: a benchmark in its standard layout
(:func:`benchmark_truth`), any folder of images with index-PNG masks (:func:`folder_truth`), or a
napari-sclip dataset's reviewed samples (:func:`dataset_truth`).  :func:`evaluate` runs each
method once over the images and scores every combination of the swept post-processing settings
(logit scale, probability and area thresholds) from the same window logits, since those settings
act only after the windows: a sweep costs one pass of the model per method.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from napari_sclip.engine.errors import ImageError, SclipError
from napari_sclip.engine.vocabulary import Vocabulary, parse_vocabulary
from napari_sclip.evaluate.benchmarks import Pair, folder_pairs, get_benchmark, read_label
from napari_sclip.evaluate.metrics import (
    IGNORE_INDEX,
    Areas,
    Scores,
    image_areas,
    reduce_zero_label,
    scores,
)


@dataclass(frozen=True)
class Truth:
    """Images and the ground truth they are scored against.

    Attributes
    ----------
    title
        What it is, for reports ("VOC21 (val)", "the folder masks/", ...).
    pairs
        Each image and its mask.
    vocabulary
        What the methods are given: class ``i`` is mask value ``i`` (after ``reduce_zero_label``).
    class_names
        The reports' name of each class.
    reduce_zero_label
        Masks' 0 is ignore and every other value moves down by one (mmseg's option).
    ignore_index
        The masks' ignore value (after ``reduce_zero_label``).
    background_class
        The class that pixels below the probability threshold get (``None``: unlabelled, which
        scores as no class).
    preset
        The settings its benchmark's authors used (``short_side``, ``logit_scale``,
        ``prob_threshold``, ``area_threshold``); empty for other ground truth.
    """

    title: str
    pairs: tuple[Pair, ...]
    vocabulary: Vocabulary
    class_names: tuple[str, ...]
    reduce_zero_label: bool = False
    ignore_index: int = IGNORE_INDEX
    background_class: int | None = None
    preset: dict[str, Any] = field(default_factory=dict)

    def label(self, pair: Pair) -> np.ndarray:
        """The mask of ``pair`` as class indices, ``ignore_index`` where not scored."""
        mask = read_label(pair.label)
        return reduce_zero_label(mask) if self.reduce_zero_label else mask


@dataclass(frozen=True)
class Setting:
    """One combination of a sweep: a method and its post-processing (``None``: the method's or
    the preset's logit scale; no area threshold)."""

    method: str
    logit_scale: float | None = None
    prob_threshold: float = 0.0
    area_threshold: float | None = None

    def describe(self) -> str:
        scale = "default" if self.logit_scale is None else f"{self.logit_scale:g}"
        area = "-" if self.area_threshold is None else f"{self.area_threshold:g}"
        return f"{self.method}, logit scale {scale}, prob. threshold {self.prob_threshold:g}, area threshold {area}"

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "logit_scale": self.logit_scale, "prob_threshold": self.prob_threshold,
                "area_threshold": self.area_threshold}


def sweep(methods: Sequence[str], logit_scales: Sequence[float | None], prob_thresholds: Sequence[float],
          area_thresholds: Sequence[float | None]) -> list[Setting]:
    """Every combination, method by method (the order of the report)."""
    return [Setting(*combination)
            for combination in itertools.product(methods, logit_scales, prob_thresholds, area_thresholds)]


@dataclass(frozen=True)
class Report:
    """The scores of each setting over one ground truth, and which is best (highest mIoU)."""

    truth: str
    images: int
    results: tuple[tuple[Setting, Scores], ...]
    params: dict[str, Any]

    @property
    def best(self) -> tuple[Setting, Scores]:
        return max(self.results, key=lambda item: _rank(item[1].miou))

    def best_by_method(self) -> dict[str, tuple[Setting, Scores]]:
        """Each method's best setting, in the order of the report."""
        best: dict[str, tuple[Setting, Scores]] = {}
        for setting, result in self.results:
            held = best.get(setting.method)
            if held is None or _rank(result.miou) > _rank(held[1].miou):
                best[setting.method] = (setting, result)
        return best

    def table(self) -> str:
        """One row per setting, in percent: mIoU, mAcc, aAcc, then *labelled* (the scored pixels
        the setting gave a class, not left unlabelled by its threshold) and *precise* (the
        labelled ones that are right): what a pseudo-label's threshold trades.  The best mIoU is
        marked with ``*``."""
        best = self.best[0]
        header = (f"  {'method':<10} {'logit scale':>11} {'prob. thr.':>10} {'area thr.':>9} {'mIoU':>6} {'mAcc':>6} "
                  f"{'aAcc':>6} {'labelled':>8} {'precise':>7}")
        rows = [header]
        for setting, result in self.results:
            scale = "default" if setting.logit_scale is None else f"{setting.logit_scale:g}"
            area = "-" if setting.area_threshold is None else f"{setting.area_threshold:g}"
            figures = " ".join(f"{percent(value):>6}" for value in (result.miou, result.macc, result.aacc))
            figures += f" {percent(labelled(result)):>8} {percent(precise(result)):>7}"
            mark = "*" if setting == best else " "
            rows.append(f"{mark} {setting.method:<10} {scale:>11} {setting.prob_threshold:>10g} {area:>9} {figures}")
        return "\n".join(rows)

    def to_json(self) -> dict[str, Any]:
        best = self.best[0]
        return {
            "truth": self.truth,
            "images": self.images,
            "params": self.params,
            "results": [{"setting": setting.to_json(), "best": setting == best, **result.to_json(),
                         "labelled": _fraction(labelled(result)), "precise": _fraction(precise(result))}
                        for setting, result in self.results],
        }


def labelled(result: Scores) -> float:
    """The fraction of scored pixels given a class (not left unlabelled)."""
    areas = result.areas
    return float(areas.pred.sum() / areas.label.sum()) if areas.label.sum() else math.nan


def precise(result: Scores) -> float:
    """The fraction of labelled pixels whose class is right."""
    areas = result.areas
    return float(areas.intersect.sum() / areas.pred.sum()) if areas.pred.sum() else math.nan


def percent(value: float) -> str:
    """A fraction as a percentage with one decimal; ``-`` for NaN (undefined)."""
    return "-" if math.isnan(value) else f"{100 * value:.1f}"


def _fraction(value: float) -> float | None:
    return None if math.isnan(value) else value


def _rank(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def benchmark_truth(name: str, data_root: str | Path) -> Truth:
    """One of SCLIP's Table 1 benchmarks in its standard layout under ``data_root``."""
    benchmark = get_benchmark(name)
    vocabulary = parse_vocabulary(benchmark.class_names(), unique=False)  # the authors' files repeat names
    # The authors send pixels below the threshold to class 0; it is the background where their
    # threshold is not 0 (VOC21, Context60, COCO-Object), whose name file gives it stuff names.
    background = 0 if benchmark.prob_threshold > 0 else None
    names = list(vocabulary.display_names)
    if background == 0:
        names[0] = "background"
    preset = {"short_side": benchmark.short_side, "logit_scale": benchmark.logit_scale,
              "prob_threshold": benchmark.prob_threshold, "area_threshold": benchmark.area_threshold}
    return Truth(f"{benchmark.title} ({Path(data_root)})", tuple(benchmark.pairs(data_root)), vocabulary,
                 _unique(names), benchmark.reduce_zero_label, IGNORE_INDEX, background, preset)


def folder_truth(images: str | Path, masks: str | Path, vocabulary: Vocabulary,
                 background_class: int | None = None) -> Truth:
    """A folder of images with index-PNG masks of the same names (mask value ``i`` is class ``i``
    of ``vocabulary``, 255 is ignore)."""
    pairs = folder_pairs(Path(images), Path(masks))
    return Truth(f"{images} with the masks of {masks}", tuple(pairs), vocabulary, _unique(vocabulary.display_names),
                 background_class=background_class)


def dataset_truth(root: str | Path, statuses: Sequence[str] = ("reviewed",),
                  background_class: int | None = None) -> Truth:
    """A napari-sclip dataset's samples of these review statuses (``reviewed``, ``edited``): a
    person's masks, in training ids, scored against the methods' labels of their images."""
    from napari_sclip.dataset import format as fmt
    from napari_sclip.dataset.paths import DatasetError, resolve_inside
    from napari_sclip.dataset.reader import find_dataset_root, sample_ids
    from napari_sclip.dataset.writer import read_meta

    found = find_dataset_root(root)
    if found is None:
        raise DatasetError(f"{root} is not a napari-sclip dataset (it has no {fmt.MANIFEST} of this format)")
    _, registry, train_ids = fmt.read_manifest(found)
    by_train_id = {train_id: uid for uid, train_id in train_ids.items()}
    if sorted(by_train_id) != list(range(len(by_train_id))) or not by_train_id:
        raise DatasetError(f"{found} has no classes, or training ids with gaps: nothing to score against")
    vocabulary = parse_vocabulary([list(registry.names[by_train_id[k]]) for k in range(len(by_train_id))])
    pairs = []
    for split, image_id in sample_ids(found):
        meta = read_meta(resolve_inside(found, f"{split}/meta/{image_id}.json"))
        if meta.get("review_status") in statuses:
            pairs.append(Pair(f"{split}/{image_id}", resolve_inside(found, f"{split}/{meta['image']}"),
                              resolve_inside(found, f"{split}/{meta['mask']}")))
    if not pairs:
        raise DatasetError(f"{found} has no {' or '.join(statuses)} samples to score against: review some first")
    ignore = fmt.ignore_value(fmt.mask_dtype(train_ids))
    return Truth(f"{found} ({' and '.join(statuses)} samples)", tuple(pairs), vocabulary,
                 _unique(vocabulary.display_names), ignore_index=ignore, background_class=background_class)


def _unique(names: Sequence[str]) -> tuple[str, ...]:
    """Report names, made distinct where two classes share a display name."""
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return tuple(unique)


def evaluate(truth: Truth, segmenter, settings: Sequence[Setting], *,
             progress: Callable[[int, int], None] | None = None, **options) -> Report:
    """:func:`iter_evaluate` run to its end; ``progress(done, total)`` gets its steps."""
    steps = iter_evaluate(truth, segmenter, settings, **options)
    while True:
        try:
            done, total = next(steps)
        except StopIteration as finished:
            return finished.value
        if progress is not None:
            progress(done, total)


def iter_evaluate(
    truth: Truth,
    segmenter,
    settings: Sequence[Setting],
    *,
    short_side: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    pamr: bool | None = None,
    predictions: Path | None = None,
) -> Generator[tuple[int, int], None, Report]:
    """Score every setting on every image of ``truth``: yields ``(done, total)`` (images times
    methods) as images are scored and returns the :class:`Report`; closing it stops the run.

    Each method runs once per image (its windows batched across images by
    :meth:`~napari_sclip.engine.segmenter.Segmenter.run_windows`); every setting of that method is
    then one :meth:`~napari_sclip.engine.segmenter.Segmenter.finish` of the same logits.  Scores
    are mmseg's (:mod:`~napari_sclip.evaluate.metrics`), summed over the whole set.
    ``short_side`` defaults to the preset's (else the method's).  With ``predictions``, each
    image's predicted class indices (255 where unlabelled) are written as
    ``<predictions>/<setting>/<name>.png``.  A mask that does not match its image, or an image
    that cannot be read, is one :class:`SclipError` naming the file.
    """
    if not settings:
        raise SclipError("nothing to evaluate: give at least one method")
    short_side = short_side or truth.preset.get("short_side")
    methods = list(dict.fromkeys(setting.method for setting in settings))
    totals = {setting: Areas.zeros(len(truth.vocabulary)) for setting in settings}
    total, done = len(truth.pairs) * len(methods), 0
    yield done, total
    params: dict[str, Any] = {}
    for method in methods:
        mine = [setting for setting in settings if setting.method == method]
        options = {"method": method, "short_side": short_side, "window": window, "stride": stride, "pamr": pamr}
        prepared = (segmenter.prepare(_read_image(pair.image), truth.vocabulary, tag=pair, **options)
                    for pair in truth.pairs)
        for image, canvas in segmenter.run_windows(prepared):
            pair = image.tag
            label = truth.label(pair)
            if label.shape != image.size:
                raise ImageError(f"{pair.label} is {label.shape[1]}x{label.shape[0]} but its image {pair.image} "
                                 f"is {image.size[1]}x{image.size[0]}")
            for setting in mine:
                result = segmenter.finish(_decided(image, setting, truth), canvas)
                predicted = _class_indices(result.labels)
                totals[setting] += image_areas(predicted, label, len(truth.vocabulary), truth.ignore_index)
                if predictions is not None:
                    _save_prediction(predictions / _slug(setting), pair.name, predicted)
                params.setdefault(method, {key: value for key, value in result.params.items()
                                           if key not in ("logit_scale", "prob_threshold", "background_class",
                                                          "area_threshold", "resized_shape", "windows",
                                                          "features_reused")})
            done += 1
            yield done, total
    results = tuple((setting, scores(totals[setting], truth.class_names)) for setting in settings)
    return Report(truth.title, len(truth.pairs), results, params)


def _decided(image, setting: Setting, truth: Truth):
    """``image`` (prepared) with ``setting``'s post-processing."""
    scale = setting.logit_scale if setting.logit_scale is not None else truth.preset.get("logit_scale")
    return replace(
        image,
        logit_scale=image.logit_scale if scale is None else float(scale),
        prob_threshold=float(setting.prob_threshold),
        background_class=truth.background_class,
        area_threshold=setting.area_threshold if truth.background_class is not None else None,
    )


def _read_image(path: Path) -> np.ndarray:
    from napari_sclip.io.images import read_image

    return read_image(path)


def _class_indices(labels: np.ndarray) -> np.ndarray:
    """Segmenter labels (``1 + class``, 0 unlabelled) as class indices, 255 where unlabelled."""
    indices = labels.astype(np.int64) - 1
    indices[labels == 0] = IGNORE_INDEX
    return indices


def _slug(setting: Setting) -> str:
    scale = "default" if setting.logit_scale is None else f"{setting.logit_scale:g}"
    area = "none" if setting.area_threshold is None else f"{setting.area_threshold:g}"
    return f"{setting.method}_scale-{scale}_prob-{setting.prob_threshold:g}_area-{area}"


def _save_prediction(folder: Path, name: str, indices: np.ndarray) -> None:
    from napari_sclip._files import atomic_write_bytes

    dtype = np.uint8 if indices.max(initial=0) <= 255 else np.uint16
    path = folder / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, _png_bytes(indices.astype(dtype)))


def _png_bytes(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
