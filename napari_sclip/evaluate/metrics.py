"""The semantic-segmentation score of MMSegmentation's ``IoUMetric`` (mmseg 1.x), in numpy.

Per image, pixels whose ground truth is ``ignore_index`` are dropped, then four per-class pixel
counts are taken (intersection, union, prediction, ground truth).  Counts are summed over the
whole set before dividing, so large images weigh more than small ones, as in mmseg.  Values
outside ``0..C-1`` fall in no class: a prediction of 255 ("unlabelled") adds to no class's
prediction area but still costs recall, because its ground-truth pixel is counted.

IoU and Acc are NaN where undefined (0/0); the means skip NaN, so a class absent from both
prediction and ground truth does not count, while a class only predicted scores IoU 0 and does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

IGNORE_INDEX = 255


@dataclass(eq=False)
class Areas:
    """Per-class pixel counts, each an int64 array of shape (C,); they add across images."""

    intersect: np.ndarray
    union: np.ndarray
    pred: np.ndarray
    label: np.ndarray

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, np.asarray(getattr(self, f.name), dtype=np.int64))
        shapes = {getattr(self, f.name).shape for f in fields(self)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(f"areas must be four 1-D arrays of one length, got shapes {shapes}")

    @property
    def num_classes(self) -> int:
        return len(self.intersect)

    @classmethod
    def zeros(cls, num_classes: int) -> Areas:
        return cls(*(np.zeros(num_classes, np.int64) for _ in range(4)))

    def _check(self, other: Areas) -> None:
        if other.num_classes != self.num_classes:
            raise ValueError(
                f"cannot add areas of {other.num_classes} and {self.num_classes} classes"
            )

    def __add__(self, other: Areas) -> Areas:
        self._check(other)
        return Areas(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __iadd__(self, other: Areas) -> Areas:
        self._check(other)
        for f in fields(self):  # in place: a running total over many images
            mine = getattr(self, f.name)
            np.add(mine, getattr(other, f.name), out=mine)
        return self

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Areas):
            return NotImplemented
        return all(
            np.array_equal(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)
        )

    def to_json(self) -> dict[str, list[int]]:
        """Plain lists, so a run can be resumed, or merged from Dask workers."""
        return {f.name: getattr(self, f.name).tolist() for f in fields(self)}

    @classmethod
    def from_json(cls, value: dict[str, list[int]]) -> Areas:
        return cls(**{f.name: value[f.name] for f in fields(cls)})


def image_areas(
    pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> Areas:
    """The counts of one image: ``pred`` and ``label`` are integer arrays of one shape (H, W)."""
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.ndim != 2 or pred.shape != label.shape:
        raise ValueError(f"pred {pred.shape} and label {label.shape} must be one 2-D shape (H, W)")
    if not (np.issubdtype(pred.dtype, np.integer) and np.issubdtype(label.dtype, np.integer)):
        raise TypeError(f"pred and label must be integer, got {pred.dtype} and {label.dtype}")
    # int64 so that comparing with ignore_index, or with each other, never wraps.
    pred = pred.reshape(-1).astype(np.int64)
    label = label.reshape(-1).astype(np.int64)
    keep = label != ignore_index
    pred, label = pred[keep], label[keep]
    # Like torch.histc(min=0, max=C-1) on integers: out-of-range values land in no bin.
    pred_in = (pred >= 0) & (pred < num_classes)
    label_in = (label >= 0) & (label < num_classes)
    area_pred = np.bincount(pred[pred_in], minlength=num_classes)
    area_label = np.bincount(label[label_in], minlength=num_classes)
    intersect = np.bincount(pred[pred_in & (pred == label)], minlength=num_classes)
    return Areas(intersect, area_pred + area_label - intersect, area_pred, area_label)


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's ``reduce_zero_label``: 0 becomes 255 (ignored), v becomes v-1, 255 stays 255.

    Returns a new array of the same dtype; 256 (uint16) also ends at 255, exactly as in mmseg.
    """
    work = np.asarray(label).astype(np.int64)  # unsigned 0-1 would wrap
    work[work == 0] = IGNORE_INDEX
    work -= 1
    work[work == IGNORE_INDEX - 1] = IGNORE_INDEX
    return work.astype(np.asarray(label).dtype)


def _nanmean(values: np.ndarray) -> float:
    # np.nanmean warns on an all-NaN slice; the answer (NaN) is the one we want, quietly.
    if np.isnan(values).all():
        return float("nan")
    return float(np.nanmean(values))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(num / den, dtype=np.float64)  # int/int: 0/0 is NaN


def json_fraction(value: float) -> float | None:
    """A fraction for JSON: ``None`` for NaN (undefined)."""
    return None if np.isnan(value) else float(value)


@dataclass(frozen=True, eq=False)
class Scores:
    """Per-class IoU and Acc, float64 of shape (C,), NaN where undefined; means as fractions."""

    class_names: tuple[str, ...]
    iou: np.ndarray
    acc: np.ndarray
    miou: float
    macc: float
    aacc: float
    areas: Areas

    def to_json(self) -> dict:
        """Fractions (0..1), NaN as None, plus the areas so the set can be merged or resumed."""
        return {
            "miou": json_fraction(self.miou),
            "macc": json_fraction(self.macc),
            "aacc": json_fraction(self.aacc),
            "classes": {
                name: {"iou": json_fraction(iou), "acc": json_fraction(acc)}
                for name, iou, acc in zip(self.class_names, self.iou, self.acc)
            },
            "areas": self.areas.to_json(),
        }

    def table(self, *, digits: int = 1) -> str:
        """Plain text: one row per class (IoU and Acc in percent), then mIoU, mAcc and aAcc."""

        def cell(value: float) -> str:
            return "-" if np.isnan(value) else f"{100 * value:.{digits}f}"

        width = max([len("class"), *map(len, self.class_names)])
        rows = [f"{'class':<{width}}  {'IoU':>7}  {'Acc':>7}"]
        for name, iou, acc in zip(self.class_names, self.iou, self.acc):
            rows.append(f"{name:<{width}}  {cell(iou):>7}  {cell(acc):>7}")
        rows.append("-" * len(rows[0]))
        for name, value in (("mIoU", self.miou), ("mAcc", self.macc), ("aAcc", self.aacc)):
            rows.append(f"{name:<{width}}  {cell(value):>7}")
        return "\n".join(rows)


def scores(areas: Areas, class_names: Sequence[str]) -> Scores:
    """The scores of counts summed over a set; ``class_names`` has one unique name per class."""
    names = tuple(class_names)
    if len(names) != areas.num_classes or len(set(names)) != len(names):
        raise ValueError(f"need {areas.num_classes} unique class names, got {names}")
    iou = _ratio(areas.intersect, areas.union)
    acc = _ratio(areas.intersect, areas.label)
    aacc = float(_ratio(areas.intersect.sum(), areas.label.sum()))
    return Scores(names, iou, acc, _nanmean(iou), _nanmean(acc), aacc, areas)
