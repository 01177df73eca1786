"""A dataset's review queue (no napari): which samples a reviewer sees, in which order, and how
many are done.

The queue is built from the owner's in-memory entries (:class:`~napari_sclip.dataset.writer.Entry`,
read from the journal on open), so ordering and filtering a dataset of any size reads no image,
mask or meta file: each sample's classes and confidence come from the summary recorded when it
was written (:class:`~napari_sclip.dataset.writer.Summary`).  Samples written before summaries
existed have none: they sort after the others and match no class filter until they are saved again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from napari_sclip.dataset.splits import SPLIT_NAMES
from napari_sclip.dataset.writer import CONFIDENCE_STEPS, Entry, journal_firsts

#: Review statuses, as meta files and indexes record them.
UNREVIEWED, EDITED, REVIEWED = "unreviewed", "edited", "reviewed"
#: The queue's orders, by the names the review panel shows.
ORDERS = ("unreviewed first", "least confident first", "most uncertain pixels first", "by split", "by name")
#: The status filter's choices: everything, one status, or all but reviewed.
STATUS_FILTERS = ("all", "not reviewed", UNREVIEWED, EDITED, REVIEWED)
_STATUS_RANK = {UNREVIEWED: 0, EDITED: 1, REVIEWED: 2}


@dataclass(frozen=True)
class QueueOptions:
    """How the queue is ordered and filtered: one field per control of the review panel.

    Attributes
    ----------
    order
        One of :data:`ORDERS`.  "most uncertain pixels first" counts the pixels whose confidence is
        below ``threshold``.
    threshold
        A confidence threshold, one of 0.1, 0.2, ..., 0.9.
    status
        One of :data:`STATUS_FILTERS`.
    split
        ``"all"`` or one split's name.
    class_id
        Only samples whose mask holds this training id (``None``: any).
    """

    order: str = "unreviewed first"
    threshold: float = 0.5
    status: str = "all"
    split: str = "all"
    class_id: int | None = None

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, not {self.order!r}")
        if self.status not in STATUS_FILTERS:
            raise ValueError(f"status must be one of {', '.join(STATUS_FILTERS)}, not {self.status!r}")
        if self.split != "all" and self.split not in SPLIT_NAMES:
            raise ValueError(f"split must be 'all' or one of {', '.join(SPLIT_NAMES)}, not {self.split!r}")
        if not any(abs(self.threshold - step) < 1e-9 for step in CONFIDENCE_STEPS):
            raise ValueError(f"threshold must be one of {', '.join(map(str, CONFIDENCE_STEPS))}")


@dataclass(frozen=True)
class Counts:
    """How far a review is: samples reviewed, edited (changed, not marked reviewed) and unreviewed (untouched)."""

    reviewed: int
    edited: int
    unreviewed: int

    @property
    def total(self) -> int:
        return self.reviewed + self.edited + self.unreviewed

    def moved(self, before: str, after: str) -> Counts:
        """These counts once one sample's status went from ``before`` to ``after``."""
        tally = {REVIEWED: self.reviewed, EDITED: self.edited, UNREVIEWED: self.unreviewed}
        tally[_known(before)] -= 1
        tally[_known(after)] += 1
        return Counts(tally[REVIEWED], tally[EDITED], tally[UNREVIEWED])


def counts(entries: Mapping[str, Entry]) -> Counts:
    """The counts over every sample of a dataset."""
    tally = {UNREVIEWED: 0, EDITED: 0, REVIEWED: 0}
    for entry in entries.values():
        tally[_status(entry)] += 1
    return Counts(tally[REVIEWED], tally[EDITED], tally[UNREVIEWED])


def queue(entries: Mapping[str, Entry], options: QueueOptions) -> list[str]:
    """The ids of the samples ``options`` keeps, in its order (ties by split, then id)."""
    kept = [(image_id, entry) for image_id, entry in entries.items() if _kept(entry, options)]
    key = _ORDER_KEYS[options.order]
    step = min(range(len(CONFIDENCE_STEPS)), key=lambda k: abs(CONFIDENCE_STEPS[k] - options.threshold))
    kept.sort(key=lambda item: (*key(item[0], item[1], step), SPLIT_NAMES.index(item[1].split), item[0]))
    return [image_id for image_id, _ in kept]


def first_to_review(root: Path) -> tuple[str, str] | None:
    """``(split, id)`` of the sample a review with the default options most likely opens at (the
    queue's first sample not reviewed), from the first rows of the dataset's journal alone;
    ``None`` without a journal.  Opening shows it while the owner reads the whole index."""
    firsts = journal_firsts(root, UNREVIEWED)
    if not firsts:
        return None
    entry_id, entry = min(firsts.values(), key=lambda item: (
        *_ORDER_KEYS[QueueOptions().order](item[0], item[1], 0), SPLIT_NAMES.index(item[1].split), item[0]))
    return entry.split, entry_id


def _status(entry: Entry) -> str:
    return _known(entry.review_status)


def _known(status: str) -> str:
    """A status as counted: anything but edited or reviewed counts as unreviewed."""
    return status if status in _STATUS_RANK else UNREVIEWED


def _kept(entry: Entry, options: QueueOptions) -> bool:
    status = _status(entry)
    if options.status == "not reviewed" and status == REVIEWED:
        return False
    if options.status not in ("all", "not reviewed") and status != options.status:
        return False
    if options.split != "all" and entry.split != options.split:
        return False
    return options.class_id is None or (entry.summary is not None and options.class_id in entry.summary.classes)


def _unknown_last(value: float | None) -> tuple:
    return (1, 0.0) if value is None else (0, value)


_ORDER_KEYS = {  # (id, entry, threshold step) -> the start of the sort key
    "unreviewed first": lambda image_id, entry, step: (_STATUS_RANK[_status(entry)],),
    "least confident first": lambda image_id, entry, step: _unknown_last(
        entry.summary.mean_confidence if entry.summary is not None else None),
    "most uncertain pixels first": lambda image_id, entry, step: _unknown_last(
        -entry.summary.confidence_below[step]
        if entry.summary is not None and entry.summary.confidence_below is not None else None),
    "by split": lambda image_id, entry, step: (),
    "by name": lambda image_id, entry, step: (image_id,),
}
