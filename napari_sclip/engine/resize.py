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
    x: torch.Tensor,
    size: tuple[int, int],
    rows: tuple[int, int] | None = None,
    cols: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Resize the last two axes of ``x`` to ``size``; return float32.

    Parameters
    ----------
    x
        (..., H, W) tensor of any real dtype; it may be a non-contiguous view.
    size
        Output ``(height, width)``.
    rows, cols
        Only compute output rows ``rows[0]:rows[1]`` and columns ``cols[0]:cols[1]`` (a tile of
        the full result).  With ``cols``, columns are blended like rows rather than by PyTorch's
        kernel (equal to it within float rounding), so any tile of a result is computed the same
        way.
    """
    in_h, in_w = x.shape[-2:]
    out_h, out_w = size
    r0, r1 = rows if rows is not None else (0, out_h)
    y_lo, y_hi, wy = _source_taps(in_h, out_h, r0, r1, x.device)
    if cols is not None:
        x_lo, x_hi, wx = _source_taps(in_w, out_w, cols[0], cols[1], x.device)
        used = torch.arange(int(x_lo.min()), int(x_hi.max()) + 1, device=x.device)
        x = x.index_select(-1, used)  # only the source columns the tile needs
        x_lo, x_hi = x_lo - used[0], x_hi - used[0]
    top = x.index_select(-2, y_lo).float()
    bottom = x.index_select(-2, y_hi).float()
    band = torch.lerp(top, bottom, wy[:, None])  # (..., r1 - r0, W_in)
    if cols is not None:
        return torch.lerp(band.index_select(-1, x_lo), band.index_select(-1, x_hi), wx)
    # Along columns, PyTorch's own kernel (rows keep their size, so they pass through exactly).
    lead = band.shape[:-2]
    flat = band.reshape(1, -1, *band.shape[-2:])
    out = F.interpolate(flat, size=(r1 - r0, out_w), mode="bilinear", align_corners=False)
    return out.reshape(*lead, r1 - r0, out_w)
