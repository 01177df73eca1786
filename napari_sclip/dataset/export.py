"""Exporting labelled images (arrays, as napari holds them) into a dataset folder (no napari)."""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_sclip.classes import ClassConflict, ClassRegistry
from napari_sclip.dataset.paths import DatasetError
from napari_sclip.dataset.writer import DatasetWriter, Sample
from napari_sclip.engine.progress import drive


@dataclass
class LabelledImage:
    """An image and its labels: 2D, or stacks whose 2D slices become separate samples.

    ``rgb`` says whether the image's last axis holds colour channels.  ``source`` is the image
    file it came from, if any (copied as is for 2D images).
    """

    name: str
    image: np.ndarray
    labels: np.ndarray
    registry: ClassRegistry
    rgb: bool = False
    confidence: np.ndarray | None = None
    edited: np.ndarray | None = None
    source: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def merge_registries(registries: Sequence[ClassRegistry]) -> ClassRegistry:
    """One class table for several layers (their vocabularies in turn); a uid naming two
    different classes is an error."""
    merged = ClassRegistry()
    for registry in registries:
        try:
            merged = merged.merged_with(registry)
        except ClassConflict as conflict:
            raise DatasetError(
                f"label {conflict.uid} is {conflict.first!r} in one layer and {conflict.second!r} in another; "
                "export them to separate datasets"
            ) from None
        merged.active += [uid for uid in registry.active if uid not in merged.active]
    return merged


def iter_export(
    root: str | Path, items: Sequence[LabelledImage], ratios: dict[str, float] | None = None
) -> Generator[tuple[int, int], None, list[str]]:
    """Write every item (every 2D slice of stacks) into the dataset at ``root``, yielding
    ``(samples done, samples in all)`` after each; returns the ids.

    The dataset is held from the start to the end (another process writing into it is refused in
    one line naming it).  Closing the generator early stops between samples and still leaves a
    complete index of what was written.  Re-exporting into the same folder updates the samples in
    place.
    """
    if not items:
        raise DatasetError("nothing to export: no image has a labels layer")
    registry = merge_registries([item.registry for item in items])
    ids: list[str] = []
    with DatasetWriter(root, registry, ratios) as writer:
        samples = [sample for item in items for sample in _samples(item)]
        for sample in samples:
            ids.append(writer.write(sample))
            yield len(ids), len(samples)
    return ids


def export_images(
    root: str | Path,
    items: Sequence[LabelledImage],
    ratios: dict[str, float] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """:func:`iter_export` run to the end, calling ``progress(done, total)`` after each sample."""
    return drive(iter_export(root, items, ratios), (lambda step: progress(*step)) if progress else None)


def plane_stem(stem: str, index: tuple[int, ...]) -> str:
    """The sample name of one 2D slice of a stack: ``<stem>-<i>-<j>...`` (3 digits each)."""
    return "-".join([stem, *(f"{i:03d}" for i in index)])


def _samples(item: LabelledImage) -> list[Sample]:
    labels = np.asarray(item.labels)
    if labels.ndim == 2:
        return [Sample(item.name, labels, image=np.asarray(item.image), source=item.source,
                       confidence=item.confidence, edited=item.edited, meta=item.meta)]
    samples = []
    for index in np.ndindex(*labels.shape[:-2]):
        samples.append(Sample(
            plane_stem(item.name, index),
            labels[index],
            image=np.asarray(item.image[index]),
            confidence=None if item.confidence is None else item.confidence[index],
            edited=None if item.edited is None else item.edited[index],
            meta={**item.meta, "slice": list(index)},
        ))
    return samples

