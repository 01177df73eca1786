"""The background job: segment one or more 2D slices of a layer's data (no Qt, no napari).

The widget runs :func:`run_job` in a napari generator worker.  It yields :class:`JobProgress`
after every batch of windows, so cancelling takes effect within one batch, and returns one
:class:`SliceResult` per slice.
"""

from __future__ import annotations

import itertools
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_sclip.engine.errors import ImageError
from napari_sclip.engine.image import image_layout
from napari_sclip.engine.vocabulary import Vocabulary

Region = tuple  # an index into the labels array: ints for fixed axes, then two slice(None)

_STAGE_TEXT = {"text": "encoding classes", "windows": "segmenting", "resize": "labelling"}
# The share of one slice's progress bar each engine stage fills, so the bar only moves forward.
_STAGE_SPAN = {"text": (0.0, 0.1), "windows": (0.1, 0.9), "resize": (0.9, 1.0)}


@dataclass(frozen=True)
class JobProgress:
    """Overall progress of a job: ``fraction`` in [0, 1] and a short status text."""

    fraction: float
    message: str


@dataclass(frozen=True)
class SliceResult:
    """The labels of one 2D slice (in the layer's numbering when the job gives ``label_values``,
    else the engine's 1..C), its confidence if kept, and how the engine made it (its
    ``SegmentationResult.params``: model, weights, device, precision, method and parameters)."""

    region: Region
    labels: np.ndarray
    confidence: np.ndarray | None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def features_reused(self) -> bool:
        """Whether the slice's image features came from the engine's feature cache."""
        return bool(self.params.get("features_reused"))


@dataclass
class SegmentJob:
    """What to segment and how.

    Attributes
    ----------
    data
        The image layer's data, any array-like (numpy, dask, zarr): (..., Y, X) or (..., Y, X, C).
    rgb
        Whether the last axis holds colour channels.
    regions
        The labels-array indices of the 2D slices to segment, e.g. ``[(slice(None), slice(None))]``
        for a 2D image or ``[(3, slice(None), slice(None))]`` for slice 3 of a stack.
    vocabulary, options
        Passed to :meth:`Segmenter.iter_segment` (``short_side``, ``window``, ...).
    contrast_limits
        The layer's contrast limits, for non-8-bit data.
    keep_confidence
        Return each slice's confidence too (a float32 image per slice: dropped unless needed, so
        that "all slices" of a long stack stays small).
    label_values
        Maps the engine's labels (0, 1..C) to the labels layer's values; applied in the worker so
        that the GUI thread only writes.
    """

    data: Any
    rgb: bool
    regions: list[Region]
    vocabulary: Vocabulary
    options: dict[str, Any] = field(default_factory=dict)
    contrast_limits: Sequence[float] | None = None
    keep_confidence: bool = False
    label_values: np.ndarray | None = None


def spatial_shape(shape: Sequence[int], rgb: bool) -> tuple[int, ...]:
    """The shape of an image layer's labels: its data's, less the colour axis of an RGB layer."""
    return tuple(shape[:-1]) if rgb else tuple(shape)


def colour_last(shape: Sequence[int]) -> bool:
    """Whether an array of ``shape`` is one 2D image with RGB(A) in its last axis, as napari
    shows with ``rgb=True``."""
    return len(shape) == 3 and shape[-1] in (3, 4)


def check_layer(shape: Sequence[int], rgb: bool) -> None:
    """Refuse an image layer whose 2D slices are not images, by the engine's one rule
    (:func:`~napari_sclip.engine.image.image_layout`): more than 4 channels, or channels in the
    last axis of a non-RGB layer, which napari shows as thin slices (``(256, 256, 2)``: 256
    slices of 256 x 2 px)."""
    shape = tuple(shape)
    try:
        channels = image_layout(shape).channels
    except ImageError as exc:  # more than 4 channels
        raise ImageError(f"{exc}, or open it with one layer per channel (channel_axis=-1)") from None
    if channels is not None and not rgb:
        as_rgb = "as RGB (rgb=True) or " if colour_last(shape[-3:]) else ""
        raise ImageError(
            f"the layer's shape {shape} has {shape[-1]} channels in its last axis, which napari "
            f"shows as {shape[-3]} slices of {shape[-2]} x {shape[-1]} px; open it {as_rgb}with one "
            "layer per channel (channel_axis=-1) and segment that"
        )


def slice_regions(shape: Sequence[int], rgb: bool, current: Sequence[int] | None) -> list[Region]:
    """The 2D slices of an image of ``shape``: all of them, or the one at ``current`` (the
    viewer's position along the leading axes)."""
    lead = spatial_shape(shape, rgb)[:-2]
    plane = (slice(None), slice(None))
    if not lead:
        return [plane]
    if current is not None:
        position = tuple(min(max(int(c), 0), n - 1) for c, n in zip(current[: len(lead)], lead))
        return [position + plane]
    return [index + plane for index in itertools.product(*(range(n) for n in lead))]


def run_job(segmenter, job: SegmentJob) -> Generator[JobProgress, None, list[SliceResult]]:
    """Load the model if needed, then segment every region (of a layer :func:`check_layer`
    accepted); returns one result per region."""
    yield JobProgress(0.0, f"loading {segmenter.model_name}")
    segmenter.load()
    results = []
    count = len(job.regions)
    fraction = 0.0
    for k, region in enumerate(job.regions):
        index = region + (slice(None),) if job.rgb else region
        image = np.asarray(job.data[index])
        steps = segmenter.iter_segment(image, job.vocabulary, contrast_limits=job.contrast_limits, **job.options)
        where = f" (slice {k + 1}/{count})" if count > 1 else ""
        while True:
            try:
                step = next(steps)
            except StopIteration as stop:
                confidence = stop.value.confidence if job.keep_confidence else None
                labels = stop.value.labels if job.label_values is None else job.label_values[stop.value.labels]
                results.append(SliceResult(region, labels, confidence, stop.value.params))
                break
            low, high = _STAGE_SPAN.get(step.stage, (0.0, 0.0))
            text = _STAGE_TEXT.get(step.stage, step.stage)
            fraction = max(fraction, (k + low + (high - low) * step.fraction) / count)
            yield JobProgress(fraction, f"{text} {step.done}/{step.total}{where}")
    yield JobProgress(1.0, "done")
    return results
