"""MaskCLIP (Zhou, Loy, Dai, ECCV 2022): the last block's value path alone.

The last block keeps only ``out_proj(v)`` computed from ``ln_1(x)``: attention is the identity,
and there is no residual and no MLP.  The classic training-free baseline.
"""

from __future__ import annotations

from napari_sclip.engine._torch import torch
from napari_sclip.engine.vit import attention_path, first_blocks, patch_grid, project_patches


def maskclip_patch_features(visual: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """``(B, rows, cols, E)`` L2-normalised MaskCLIP patch features of ``(B, 3, H, W)`` windows."""
    x = attention_path(visual.transformer.resblocks[-1], first_blocks(visual, pixels), lambda q, k, v: v)
    return project_patches(visual, x[:, 1:], patch_grid(visual, pixels))
