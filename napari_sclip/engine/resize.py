"""Bilinear resizing that matches ``F.interpolate(mode="bilinear", align_corners=False)``.

The authors' pipeline resizes with OpenCV's bilinear kernel (no antialiasing) and upsamples logits
with PyTorch's bilinear interpolation.  Both sample exactly two source rows and two source columns
per output pixel, so this module gathers only the source rows a band of output rows needs, blends
them, and lets PyTorch's kernel resize the columns.  That keeps the memory of a resize
proportional to its output, lets a huge image shrink without first becoming a float copy, and lets
a logit canvas grow to a huge image one band of rows at a time.
"""

from __future__ import annotations

from napari_sclip.engine._torch import F, torch


def _source_taps(in_len: int, out_len: int, start: int, stop: int, device: torch.device):
    """Two source indices and the weight of the second, for outputs ``start..stop-1``.

    PyTorch's rule for ``align_corners=False``: ``src = (dst + 0.5) * in/out - 0.5``, clamped at 0,
    computed in float32 as PyTorch does so that the taps agree to the last bit.
    """
    scale = torch.tensor(in_len / out_len, dtype=torch.float32)
    dst = torch.arange(start, stop, device=device, dtype=torch.float32)
    src = ((dst + 0.5) * scale.to(device) - 0.5).clamp_(min=0.0)
    lo = src.floor().long().clamp_(max=in_len - 1)
    hi = (lo + 1).clamp_(max=in_len - 1)
    frac = src - lo
    return lo, hi, frac


def resize_bilinear(
    x: torch.Tensor, size: tuple[int, int], rows: tuple[int, int] | None = None
) -> torch.Tensor:
    """Resize the last two axes of ``x`` to ``size``; return float32.

    Parameters
    ----------
    x
        (..., H, W) tensor of any real dtype; it may be a non-contiguous view.
    size
        Output ``(height, width)``.
    rows
        Only compute output rows ``rows[0]:rows[1]`` (a band of the full result).
    """
    in_h = x.shape[-2]
    out_h, out_w = size
    r0, r1 = rows if rows is not None else (0, out_h)
    y_lo, y_hi, wy = _source_taps(in_h, out_h, r0, r1, x.device)
    top = x.index_select(-2, y_lo).float()
    bottom = x.index_select(-2, y_hi).float()
    band = torch.lerp(top, bottom, wy[:, None])  # (..., r1 - r0, W_in)
    # Along columns, PyTorch's own kernel (rows keep their size, so they pass through exactly).
    lead = band.shape[:-2]
    flat = band.reshape(1, -1, *band.shape[-2:])
    out = F.interpolate(flat, size=(r1 - r0, out_w), mode="bilinear", align_corners=False)
    return out.reshape(*lead, r1 - r0, out_w)
