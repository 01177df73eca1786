"""Turning user images into what the model sees: 2D slices (one rule for every caller), then
8-bit RGB.

Which axes are slices and which are channels: :func:`image_layout`, the one rule that the CLI
and the dataset tools (files), the engine (arrays) and the widget (layers) all use.

The rule for non-8-bit data
---------------------------
* ``uint8`` is used as is; ``bool`` maps to 0 and 255.
* Other integer and float data is mapped linearly to 0..255 and rounded: the value ``lo`` maps to
  0 and ``hi`` to 255, values outside are clipped.  ``(lo, hi)`` are the caller's contrast limits
  when given (napari passes the layer's), otherwise the 0.5th and 99.5th percentiles of all
  channels together (robust to a few hot pixels, and the same for every channel so colours keep
  their balance).  A constant image maps to 0.
* Grayscale is repeated into three channels; an alpha channel (the second of two, the fourth of
  four) is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from napari_sclip.engine.errors import ImageError

#: Percentiles used when no contrast limits are given.
ROBUST_PERCENTILES = (0.5, 99.5)
#: Percentiles are estimated on at most about this many values (a regular subsample).
_PERCENTILE_SAMPLE = 1 << 22
#: Gray, gray + alpha, RGB, RGBA.
MAX_CHANNELS = 4
#: Without axis names, a last axis at most 1/this of each of the two before it holds channels.
_CHANNEL_RATIO = 4


@dataclass(frozen=True)
class Layout:
    """Where an array's 2D slices, rows, columns and channels are (:func:`image_layout`).

    Attributes
    ----------
    shape
        The array's shape.
    slice_axes
        The axes that index 2D slices, in the array's order; empty for a single 2D image.
    rows, cols
        The axes of the image's rows (height) and columns (width).
    channels
        The channel axis, or ``None`` for a single-channel image without one.
    """

    shape: tuple[int, ...]
    slice_axes: tuple[int, ...]
    rows: int
    cols: int
    channels: int | None

    @property
    def slice_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[axis] for axis in self.slice_axes)

    @property
    def count(self) -> int:
        """The number of 2D slices."""
        return math.prod(self.slice_shape)

    @property
    def plane_shape(self) -> tuple[int, ...]:
        """The shape of one slice as :meth:`plane` returns it: ``(H, W)`` or ``(H, W, C)``."""
        return tuple(self.shape[axis] for axis in (self.rows, self.cols, self.channels) if axis is not None)

    def plane(self, array, index: tuple[int, ...] = ()) -> np.ndarray:
        """Slice ``index`` (one entry per slice axis) of ``array`` as ``(H, W)`` or ``(H, W, C)``;
        a view where numpy allows it."""
        key: list = [slice(None)] * len(self.shape)
        for axis, i in zip(self.slice_axes, index, strict=True):
            key[axis] = i
        kept = [axis for axis in range(len(self.shape)) if axis not in self.slice_axes]
        order = [kept.index(axis) for axis in (self.rows, self.cols, self.channels) if axis is not None]
        return np.asarray(array[tuple(key)]).transpose(order)

    def indices(self) -> Iterator[tuple[int, ...] | None]:
        """The index of every slice; ``None`` for a single 2D image."""
        if not self.slice_axes:
            yield None
            return
        yield from np.ndindex(*self.slice_shape)

    def planes(self, array) -> Iterator[tuple[tuple[int, ...] | None, np.ndarray]]:
        """Every slice with its index; a single 2D image comes as ``(None, image)``."""
        for index in self.indices():
            yield index, self.plane(array, index or ())


def image_layout(shape: Sequence[int], axes: str | None = None) -> Layout:
    """Which axes of an array of ``shape`` are 2D slices, rows, columns and channels: the one
    rule, used for files, arrays and napari layers alike.

    * **Named axes**: ``axes`` are tifffile's letters, one per axis (ImageJ, OME and other TIFFs
      whose axes tifffile can name: ``ZCYX``, ``TZCYX``, ``YXS``, ...).  ``Y`` and ``X`` are the
      rows and columns; ``S`` (the samples of a pixel: RGB, RGBA) is the channel axis, or else
      ``C``; every other axis (``T``, ``Z``, ``I``, a ``C`` beside ``S``, ...) indexes slices.
      Letters that tifffile marks unknown (``Q``: TIFFs written from plain arrays) are not used.
    * **By shape** (PNG, JPEG, arrays, plain TIFFs): ``(H, W)`` is one image.  With 3 or more
      axes, the last one holds channels when it has at most 4 entries (gray, gray + alpha, RGB,
      RGBA: the convention of numpy, Pillow and napari), or when it is at most a quarter of each
      of the two axes before it (``(256, 256, 5)``: five channels, not 256 slices of 256 x 5 px);
      otherwise the last two axes are the rows and columns.  Every axis before the rows indexes
      slices: ``(Z, H, W)``, ``(T, Z, H, W)``, ``(Z, H, W, 3)``.  A channels-first array without
      names, ``(3, H, W)``, is therefore 3 slices, as napari shows it.
    * An image has 1 to 4 channels; more are refused (pick or combine three into RGB first).

    Raises
    ------
    ImageError
        Fewer than 2 axes, an empty axis, or more than 4 channels.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) < 2:
        raise ImageError(f"image of shape {shape} is not 2D; expected (H, W), (H, W, C) or a stack of them")
    if 0 in shape:
        raise ImageError(f"image of shape {shape} is empty")
    named = axes is not None and len(axes) == len(shape) and "Q" not in axes
    if named and axes.count("Y") == 1 and axes.count("X") == 1:
        rows, cols = axes.index("Y"), axes.index("X")
        channels = next((axes.index(name) for name in "SC" if axes.count(name) == 1), None)
        where = f" (axis {axes[channels]} of {axes})" if channels is not None else ""
    else:
        rows, cols, channels = len(shape) - 2, len(shape) - 1, None
        if len(shape) >= 3:
            last, (height, width) = shape[-1], shape[-3:-1]
            if last <= MAX_CHANNELS or last * _CHANNEL_RATIO <= min(height, width):
                rows, cols, channels = len(shape) - 3, len(shape) - 2, len(shape) - 1
        where = " in its last axis"
    if channels is not None and shape[channels] > MAX_CHANNELS:
        raise ImageError(
            f"image of shape {shape} has {shape[channels]} channels{where}; napari-sclip segments "
            "gray, gray + alpha, RGB or RGBA (1 to 4 channels): pick or combine three as RGB first"
        )
    slice_axes = tuple(axis for axis in range(len(shape)) if axis not in (rows, cols, channels))
    return Layout(shape, slice_axes, rows, cols, channels)


