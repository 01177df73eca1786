"""Region corrections (no window): the connected region, the pixels below a confidence, the
pixel counts, against plain references; one write through napari's history."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from napari_sclip.plugin.corrections import (
    below_confidence,
    class_pixel_counts,
    region_at,
    set_pixels,
)


def _flood(labels, start):
    """A plain 4-connected flood fill: the reference for region_at."""
    seen = np.zeros(labels.shape, bool)
    value = labels[start]
    queue = deque([start])
    seen[start] = True
    while queue:
        r, c = queue.popleft()
        for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            rr, cc = r + dr, c + dc
            if 0 <= rr < labels.shape[0] and 0 <= cc < labels.shape[1] and not seen[rr, cc] and labels[rr, cc] == value:
                seen[rr, cc] = True
                queue.append((rr, cc))
    return seen


@pytest.mark.parametrize("seed", range(5))
def test_the_region_is_the_4_connected_pixels_of_the_clicked_value(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, (30, 40)).astype(np.uint8)
    labels[rng.random((30, 40)) < 0.5] = 1  # large connected blobs of 1
    for _ in range(10):
        point = (int(rng.integers(0, 30)), int(rng.integers(0, 40)))
        np.testing.assert_array_equal(region_at(labels, point), _flood(labels, point))
    diagonal = np.eye(4, dtype=np.uint8)  # touching at corners only: four regions
    assert region_at(diagonal, (0, 0)).sum() == 1
    assert not region_at(labels, (30, 0)).any() and not region_at(labels, (-1, 5)).any()
    assert not region_at(labels, (float("nan"), 5)).any()  # the cursor off the canvas
    assert region_at(labels, (2.4, 3.6)).sum() == _flood(labels, (2, 4)).sum()  # rounded


def test_below_confidence_leaves_ignore_alone():
    labels = np.array([[0, 1, 2], [2, 2, 0]], np.uint8)
    confidence = np.array([[0.1, 0.4, 0.5], [0.49, 0.9, 0.2]], np.float32)
    np.testing.assert_array_equal(below_confidence(labels, confidence, 0.5), [[False, True, False], [True, False, False]])


def test_pixel_counts_per_value():
    labels = np.array([[0, 1, 1], [300, 300, 300]], np.uint16)
    assert class_pixel_counts(labels) == {0: 1, 1: 2, 300: 3}
    assert class_pixel_counts(labels.astype(np.int64)) == {0: 1, 1: 2, 300: 3}
    assert class_pixel_counts(np.ones((2, 2), np.uint8)) == {0: 0, 1: 4}


def test_a_correction_is_one_undo_step_and_counts_as_an_edit():
    from napari.layers import Labels

    from napari_sclip.plugin.edits import EditTracker

    data = np.zeros((20, 20), np.uint8)
    data[:10] = 1
    layer = Labels(data.copy())
    edited = np.zeros(data.shape, bool)
    tracker = EditTracker(layer, edited)  # held here: napari holds its callback weakly
    mask = region_at(layer.data, (0, 0))
    assert set_pixels(layer, mask, 2) == 200
    assert (layer.data[:10] == 2).all() and (layer.data[10:] == 0).all()
    np.testing.assert_array_equal(edited, mask)
    assert set_pixels(layer, mask, 2) == 0  # nothing left to change: no history step
    layer.undo()
    np.testing.assert_array_equal(layer.data, data)
    tracker.disconnect()
