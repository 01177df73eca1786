"""ClearCLIP (Lan et al., ECCV 2024): query-query attention, no residual, no MLP.

The last block keeps only its attention path, ``out_proj(A v)`` from ``ln_1(x)``, with per head
``A = softmax(q qᵀ s)``.  Its defaults use 448 px windows, whose 28 x 28 patch grid takes the
positional embedding interpolated by :func:`~napari_sclip.engine.vit.interpolate_positional_embedding`.
"""

from __future__ import annotations

from napari_sclip.engine._torch import F, torch
from napari_sclip.engine.vit import attention_path, first_blocks, patch_grid, project_patches


def query_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q qᵀ s) v`` per head (one fused call; ``k`` is not used)."""
    return F.scaled_dot_product_attention(q, q, v)


def clearclip_patch_features(visual: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """``(B, rows, cols, E)`` L2-normalised ClearCLIP patch features of ``(B, 3, H, W)`` windows."""
    x = attention_path(visual.transformer.resblocks[-1], first_blocks(visual, pixels), query_query_attention)
    return project_patches(visual, x[:, 1:], patch_grid(visual, pixels))