def _intensity_limits(data: np.ndarray, contrast_limits: Sequence[float] | None) -> tuple[float, float]:
    if contrast_limits is not None:
        try:
            lo, hi = (float(v) for v in contrast_limits)
        except (TypeError, ValueError):
            raise ImageError(f"contrast_limits must be two numbers, got {contrast_limits!r}") from None
        if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
            raise ImageError(f"contrast_limits must be finite with low < high, got ({lo}, {hi})")
        return lo, hi
    flat = data.reshape(-1)
    step = max(1, flat.size // _PERCENTILE_SAMPLE)
    lo, hi = np.percentile(flat[::step], ROBUST_PERCENTILES)
    if hi <= lo:  # nearly constant: fall back to the full range
        lo, hi = float(flat.min()), float(flat.max())
    return float(lo), float(hi)


def to_rgb_uint8(
    image: np.ndarray, contrast_limits: Sequence[float] | None = None
) -> np.ndarray:
    """Convert a 2D image to a C-contiguous (H, W, 3) ``uint8`` array.

    Parameters
    ----------
    image
        (H, W) grayscale, or (H, W, C) with C = 1 (gray), 2 (gray + alpha), 3 (RGB) or
        4 (RGBA), as :func:`image_layout` reads it; any integer, float or bool dtype.
    contrast_limits
        ``(low, high)`` intensities mapped to 0 and 255 for non-``uint8`` data.  Ignored for
        ``uint8`` and ``bool``.

    Raises
    ------
    ImageError
        For empty images, stacks of slices, more than 4 channels, non-numeric data, and NaN or
        infinite pixels.
    """
    image = np.asarray(image)
    if image.dtype.kind not in "biuf":
        raise ImageError(
            f"image dtype {image.dtype} cannot be segmented: expected integer, float or bool pixels"
        )
    layout = image_layout(image.shape)
    if layout.slice_axes:
        height, width = image.shape[layout.rows], image.shape[layout.cols]
        hint = ""
        if image.ndim == 3 and image.shape[0] <= MAX_CHANNELS:
            hint = " (for channels-first colour, move the channels last: numpy.moveaxis(image, 0, -1))"
        raise ImageError(
            f"image of shape {image.shape} is a stack of 2D slices ({layout.count} of {height} x "
            f"{width} px); segment its 2D slices one at a time{hint}"
        )
    hwc = layout.plane(image)
    if layout.channels is None:
        hwc = hwc[..., None]
    # Gray + alpha: keep gray.  RGBA: keep RGB.
    colour = hwc[..., :1] if hwc.shape[-1] <= 2 else hwc[..., :3]

    if colour.dtype == np.uint8:
        rgb8 = colour
    elif colour.dtype == np.bool_:
        rgb8 = colour.astype(np.uint8) * np.uint8(255)
    else:
        if colour.dtype.kind == "f":
            bad = int(np.count_nonzero(~np.isfinite(colour)))
            if bad:
                raise ImageError(
                    f"image has {bad} NaN or infinite pixel values; replace them first "
                    "(for example with numpy.nan_to_num)"
                )
        lo, hi = _intensity_limits(colour, contrast_limits)
        if hi <= lo:
            rgb8 = np.zeros(colour.shape, np.uint8)
        else:
            scaled = (colour.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
            rgb8 = np.rint(np.clip(scaled, 0.0, 255.0, out=scaled)).astype(np.uint8)

    if rgb8.shape[-1] == 1:
        rgb8 = np.repeat(rgb8, 3, axis=-1)
    return np.ascontiguousarray(rgb8)
