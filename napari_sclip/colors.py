"""Stable class colours: label value ``v`` always gets the same colour, everywhere.

Colours step around the hue circle by the golden angle, so neighbouring label values look clearly
different, and alternate between two saturation/brightness levels to separate values whose hues
come close again.  Label 0 (unlabelled) is black.
"""

from __future__ import annotations

import colorsys

import numpy as np

_GOLDEN = 0.6180339887498949
_LEVELS = ((0.75, 0.95), (0.95, 0.75), (0.55, 0.85))  # (saturation, value)


def label_color(value: int) -> tuple[int, int, int]:
    """The RGB colour (0-255) of label ``value``; 0 is black."""
    if value <= 0:
        return (0, 0, 0)
    hue = (0.07 + (value - 1) * _GOLDEN) % 1.0
    saturation, brightness = _LEVELS[(value - 1) % len(_LEVELS)]
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, brightness)
    return (round(r * 255), round(g * 255), round(b * 255))


def label_palette(num_classes: int) -> np.ndarray:
    """``(num_classes + 1, 3)`` uint8 colours of label values ``0..num_classes``."""
    return np.array([label_color(v) for v in range(num_classes + 1)], dtype=np.uint8)
