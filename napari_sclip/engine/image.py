"""Turning user images into the 8-bit RGB the model sees.

The rule for non-8-bit data
---------------------------
* ``uint8`` is used as is; ``bool`` maps to 0 and 255.
* Other integer and float data is mapped linearly to 0..255 and rounded: the value ``lo`` maps to
  0 and ``hi`` to 255, values outside are clipped.  ``(lo, hi)`` are the caller's contrast limits
  when given (napari passes the layer's), otherwise the 0.5th and 99.5th percentiles of all
  channels together (robust to a few hot pixels, and the same for every channel so colours keep
  their balance).  A constant image maps to 0.
* Grayscale is repeated into three channels; an alpha channel is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from napari_sclip.engine.errors import ImageError

#: Percentiles used when no contrast limits are given.
ROBUST_PERCENTILES = (0.5, 99.5)
#: Percentiles are estimated on at most about this many values (a regular subsample).
_PERCENTILE_SAMPLE = 1 << 22


def _as_hwc(image: np.ndarray) -> np.ndarray:
    """Check the layout and return (H, W, C) with C in 1..4."""
    if image.ndim == 2:
        return image[..., None]
    if image.ndim == 3 and image.shape[-1] <= 4:
        return image
    # A small last axis next to two large ones is channels; otherwise it is a stack of slices.
    if image.ndim == 3 and image.shape[-1] < min(image.shape[:2]):
        raise ImageError(
            f"image of shape {image.shape} has {image.shape[-1]} channels; "
            "expected grayscale, RGB or RGBA (1 to 4 channels in the last axis)"
        )
    if image.ndim == 3:
        raise ImageError(
            f"image of shape {image.shape} looks like a stack of 2D slices; segment each slice "
            "on its own (or, for channels-first data, move the channels to the last axis)"
        )
    if image.ndim > 3:
        raise ImageError(
            f"image of shape {image.shape} has {image.ndim} dimensions; "
            "segment its 2D slices one at a time"
        )
    raise ImageError(f"image of shape {image.shape} is not 2D; expected (H, W) or (H, W, C)")


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
        4 (RGBA); any integer, float or bool dtype.
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
    if image.size == 0:
        raise ImageError(f"image of shape {image.shape} is empty")
    if image.dtype.kind not in "biuf":
        raise ImageError(f"image dtype {image.dtype} is not numeric")
    hwc = _as_hwc(image)
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
