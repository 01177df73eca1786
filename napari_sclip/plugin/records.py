"""napari-sclip's record of each labels layer it works with, shared by the widget and review
sessions (napari, no Qt).

A record is the layer's :class:`~napari_sclip.plugin.state.LabelsState` and the tracker that
marks a person's strokes into its ``edited`` mask.  Records live here, keyed by the layer's
``unique_id`` (plugins see napari's proxies of layers, so identity is no key), never as live
objects in ``layer.metadata``: napari copies metadata shallowly, so a duplicated layer would share
them with its original.  Each change is also written into the metadata as plain data, which an
export and napari's own saving read.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from napari_sclip.plugin.edits import EditTracker
from napari_sclip.plugin.state import LabelsState


@dataclass
class LabelsRecord:
    """One labels layer's state, and the tracker marking a person's edits into ``state.edited``."""

    state: LabelsState
    tracker: EditTracker

    def store(self, layer) -> None:
        """Write the state into the layer's metadata (after a change)."""
        self.state.store(layer.metadata)


class LabelsRecords:
    """The records of the labels layers of every viewer in this process."""

    def __init__(self) -> None:
        from napari.utils.events import EmitterGroup

        self._records: dict[Hashable, LabelsRecord] = {}
        #: ``changed(value=unique_id)``: a layer got a new state, or its review mark changed; the
        #: widget and a review session showing that layer follow it.
        #: ``settle(value=unique_id)``: a run is about to write around a layer's edits; whoever
        #: can tell strokes undone from edits (a review) settles them first.
        self.events = EmitterGroup(source=self, changed=None, settle=None)

    def __contains__(self, layer) -> bool:
        return layer.unique_id in self._records

    def get(self, labels) -> LabelsRecord:
        """The record of ``labels``, made on first use from the layer's metadata (a layer
        napari-sclip did not make is adopted: its labels are someone's work)."""
        record = self._records.get(labels.unique_id)
        if record is None:
            state = LabelsState.from_metadata(labels.metadata, labels.data)
            record = self._records[labels.unique_id] = LabelsRecord(state, EditTracker(labels, state.edited))
            record.store(labels)
        return record

    def replace(self, labels, state: LabelsState) -> LabelsRecord:
        """Give ``labels`` a new state (its data changed to another image's labels)."""
        record = self.get(labels)
        record.state = state
        record.tracker.mask = state.edited
        record.store(labels)
        self.events.changed(value=labels.unique_id)
        return record

    def settle(self, labels) -> None:
        """Ask whoever shows ``labels`` to bring its edit mask up to date (before a run keeps it)."""
        self.events.settle(value=labels.unique_id)

    def changed(self, labels) -> None:
        """Tell whoever shows ``labels`` that its state changed (e.g. its review mark)."""
        self.events.changed(value=labels.unique_id)

    def forget(self, layer) -> None:
        """Drop the record of a layer removed from its viewer (if it has one)."""
        record = self._records.pop(layer.unique_id, None)
        if record is not None:
            record.tracker.disconnect()


#: One store per process: a review session and the widget see the same record of a layer.
RECORDS = LabelsRecords()
