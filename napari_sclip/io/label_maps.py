"""Writing label maps as indexed PNGs, with a ``classes.json`` legend.

This is the CLI's simple output format: one palette PNG per image whose pixel values are label
values (0 unlabelled, ``i + 1`` for class ``i``) and whose palette holds the class colours, so it
opens in any viewer in colour and in any loader as integers.  Files are written atomically.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_sclip._files import atomic_write
from napari_sclip.colors import label_color, label_palette

UNLABELLED = "unlabelled"


def write_label_png(path: Path, labels: np.ndarray, num_classes: int) -> None:
    """Write ``labels`` (H, W) as an indexed PNG with the class palette.

    More than 255 classes do not fit a palette: the map is then written as a 16-bit grayscale PNG
    (same values, no colours) and a warning says so.
    """
    from PIL import Image

    # putpalette turns the 8-bit grayscale image into a palette ("P") image.
    if num_classes <= 255:
        image = Image.fromarray(labels.astype(np.uint8, copy=False))
        image.putpalette(label_palette(num_classes).ravel().tolist())
    else:
        warnings.warn(
            f"{num_classes} classes do not fit an 8-bit palette; {path.name} is a 16-bit "
            "grayscale PNG without colours",
            stacklevel=2,
        )
        image = Image.fromarray(labels.astype(np.uint16, copy=False))
    atomic_write(path, lambda handle: image.save(handle, format="PNG"))


def write_classes_json(
    path: Path, classes: Sequence[Sequence[str]], params: dict[str, Any] | None = None
) -> None:
    """Write the legend: label value -> class name, synonyms and colour, plus how labels were made."""
    legend = [{"value": 0, "name": UNLABELLED, "synonyms": [], "color": list(label_color(0))}]
    legend += [
        {"value": i, "name": names[0], "synonyms": list(names[1:]), "color": list(label_color(i))}
        for i, names in enumerate(classes, start=1)
    ]
    document = {"classes": legend, "params": params or {}}
    text = json.dumps(document, indent=2, default=str) + "\n"
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
