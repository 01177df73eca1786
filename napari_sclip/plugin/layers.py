"""Creating and updating the labels and confidence layers (napari, no Qt)."""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from napari_sclip.classes import ClassRegistry
from napari_sclip.colors import label_color

if TYPE_CHECKING:
    import pandas as pd

#: Shown for label values that no class owns (e.g. painted with a free label number).
UNKNOWN_COLOR = (0.6, 0.6, 0.6, 1.0)


def labels_name(image_name: str) -> str:
    return f"{image_name} labels"


def confidence_name(image_name: str) -> str:
    return f"{image_name} confidence"


def class_colormap(registry: ClassRegistry, ignore: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)):
    """A ``DirectLabelColormap``: every class ever known keeps its colour; 0 (unlabelled, which
    exports as ignore) is transparent unless ``ignore`` gives it a colour."""
    from napari.utils.colormaps import DirectLabelColormap

    colors: dict[int | None, tuple[float, ...]] = {0: ignore, None: UNKNOWN_COLOR}
    for uid in registry.names:
        r, g, b = label_color(uid)
        colors[uid] = (r / 255, g / 255, b / 255, 1.0)
    return DirectLabelColormap(color_dict=colors)


def class_features(registry: ClassRegistry) -> pd.DataFrame:
    """One row per class (current and retired): napari shows ``class_name`` under the cursor."""
    import pandas as pd  # 0.2 s: imported in the background by the widget's engine_loader

    uids = sorted(registry.names)
    return pd.DataFrame(
        {
            "index": [0, *uids],
            "class_name": ["unlabelled", *(registry.display_name(u) for u in uids)],
            "synonyms": ["", *(", ".join(registry.names[u][1:]) for u in uids)],
        }
    )


def style_labels_layer(layer, registry: ClassRegistry) -> None:
    """Apply colours and the class table to ``layer``."""
    layer.colormap = class_colormap(registry)
    layer.features = class_features(registry)


@contextlib.contextmanager
def locked(layer) -> Iterator[None]:
    """The layer refuses a person's edits inside this block, so that no stroke slips into the
    plugin's undo step; its mode (brush, fill, ...) and selected label come back afterwards
    (napari switches a layer that stops being editable to pan/zoom)."""
    editable, mode, selected = layer.editable, layer.mode, layer.selected_label
    layer.editable = False
    try:
        yield
    finally:
        layer.editable = editable
        if editable:
            layer.mode = mode
        layer.selected_label = selected


def label_values(data) -> list[int]:
    """The non-zero values present in ``data``, ascending (a histogram for 8- and 16-bit data,
    which is much faster than sorting)."""
    data = np.asarray(data)
    if data.dtype in (np.uint8, np.uint16):
        return [int(v) for v in np.flatnonzero(np.bincount(data.ravel(), minlength=1)) if v]
    return [int(v) for v in np.unique(data) if v != 0]


def values_present(data, values: Iterable[int]) -> set[int]:
    """Which of ``values`` label at least one pixel of ``data``, read one 2D slice at a time and
    stopping once all are found."""
    wanted = set(values)
    found: set[int] = set()
    for index in np.ndindex(*np.shape(data)[:-2]):
        if found == wanted:
            break
        found |= wanted.intersection(label_values(data[index]))
    return found


def write_labels(layer, region: tuple, new_values: np.ndarray, keep: np.ndarray | None) -> int:
    """Write ``new_values`` into ``layer.data[region]`` through napari's undo history.

    ``keep`` marks pixels that must not change (a person's edits).  Returns how many pixels
    changed.  Call it inside ``layer.block_history()`` so that all writes of one run are a
    single Ctrl+Z.
    """
    current = np.asarray(layer.data[region])
    changed = current != new_values
    if keep is not None:
        changed &= ~keep
    if not changed.any():
        return 0
    local = np.nonzero(changed)
    offsets = [(s.start or 0) if isinstance(s, slice) else s for s in region]
    full_index = _global_index(region, local, offsets)
    layer.data_setitem(full_index, new_values[changed], refresh=True)
    return int(changed.sum())


def iter_write_labels(
    layer, region: tuple, new_values: np.ndarray, keep: np.ndarray | None, band_pixels: int = 1 << 17
) -> Generator[None, None, int]:
    """:func:`write_labels` in bands of rows of about ``band_pixels`` pixels, yielding after each
    band so that the caller can let the GUI's event loop run; returns how many pixels changed."""
    rows, width = new_values.shape
    band = max(1, band_pixels // max(width, 1))
    changed = 0
    for r0 in range(0, rows, band):
        r1 = min(r0 + band, rows)
        band_region = (*region[:-2], slice(r0, r1), region[-1])
        band_keep = None if keep is None else keep[r0:r1]
        changed += write_labels(layer, band_region, new_values[r0:r1], band_keep)
        yield
    return changed


def _global_index(region: tuple, local: tuple[np.ndarray, ...], offsets: list[int]) -> tuple[np.ndarray, ...]:
    """Turn indices within ``layer.data[region]`` into indices of the whole array."""
    index: list[np.ndarray] = []
    axis = 0
    for part, offset in zip(region, offsets):
        if isinstance(part, slice):
            index.append(local[axis] + offset)
            axis += 1
        else:  # an integer index: a fixed slice position
            index.append(np.full(local[0].shape, part, dtype=np.intp))
    return tuple(index)
