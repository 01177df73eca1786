"""SCLIP (Wang, Mei, Yuille, ECCV 2024): Correlative Self-Attention in the last block.

Per head::

    A   = softmax(q qᵀ s) + softmax(k kᵀ s)
    CSA = out_proj(A v)

and, unlike the later methods, the block keeps its residual and MLP::

    x = x + CSA(ln_1(x))
    x = x + mlp(ln_2(x))

Every token takes part, CLS included.
"""

from __future__ import annotations

from napari_sclip.engine._torch import F, torch
from napari_sclip.engine.vit import (
    first_blocks,
    merge_heads,
    mlp_residual,
    patch_grid,
    plain_block,
    project_patches,
    split_heads,
)


def correlative_self_attention(x: torch.Tensor, attn: torch.nn.MultiheadAttention) -> torch.Tensor:
    """SCLIP's attention for a batch-first ``(B, T, D)`` input, using ``attn``'s weights.

    ``softmax(q qᵀ s) v + softmax(k kᵀ s) v`` equals ``A v``; each term is one fused
    scaled-dot-product attention call (whose default scale is ``head_dim ** -0.5``), so the
    ``(T, T)`` matrices are never stored.
    """
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # (B, T, 3D)
    q, k, v = (split_heads(t, attn.num_heads) for t in qkv.chunk(3, dim=-1))  # (B, heads, T, head_dim)
    mixed = F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)
    return attn.out_proj(merge_heads(mixed))  # (B, T, D)


def correlative_block(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SCLIP's last block: ``x + CSA(ln_1(x))``, then ``x + mlp(ln_2(x))``."""
    x = x + block.ls_1(correlative_self_attention(block.ln_1(x), block.attn))
    if not plain_block(block):
        return x + block.ls_2(block.mlp(block.ln_2(x)))
    return mlp_residual(block, x)


def sclip_patch_features(visual: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """``(B, rows, cols, E)`` L2-normalised SCLIP patch features of ``(B, 3, H, W)`` windows."""
    x = correlative_block(visual.transformer.resblocks[-1], first_blocks(visual, pixels))
    return project_patches(visual, x[:, 1:], patch_grid(visual, pixels))
