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
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from napari_sclip.dataset.paths import is_int
from napari_sclip.engine.errors import ImageError, ParameterError, SclipError
from napari_sclip.engine.vocabulary import Vocabulary, parse_vocabulary
from napari_sclip.evaluate.benchmarks import (
    Benchmark,
    Pair,
    Preset,
    folder_pairs,
    get_benchmark,
    read_label,
)
from napari_sclip.evaluate.metrics import (
    IGNORE_INDEX,
    Areas,
    Scores,
    image_areas,
    json_fraction,
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
    benchmark
        The benchmark it is, whose authors' settings and name files each method gets
        (:meth:`preset`); ``None`` for other ground truth.
    caveat
        What biases the scores, for the report (a dataset's samples accepted unchanged are the
        labels of the method that made them), or ``None``.
    """

    title: str
    pairs: tuple[Pair, ...]
    vocabulary: Vocabulary
    class_names: tuple[str, ...]
    reduce_zero_label: bool = False
    ignore_index: int = IGNORE_INDEX
    background_class: int | None = None
    benchmark: Benchmark | None = None
    caveat: str | None = None

    def __post_init__(self) -> None:
        if self.background_class is not None and not 0 <= self.background_class < len(self.vocabulary):
            raise ParameterError(f"the background class must be one of the {len(self.vocabulary)} classes "
                                 f"(0 to {len(self.vocabulary) - 1}), got {self.background_class}")

    def preset(self, method: str) -> Preset | None:
        """How ``method``'s authors ran it on this benchmark; ``None`` for other ground truth."""
        return self.benchmark.preset(method) if self.benchmark is not None else None

    def vocabulary_for(self, method: str) -> Vocabulary:
        """What ``method`` is given: its authors' name file on a benchmark (same classes, same
        order; ClearCLIP's differ in names), else :attr:`vocabulary`."""
        if self.benchmark is None:
            return self.vocabulary
        return parse_vocabulary(self.benchmark.class_names(method), unique=False)  # the authors' files repeat names

    def label(self, pair: Pair) -> np.ndarray:
        """The mask of ``pair`` as class indices, ``ignore_index`` where not scored.  A value that
        is neither a class nor ignore is an :class:`ImageError` naming the file (mmseg would drop
        it silently: a mask numbered from 1, as napari's labels are, would score nonsense)."""
        mask = read_label(pair.label)
        mask = reduce_zero_label(mask) if self.reduce_zero_label else mask
        counts = np.bincount(mask.ravel(), minlength=len(self.vocabulary))
        counts[self.ignore_index:self.ignore_index + 1] = 0
        stray = np.flatnonzero(counts[len(self.vocabulary):]) + len(self.vocabulary)
        if stray.size:
            listed = ", ".join(map(str, stray[:5])) + (", ..." if stray.size > 5 else "")
            raise ImageError(f"{pair.label} holds mask value(s) {listed}, which no class has: masks number the "
                             f"{len(self.vocabulary)} classes from 0 ({self.ignore_index} = ignore)")
        return mask


@dataclass(frozen=True)
class Setting:
    """One combination of a sweep: a method and its post-processing (``logit_scale=None``: the
    method's; ``area_threshold=None``: none)."""

    method: str
    logit_scale: float | None = None
    prob_threshold: float = 0.0
    area_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.logit_scale is not None and not (math.isfinite(self.logit_scale) and self.logit_scale > 0):
            raise ParameterError(f"a logit scale must be a positive number, got {self.logit_scale!r}")
        for name, value in (("probability threshold", self.prob_threshold), ("area threshold", self.area_threshold)):
            if value is not None and not 0 <= value <= 1:
                raise ParameterError(f"the {name} must be between 0 and 1, got {value!r}")

    def describe(self) -> str:
        scale = "default" if self.logit_scale is None else f"{self.logit_scale:g}"
        area = "-" if self.area_threshold is None else f"{self.area_threshold:g}"
        return f"{self.method}, logit scale {scale}, prob. threshold {self.prob_threshold:g}, area threshold {area}"

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "logit_scale": self.logit_scale, "prob_threshold": self.prob_threshold,
                "area_threshold": self.area_threshold}


