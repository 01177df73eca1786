"""Slide-inference geometry: where windows go and how the resize sizes the image."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from napari_sclip.engine.config import LONG_SIDE_CAP


class Window(NamedTuple):
    """A crop ``image[y1:y2, x1:x2]`` of the resized image."""

    y1: int
    y2: int
    x1: int
    x2: int


def window_starts(length: int, window: int, stride: int) -> list[tuple[int, int]]:
    """The ``(start, stop)`` of every window along one axis of ``length`` pixels.

    There are ``max(length - window + stride - 1, 0) // stride + 1`` windows; each is moved by
    ``stride`` and the last one is shifted back so that it ends at the border.  Along an axis
    shorter than ``window`` the single window covers the whole axis.
    """
    count = max(length - window + stride - 1, 0) // stride + 1
    spans = []
    for i in range(count):
        stop = min(i * stride + window, length)
        spans.append((max(stop - window, 0), stop))
    return spans


def slide_windows(height: int, width: int, window: int, stride: int) -> list[Window]:
    """All windows over a ``height x width`` image, in row-major order."""
    rows = window_starts(height, window, stride)
    cols = window_starts(width, window, stride)
    return [Window(y1, y2, x1, x2) for (y1, y2) in rows for (x1, x2) in cols]


def window_counts(height: int, width: int, windows: list[Window]) -> np.ndarray:
    """How many windows cover each pixel: the divisor of the logit canvas."""
    counts = np.zeros((height, width), np.int32)
    for y1, y2, x1, x2 in windows:
        counts[y1:y2, x1:x2] += 1
    return counts


def resized_shape(
    height: int, width: int, short_side: int, min_side: int = 1, long_cap: int = LONG_SIDE_CAP
) -> tuple[int, int]:
    """The size the image is resized to before slide inference.

    ``scale = min(long_cap / long_side, short_side / short_side_of_image)`` keeps the aspect ratio,
    and each side becomes ``int(side * scale + 0.5)``, as in the authors' pipeline.  Sides are
    raised to at least ``min_side`` (the patch size) so that extremely thin images still give one
    row of patches.
    """
    scale = min(long_cap / max(height, width), short_side / min(height, width))
    new_h = max(int(height * scale + 0.5), min_side)
    new_w = max(int(width * scale + 0.5), min_side)
    return new_h, new_w
