"""Stable train/val/test assignment: a function of the image id alone.

The id's SHA-256 gives a number in [0, 1); cumulative ratios cut that interval.  Adding images
never moves the existing ones, and the same id lands in the same split on every machine.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from numbers import Real

DEFAULT_RATIOS = {"train": 0.8, "val": 0.2}
SPLIT_NAMES = ("train", "val", "test")


def check_ratios(ratios: Mapping[str, float]) -> dict[str, float]:
    """Validate split ratios: names from train/val/test, non-negative, summing to 1."""
    from napari_sclip.dataset.paths import DatasetError

    unknown = set(ratios) - set(SPLIT_NAMES)
    if unknown:
        raise DatasetError(f"unknown split(s) {sorted(unknown)}; use {', '.join(SPLIT_NAMES)}")
    values = ratios.values()
    if (
        not all(isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in values)
        or abs(sum(values) - 1.0) > 1e-6
    ):
        raise DatasetError(f"split ratios must be non-negative numbers that sum to 1, got {dict(ratios)}")
    return {name: float(ratios[name]) for name in SPLIT_NAMES if name in ratios}


def unit_interval(image_id: str) -> float:
    """A number in [0, 1) fixed by ``image_id``."""
    digest = hashlib.sha256(image_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(image_id: str, ratios: Mapping[str, float] = DEFAULT_RATIOS) -> str:
    """The split of ``image_id`` under ``ratios`` (in train, val, test order)."""
    ratios = check_ratios(ratios)
    point = unit_interval(image_id)
    edge = 0.0
    chosen = next(iter(ratios))
    for name, share in ratios.items():
        edge += share
        chosen = name
        if point < edge:
            break
    return chosen