def sweep(truth: Truth, methods: Sequence[str], logit_scales: Sequence[float | None] | None = None,
          prob_thresholds: Sequence[float] | None = None,
          area_thresholds: Sequence[float | None] | None = None) -> list[Setting]:
    """Every combination, method by method (the order of the report).  A list left ``None``
    takes each method's value in ``truth``'s preset (its authors' on a benchmark), else the
    defaults: the method's logit scale, no thresholds."""
    from napari_sclip.engine.methods import get_method

    settings = []
    for method in methods:
        preset = truth.preset(method)
        scales = logit_scales or [preset.logit_scale if preset else get_method(method).logit_scale]
        probs = prob_thresholds or [preset.prob_threshold if preset else 0.0]
        areas = area_thresholds or [preset.area_threshold if preset else None]
        settings += [Setting(method, *combination) for combination in itertools.product(scales, probs, areas)]
    return settings


@dataclass(frozen=True)
class Report:
    """The scores of each setting over one ground truth, and which is best (highest mIoU)."""

    truth: str
    images: int
    results: tuple[tuple[Setting, Scores], ...]
    params: dict[str, Any]
    caveat: str | None = None  # the ground truth's (:attr:`Truth.caveat`)

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
            mark = "*" if setting == best and not math.isnan(result.miou) else " "
            rows.append(f"{mark} {setting.method:<10} {scale:>11} {setting.prob_threshold:>10g} {area:>9} {figures}")
        return "\n".join(rows)

    def to_json(self) -> dict[str, Any]:
        best = self.best[0]
        return {
            "truth": self.truth,
            "images": self.images,
            "caveat": self.caveat,
            "params": self.params,
            "results": [{"setting": setting.to_json(), "best": setting == best, **result.to_json(),
                         "labelled": json_fraction(labelled(result)), "precise": json_fraction(precise(result))}
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
    return Truth(f"{benchmark.title} ({Path(data_root)})", tuple(benchmark.pairs(data_root)), vocabulary,
                 _unique(names), benchmark.reduce_zero_label, IGNORE_INDEX, background, benchmark)


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
    from napari_sclip.dataset.writer import pixels_edited, read_meta

    found = find_dataset_root(root)
    if found is None:
        raise DatasetError(f"{root} is not a napari-sclip dataset (it has no {fmt.MANIFEST} of this format)")
    _, registry, train_ids = fmt.read_manifest(found)
    by_train_id = {train_id: uid for uid, train_id in train_ids.items()}
    if sorted(by_train_id) != list(range(len(by_train_id))) or not by_train_id:
        raise DatasetError(f"{found} has no classes, or training ids with gaps: nothing to score against")
    vocabulary = parse_vocabulary([list(registry.names[by_train_id[k]]) for k in range(len(by_train_id))])
    pairs, unchanged = [], {}
    for split, image_id in sample_ids(found):
        meta = read_meta(resolve_inside(found, f"{split}/meta/{image_id}.json"))
        if meta.get("review_status") in statuses:
            pairs.append(Pair(f"{split}/{image_id}", resolve_inside(found, f"{split}/{meta['image']}"),
                              resolve_inside(found, f"{split}/{meta['mask']}")))
            if not pixels_edited(meta) and meta.get("method"):
                unchanged[meta["method"]] = unchanged.get(meta["method"], 0) + 1
    if not pairs:
        how = "mark samples reviewed" if "edited" not in statuses else "correct or mark samples"
        raise DatasetError(f"{found} has no {' or '.join(statuses)} samples to score against: {how} in napari's "
                           f"review panel (Shift+R marks one; napari-sclip review {found} opens it)")
    ignore = fmt.ignore_value(fmt.mask_dtype(train_ids))
    note = "; ".join(f"{count} of the {len(pairs)} samples are {method}'s labels accepted unchanged, which "
                     f"favours {method}" for method, count in unchanged.items())
    return Truth(f"{found} ({' and '.join(statuses)} samples)", tuple(pairs), vocabulary,
                 _unique(vocabulary.display_names), ignore_index=ignore, background_class=background_class,
                 caveat=note or None)


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


@dataclass
class Tally:
    """How far a run is: the images each method has scored, each setting's summed pixel counts,
    and each method's parameters.  Counts add up, so a run can go on from a saved tally
    (:class:`Checkpoint`) and Dask workers' partial tallies merge into the client's."""

    done: dict[str, set[str]]
    areas: dict[Setting, Areas]
    params: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def empty(cls, settings: Sequence[Setting], num_classes: int) -> Tally:
        return cls({setting.method: set() for setting in settings},
                   {setting: Areas.zeros(num_classes) for setting in settings})

    def add(self, method: str, names: Sequence[str], areas: dict[Setting, Areas], params: dict[str, Any]) -> None:
        for setting, counts in areas.items():
            self.areas[setting] += counts
        self.done[method].update(names)
        self.params.setdefault(method, params)

    def to_json(self) -> dict[str, Any]:
        return {"done": {method: sorted(names) for method, names in self.done.items()},
                "areas": [[setting.to_json(), counts.to_json()] for setting, counts in self.areas.items()],
                "params": self.params}

    @classmethod
    def from_json(cls, value: dict[str, Any], settings: Sequence[Setting], num_classes: int) -> Tally:
        """The tally a checkpoint holds, checked against the run it is for (``ValueError``,
        ``TypeError``, ``KeyError`` or ``AttributeError`` if it does not fit)."""
        areas = {}
        for setting, counts in value["areas"]:
            if not all(len(numbers) == num_classes and all(is_int(n, 0, 2**62) for n in numbers)
                       for numbers in counts.values()):
                raise ValueError("counts that no run makes")
            areas[Setting(**setting)] = Areas.from_json(counts)
        done = {str(method): {str(name) for name in names} for method, names in value["done"].items()}
        params = {str(method): dict(found) for method, found in value["params"].items()}
        if set(areas) != set(settings) or set(done) != {setting.method for setting in settings}:
            raise ValueError("another run's tally")
        return cls(done, areas, params)


class Checkpoint:
    """A run's :class:`Tally`, saved atomically (at most every ``every`` seconds) at ``path``, with
    a fingerprint of the run: the same command finds it and goes on where the last one stopped;
    any other run starts afresh."""

    def __init__(self, path: Path, fingerprint: str, every: float = 10.0) -> None:
        self.path, self.fingerprint, self.every = path, fingerprint, every
        self._saved: float | None = 0.0  # None: saving failed once, and is not tried again

    def load(self, settings: Sequence[Setting], num_classes: int) -> Tally | None:
        """The saved tally of this run (``settings`` over ``num_classes`` classes), or ``None``."""
        from napari_sclip.dataset.paths import read_json

        try:
            value = read_json(self.path)
            if value.get("fingerprint") != self.fingerprint:
                return None
            return Tally.from_json(value["tally"], settings, num_classes)
        except (SclipError, OSError, KeyError, TypeError, ValueError, AttributeError, OverflowError):
            return None  # none, another run's, or damaged: start afresh

    def save(self, tally: Tally, *, now: bool = False) -> None:
        import json
        import time

        from napari_sclip._files import atomic_write_bytes

        if self._saved is None or (not now and time.monotonic() - self._saved < self.every):
            return
        document = {"fingerprint": self.fingerprint, "tally": tally.to_json()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self._saved:
                self._forget_old()
            atomic_write_bytes(self.path, json.dumps(document).encode())
        except OSError as exc:  # a read-only or full cache: the run goes on, it just cannot resume
            import warnings

            from napari_sclip._files import describe_os_error

            warnings.warn(f"cannot save the evaluation's progress, it will not resume: {describe_os_error(exc)}",
                          stacklevel=2)
            self._saved = None
            return
        self._saved = time.monotonic()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def _forget_old(self, days: float = 30) -> None:
        """Delete the checkpoints of runs interrupted over ``days`` ago and never taken up again."""
        import time

        for other in self.path.parent.glob("*.json"):
            try:
                if other != self.path and time.time() - other.stat().st_mtime > days * 86400:
                    other.unlink()
            except OSError:
                pass  # another run's, just removed


def fingerprint(truth: Truth, settings: Sequence[Setting], model: dict[str, Any], options: dict[str, Any]) -> str:
    """What makes two runs the same: the images and masks (and their files' sizes and time
    stamps: a mask edited since is another run), the classes, settings, model (and its weights
    file's) and options."""
    import hashlib
    import json
    import os

    def stamp(path) -> list:
        try:
            status = os.stat(path)
        except (OSError, TypeError, ValueError):
            return []
        return [status.st_size, status.st_mtime_ns]

    document = {"pairs": [[pair.name, str(pair.image), stamp(pair.image), str(pair.label), stamp(pair.label)]
                          for pair in truth.pairs],
                "weights": stamp(model.get("pretrained")),
                "classes": truth.vocabulary.to_lines(), "reduce_zero_label": truth.reduce_zero_label,
                "background_class": truth.background_class,
                "benchmark": truth.benchmark.name if truth.benchmark else None,
                "settings": [setting.to_json() for setting in settings], "model": model, "options": options}
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()


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
    tally: Tally | None = None,
    readers: int = 2,
    finishers: int = 2,
    client=None,
    chunk_size: int = 8,
) -> Generator[tuple[int, int], None, Report]:
    """Score every setting on every image of ``truth``: yields ``(done, total)`` (images times
    methods) as images are scored and returns the :class:`Report`; closing it stops the run.

    Each method runs once per image; every setting of that method is then one
    :meth:`~napari_sclip.engine.segmenter.Segmenter.finish` of the same logits.  The run is a
    pipeline: ``readers`` threads decode and prepare images ahead of the model, which batches
    windows across images, and ``finishers`` threads post-process and count, with bounded
    queues.  With a Dask ``client``, chunks of ``chunk_size`` images are scored on its workers
    (each loads the model once) and their counts summed here.  Scores are mmseg's
    (:mod:`~napari_sclip.evaluate.metrics`), summed over the whole set.

    ``short_side``, ``window`` and ``stride`` default to each method's preset (its authors' on a
    benchmark, else the method's defaults).  ``tally`` is where to start
    from (a :class:`Checkpoint`'s), updated as images are scored.  With ``predictions``, each
    image's predicted class indices (255 where unlabelled) are written as
    ``<predictions>/<setting>/<name>.png``.  A mask that does not match its image, or an image
    that cannot be read, is one :class:`SclipError` naming the file.
    """
    if not settings:
        raise SclipError("nothing to evaluate: give at least one method")
    run = _Run(truth, tuple(settings), {"short_side": short_side, "window": window, "stride": stride,
                                        "pamr": pamr}, predictions)
    tally = tally if tally is not None else Tally.empty(settings, len(truth.vocabulary))
    methods = list(dict.fromkeys(setting.method for setting in settings))
    total = len(truth.pairs) * len(methods)
    done = sum(len(names) for names in tally.done.values())
    yield done, total
    for method in methods:
        left = tuple(pair for pair in truth.pairs if pair.name not in tally.done[method])
        if client is not None:
            scored = _score_on_cluster(client, segmenter, run, method, left, chunk_size)
        else:
            scored = _score_here(segmenter, run, method, left, readers, finishers)
        for names, areas, params in scored:
            tally.add(method, names, areas, params)
            done += len(names)
            yield done, total
    results = tuple((setting, scores(tally.areas[setting], truth.class_names)) for setting in settings)
    return Report(truth.title, len(truth.pairs), results, tally.params, truth.caveat)


@dataclass(frozen=True)
class _Run:
    """What every image of a run is scored with (it travels to Dask workers)."""

    truth: Truth
    settings: tuple[Setting, ...]
    options: dict[str, Any]  # the caller's short side, window, stride and PAMR (None: the preset's)
    predictions: Path | None

    def method_options(self, method: str) -> dict[str, Any]:
        """:meth:`Segmenter.prepare`'s keyword arguments for ``method``."""
        preset = self.truth.preset(method)
        chosen = dict(self.options, method=method)
        if preset is not None:
            for name in ("short_side", "window", "stride"):
                if chosen[name] is None:
                    chosen[name] = getattr(preset, name)
        return chosen


Scored = tuple[tuple[str, ...], dict[Setting, Areas], dict[str, Any]]  # names, their counts, params


def _score_here(segmenter, run: _Run, method: str, pairs: Sequence[Pair], readers: int,
                finishers: int) -> Iterator[Scored]:
    """Score ``pairs`` with ``method`` in this process: reader threads, the model, finisher
    threads; one result per image, in order."""
    from concurrent.futures import ThreadPoolExecutor

    from napari_sclip._concurrency import bounded_map

    options = run.method_options(method)
    vocabulary = run.truth.vocabulary_for(method)

    def prepare(pair: Pair):
        image = _read_image(pair.image)
        try:
            return segmenter.prepare(image, vocabulary, tag=pair, **options)
        except ImageError as exc:  # too small, too many channels: say which file
            raise ImageError(f"{pair.image}: {exc}") from None

    with ThreadPoolExecutor(readers, thread_name_prefix="napari-sclip evaluate reader") as reading, \
            ThreadPoolExecutor(finishers, thread_name_prefix="napari-sclip evaluate finisher") as finishing:
        windows = segmenter.run_windows(bounded_map(reading, prepare, pairs, 2 * readers))
        # At most a few images' logits wait for their finishers (they may be on the GPU).
        for result in bounded_map(finishing, lambda item: _score_image(segmenter, run, method, *item), windows,
                                  2 * finishers):
            yield result


def _score_image(segmenter, run: _Run, method: str, image, canvas) -> Scored:
    """Every setting of ``method`` on one prepared image's logits."""
    pair, truth = image.tag, run.truth
    label = truth.label(pair)
    if label.shape != image.size:
        raise ImageError(f"{pair.label} is {label.shape[1]}x{label.shape[0]} but its image {pair.image} "
                         f"is {image.size[1]}x{image.size[0]}")
    areas, params = {}, {}
    for setting in run.settings:
        if setting.method != method:
            continue
        result = segmenter.finish(_decided(image, setting, truth), canvas)
        predicted = _class_indices(result.labels)
        areas[setting] = image_areas(predicted, label, len(truth.vocabulary), truth.ignore_index)
        if run.predictions is not None:
            _save_prediction(run.predictions / _slug(setting), pair.name, predicted)
        params = {key: value for key, value in result.params.items() if key not in _PER_SETTING}
    return (pair.name,), areas, params


#: Result parameters that vary by setting or image, left out of a report's per-method parameters.
_PER_SETTING = ("logit_scale", "prob_threshold", "background_class", "area_threshold", "resized_shape", "windows",
                "features_reused")


@dataclass(frozen=True)
class _Chunk:
    """A Dask task: one method on a few images."""

    run: _Run
    method: str
    pairs: tuple[Pair, ...]


def _score_chunk(chunk: _Chunk) -> Scored:
    """A worker's task: its images scored with its model (loaded once per worker), summed."""
    from napari_sclip.dataset.cluster import using_worker_segmenter

    settings = [setting for setting in chunk.run.settings if setting.method == chunk.method]
    tally = Tally.empty(settings, len(chunk.run.truth.vocabulary))
    with using_worker_segmenter() as model:
        for names, areas, params in _score_here(model, chunk.run, chunk.method, chunk.pairs, 1, 1):
            tally.add(chunk.method, names, areas, params)
    return tuple(pair.name for pair in chunk.pairs), tally.areas, tally.params.get(chunk.method, {})


def _score_on_cluster(client, segmenter, run: _Run, method: str, pairs: Sequence[Pair],
                      chunk_size: int) -> Iterator[Scored]:
    """Score ``pairs`` on ``client``'s workers, ``chunk_size`` images a task (the images and
    masks must be where the workers can read them); a task whose workers keep dying fails the
    run in one line."""
    from napari_sclip.dataset.cluster import ClusterError, install_segmenter, map_bounded
    from napari_sclip.engine.sources import registered_config

    if not pairs:
        return
    config = registered_config(segmenter.model_name)  # a repo or folder is read by the workers
    install_segmenter(client, {**segmenter.settings(), "feature_cache": False},
                      model_configs={segmenter.model_name: config} if config else None)
    # Each task carries its own images only: what it sends does not grow with the set.
    light = replace(run, truth=replace(run.truth, pairs=()))
    chunks = (_Chunk(light, method, tuple(pairs[k:k + chunk_size])) for k in range(0, len(pairs), chunk_size))
    threads = sum(client.nthreads().values()) or 1
    for _, scored in map_bounded(client, _score_chunk, chunks, max_in_flight=2 * threads,
                                 key_prefix="napari-sclip-evaluate", return_exceptions=True):
        if isinstance(scored, BaseException):
            if isinstance(scored, SclipError):
                raise scored
            raise ClusterError(f"a Dask task failed: {type(scored).__name__}: {scored}") from scored
        yield scored


def _decided(image, setting: Setting, truth: Truth):
    """``image`` (prepared) with ``setting``'s post-processing."""
    return replace(
        image,
        logit_scale=image.logit_scale if setting.logit_scale is None else float(setting.logit_scale),
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
