"""Which pixels of a labels layer a person edited.

napari emits ``layer.events.paint`` for every brush stroke, fill and erase, with the changed
pixels.  :class:`EditTracker` marks them in a boolean mask the size of the layer (the layer's
:attr:`~napari_sclip.plugin.state.LabelsState.edited`), so that a re-run can keep them.  Writes
made by the plugin itself happen inside :meth:`EditTracker.suspended` and are not counted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np


class EditTracker:
    """Marks a labels layer's paint events in ``mask`` until :meth:`disconnect`."""

    def __init__(self, layer, mask: np.ndarray) -> None:
        self.layer = layer
        self.mask = mask
        self._suspended = 0
        layer.events.paint.connect(self._on_paint)

    def disconnect(self) -> None:
        self.layer.events.paint.disconnect(self._on_paint)

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Writes inside this block are the plugin's, not a person's."""
        self._suspended += 1
        try:
            yield
        finally:
            self._suspended -= 1

    def _on_paint(self, event) -> None:
        if self._suspended:
            return
        for atom in event.value:
            self.mark(atom)

    def mark(self, atom) -> None:
        """Mark the pixels of one history atom: a ``(indices, old, new)`` tuple, or a masked atom
        with ``slice_key`` and ``mask`` (``None`` meaning the whole box)."""
        slice_key = getattr(atom, "slice_key", None)
        if slice_key is None:
            indices = atom[0]
            self.mask[tuple(indices)] = True
        elif atom.mask is None:
            self.mask[slice_key] = True
        else:
            self.mask[slice_key] |= atom.mask
