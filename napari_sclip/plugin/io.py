"""napari's reader for pseudo-label datasets, and labels layers as exportable samples.

A dataset (napari offers us only its ``dataset.json``) opens in a review panel that shows one sample
at a time (:mod:`.review`), so that editing continues where it stopped.  Labels
layers (with their images) export as a dataset through the widget: the slices that hold model
labels or edits.  There is no npe2 writer: napari would pick one with no file extension for every
extensionless save of images with labels, in place of its own "Save to Folder".
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from napari_sclip.classes import ClassRegistry
from napari_sclip.plugin.layers import (
    label_values,
)
from napari_sclip.plugin.state import LabelsState


def get_reader(path: str | list[str]) -> Callable[[str], list[tuple]] | None:
    """npe2 reader hook: a reader for a napari-sclip dataset's manifest (or folder), else ``None``."""
    from napari_sclip.dataset.reader import find_dataset_root

    if isinstance(path, list):
        path = path[0] if len(path) == 1 else None
    return read_dataset if path is not None and find_dataset_root(path) is not None else None


def read_dataset(path: str) -> list[tuple]:
    """Open the dataset at ``path`` for review in the current viewer (its review panel, showing
    one sample at a time), and give napari no layers of its own: a dataset of any size opens at
    once, and its layers are the review's."""
    import napari

    from napari_sclip.dataset.paths import DatasetError
    from napari_sclip.plugin.review_panel import show_review

    viewer = napari.current_viewer()
    if viewer is None:
        raise DatasetError(f"open {path} in a napari window (or with 'napari-sclip review')")
    show_review(viewer, path)
    return [(None,)]  # napari's "read, and nothing to add"


def labelled_images(image_data, image_meta: dict, labels_data, labels_meta: dict, confidence=None) -> list:
    """The :class:`~napari_sclip.dataset.export.LabelledImage` of every 2D slice of a labels layer
    that holds model labels or a person's edits (see :meth:`LabelsState.labelled_slices`), from
    napari layer data and metadata; a stack's slice ``i`` is named like the CLI names it.

    Labels are copied, so a person may go on painting while they are written.  Every value
    present gets a class: its own, else (painted with a number no class has) "label <value>".
    """
    from napari_sclip.dataset.export import LabelledImage, plane_stem

    state = LabelsState.from_metadata(labels_meta.get("metadata") or {}, labels_data)
    name = image_meta["name"]
    # A 2D image read from a file (or from a dataset) is copied as is; stacks go slice by slice.
    source = (image_meta.get("metadata") or {}).get("dataset_image") or (image_meta.get("source") or {}).get("path")
    source_path = Path(source) if source and Path(source).is_file() and np.ndim(labels_data) == 2 else None
    rgb = bool(image_meta.get("rgb", False))
    items = []
    for index in state.labelled_slices():
        labels = np.array(labels_data[index])
        items.append(LabelledImage(
            name=plane_stem(name, index) if index else name,
            image=image_data[index],
            labels=labels,
            registry=export_classes(state.classes, labels),
            rgb=rgb,
            confidence=None if confidence is None else np.asarray(confidence[index]),
            edited=state.edited[index].copy(),
            source=source_path,
            meta={**state.slices.get(index, {}), **({"slice": list(index)} if index else {}),
                  "review_status": state.review_status},
        ))
    return items


def export_classes(classes: ClassRegistry, labels: np.ndarray) -> ClassRegistry:
    """``classes`` with every value present in ``labels`` active, named "label <value>" if no
    class has it, so that an export (or a review's save) keeps every labelled pixel."""
    present = [v for v in label_values(labels) if v not in classes.active]
    names = {**classes.names, **{v: (f"label {v}",) for v in present if v not in classes.names}}
    return ClassRegistry(names, [*classes.active, *present])
