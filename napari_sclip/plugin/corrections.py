"""Correcting a labels layer faster than drawing (napari, no Qt): whole regions at a time.

Each correction is one write through napari's history (one Ctrl+Z), and its pixels count as a
person's edits (the layer's edit tracker sees napari's paint event).  Label 0 is "ignore": the
exported masks store it as the ignore value (255), and a person's 0 is recorded as
"set to ignore" in the sample's provenance.
"""

from __future__ import annotations

import numpy as np

from napari_sclip.dataset.format import value_counts
from napari_sclip.plugin.layers import label_values

IGNORE = 0


def region_at(labels: np.ndarray, point: tuple[int, int]) -> np.ndarray:
    """The connected region (4-connected pixels of one value) of the 2D ``labels`` that holds
    ``point``, as a boolean mask; empty when ``point`` is outside."""
    from skimage.segmentation import flood

    labels = np.asarray(labels)
    if not all(np.isfinite(point)):  # the cursor off the canvas
        return np.zeros(labels.shape, bool)
    row, col = (int(round(c)) for c in point)
    if not (0 <= row < labels.shape[0] and 0 <= col < labels.shape[1]):
        return np.zeros(labels.shape, bool)
    # A flood fill (4-connectivity, as napari's fill bucket): a byte a pixel, where labelling
    # every component of a huge image would cost eight.
    return flood(labels, (row, col), connectivity=1)


def below_confidence(labels: np.ndarray, confidence: np.ndarray, threshold: float) -> np.ndarray:
    """The labelled pixels whose confidence is below ``threshold``: what "accept by confidence"
    sets to ignore."""
    return (np.asarray(labels) != IGNORE) & (np.asarray(confidence) < threshold)


def set_pixels(layer, mask: np.ndarray, value: int) -> int:
    """Set the pixels of the 2D labels ``layer`` where ``mask`` holds to ``value``, as one step of
    napari's undo history; returns how many changed."""
    current = np.asarray(layer.data)
    changed = mask & (current != value)
    if not changed.any():
        return 0
    with layer.block_history():
        layer.data_setitem(np.nonzero(changed), value, refresh=True)
    return int(changed.sum())


def class_pixel_counts(labels: np.ndarray) -> dict[int, int]:
    """Pixels per label value present (ignore included), for the class list."""
    labels = np.asarray(labels)
    if labels.dtype in (np.uint8, np.uint16):
        histogram = value_counts(labels, np.iinfo(labels.dtype).max + 1)
        return {IGNORE: int(histogram[IGNORE]), **{int(v): int(histogram[v]) for v in np.flatnonzero(histogram) if v}}
    counts = {value: 0 for value in (IGNORE, *label_values(labels))}
    values, numbers = np.unique(labels, return_counts=True)
    found = dict(zip(values.tolist(), numbers.tolist()))
    return {value: int(found.get(value, 0)) for value in counts}
