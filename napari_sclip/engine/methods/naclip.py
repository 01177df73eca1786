"""NACLIP (Hajimiri, Ben Ayed, Dolz, WACV 2025): key-key attention with a Gaussian neighbourhood.

The last block keeps only its attention path, ``out_proj(A v)`` from ``ln_1(x)`` with no residual
and no MLP, where per head::

    A = softmax(k kᵀ s + G)

``G[p, p']`` is a Gaussian of the grid offset between patches p and p',
``exp(-((di / (σ√2))² + (dj / (σ√2))²))`` with σ = 5, and 0 on the CLS row and column.  NACLIP is
published with PAMR refinement, which is on by default here too.
"""

from __future__ import annotations

import math

from napari_sclip.engine._torch import F, torch
from napari_sclip.engine.vit import attention_path, first_blocks, patch_grid, project_patches

#: The Gaussian's standard deviation, in patches.
SIGMA = 5.0


def neighbourhood_bias(grid: tuple[int, int], sigma: float = SIGMA, device=None) -> torch.Tensor:
    """``G``: ``(1 + rows * cols, 1 + rows * cols)`` additive attention bias, CLS first."""
    rows, cols = grid
    # The (2 rows - 1) x (2 cols - 1) kernel, centred: every offset between two patches.
    di = torch.arange(-(rows - 1), rows, device=device, dtype=torch.float32)
    dj = torch.arange(-(cols - 1), cols, device=device, dtype=torch.float32)
    scale = sigma * math.sqrt(2.0)
    kernel = torch.exp(-((di[:, None] / scale) ** 2 + (dj[None, :] / scale) ** 2))  # (2r-1, 2c-1)
    r = torch.arange(rows, device=device).repeat_interleave(cols)  # patch p's row
    c = torch.arange(cols, device=device).repeat(rows)  # patch p's column
    patches = kernel[(r[None, :] - r[:, None]) + rows - 1, (c[None, :] - c[:, None]) + cols - 1]
    return F.pad(patches, (1, 0, 1, 0))  # zero CLS row and column


def naclip_patch_features(visual: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """``(B, rows, cols, E)`` L2-normalised NACLIP patch features of ``(B, 3, H, W)`` windows."""
    grid = patch_grid(visual, pixels)
    x = first_blocks(visual, pixels)
    bias = neighbourhood_bias(grid, device=x.device).to(x.dtype)

    def key_key_with_neighbourhood(q, k, v):
        return F.scaled_dot_product_attention(k, k, v, attn_mask=bias)

    x = attention_path(visual.transformer.resblocks[-1], x, key_key_with_neighbourhood)
    return project_patches(visual, x[:, 1:], grid)
