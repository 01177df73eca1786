"""Writing a segmentation run's results into a labels layer (napari, no Qt).

A new layer gets the results as its data (nothing to undo or protect).  A re-run writes around
the pixels a person edited, as one undo step, in bands of rows, so that the caller can let the
GUI's event loop run between them.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence

import numpy as np

from napari_sclip.plugin.layers import iter_write_labels, locked
from napari_sclip.plugin.records import LabelsRecord
from napari_sclip.plugin.runner import SliceResult, slice_regions


def new_labels(shape: tuple[int, ...], results: Sequence[SliceResult]) -> np.ndarray:
    """The data of a new labels layer: each result in its region, unlabelled elsewhere."""
    data = np.zeros(shape, results[0].labels.dtype)
    for item in results:
        data[item.region] = item.labels
    return data


def update_labels(
    labels, record: LabelsRecord, results: Sequence[SliceResult], retired: Sequence[int], overwrite: bool
) -> Generator[None, None, int]:
    """Write a re-run's results into ``labels`` around the person's edits (all of them with
    ``overwrite``, which forgets the edits), as one undo step; pixels of the ``retired`` classes
    become unlabelled, edited or not (the person agreed).  Yields after each band; returns how
    many pixels changed.

    The layer is not editable meanwhile, so no stroke can slip into the run's undo step.
    """
    edited = record.state.edited
    changed = 0
    with locked(labels), record.tracker.suspended(), labels.block_history():
        for item in results:
            new = item.labels.astype(labels.data.dtype, copy=False)
            keep = None if overwrite else edited[item.region]
            if len(retired) and keep is not None:
                stale = keep & np.isin(np.asarray(labels.data[item.region]), retired)
                new = np.where(stale, 0, new).astype(new.dtype)
                keep = keep & ~stale
            changed += yield from iter_write_labels(labels, item.region, new, keep)
            if overwrite:
                edited[item.region] = False
        if len(retired):  # slices this run did not segment may still hold removed classes
            done = [item.region for item in results]  # slices are unhashable before 3.12
            for region in slice_regions(labels.data.shape, False, None):
                if region in done:
                    continue
                current = np.asarray(labels.data[region])
                stale = np.isin(current, retired)
                if stale.any():
                    cleared = np.where(stale, 0, current).astype(current.dtype)
                    changed += yield from iter_write_labels(labels, region, cleared, None)
    return changed
