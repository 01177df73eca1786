"""CLIP's vision transformer, taken apart for dense features.

The training-free methods (:mod:`napari_sclip.engine.methods`) all run blocks 1 .. L-1 of CLIP's
ViT unchanged and differ in what they do with the last block(s).  This module holds what they
share: the window embedding (with the positional embedding interpolated to the window's grid),
CLIP's own blocks computed faster but unchanged in value, the last block's attention path with a
pluggable attention, and the projection of patch tokens into the joint image-text space.

Notation, per attention head: ``s = head_dim ** -0.5``; q, k, v come from the block's ``in_proj``
with biases, and an attention's output is ``out_proj(A v)``.
"""

from __future__ import annotations

from napari_sclip.engine._torch import F, torch


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, D) -> (B, heads, T, D // heads)."""
    batch, tokens, width = x.shape
    return x.reshape(batch, tokens, heads, width // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, T, head_dim) -> (B, T, heads * head_dim)."""
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def _activation_(mlp: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The MLP's activation, in place where it is QuickGELU: ``x sigmoid(1.702 x)`` equals
    ``silu(1.702 x) / 1.702``, three in-place passes instead of three new tensors."""
    if type(mlp.gelu).__name__ == "QuickGELU":
        return F.silu(hidden.mul_(1.702), inplace=True).div_(1.702)
    return mlp.gelu(hidden)


def mlp_residual(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x + mlp(ln_2(x))`` for ``(B, T, D)``, with the residual added inside the last GEMM."""
    batch, tokens, width = x.shape
    hidden = _activation_(block.mlp, block.mlp.c_fc(block.ln_2(x)))  # (B, T, 4D)
    c_proj = block.mlp.c_proj
    out = torch.addmm(x.reshape(-1, width), hidden.reshape(batch * tokens, -1), c_proj.weight.T)
    return out.add_(c_proj.bias).reshape(batch, tokens, width)


def plain_block(block: torch.nn.Module) -> bool:
    return isinstance(block.ls_1, torch.nn.Identity) and isinstance(block.ls_2, torch.nn.Identity)


def residual_block(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One of CLIP's own blocks (1 .. L-1), unchanged in value: self-attention and MLP with
    residuals.  Computed with fused attention and the residuals folded into the output GEMMs,
    which saves about a tenth of the ViT's time on a CPU; blocks with LayerScale run as is."""
    if not plain_block(block):
        return block(x)
    batch, tokens, width = x.shape
    q, k, v = qkv_heads(block, x)
    mixed = merge_heads(F.scaled_dot_product_attention(q, k, v)).reshape(batch * tokens, width)
    out_proj = block.attn.out_proj
    x = torch.addmm(x.reshape(-1, width), mixed, out_proj.weight.T).add_(out_proj.bias)
    return mlp_residual(block, x.reshape(batch, tokens, width))


def first_blocks(visual: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The tokens after blocks 1 .. L-1 (all but the last), ``(B, 1 + rows * cols, width)``."""
    x = embed_windows(visual, pixels)
    for block in visual.transformer.resblocks[:-1]:
        x = residual_block(block, x)
    return x


def interpolate_positional_embedding(visual: torch.nn.Module, grid: tuple[int, int]) -> torch.Tensor:
    """The ViT's positional embedding for a ``grid = (rows, cols)`` patch grid.

    The pretrained grid is resized bicubically with ``scale_factor = (g + 0.1) / g0`` per axis,
    ``align_corners=False`` and no antialiasing (the convention of the SCLIP family's code); the
    CLS position is kept as is.  Returns ``(1 + rows * cols, width)``.
    """
    pos = visual.positional_embedding  # (1 + g0h * g0w, width)
    base_h, base_w = visual.grid_size
    rows, cols = grid
    if (rows, cols) == (base_h, base_w):
        return pos
    cls_pos, patch_pos = pos[:1], pos[1:]
    patch_grid = patch_pos.reshape(1, base_h, base_w, -1).permute(0, 3, 1, 2)  # (1, width, g0h, g0w)
    patch_grid = F.interpolate(
        patch_grid.float(),
        scale_factor=((rows + 0.1) / base_h, (cols + 0.1) / base_w),
        mode="bicubic",
        align_corners=False,
    )
    patch_pos = patch_grid.permute(0, 2, 3, 1).reshape(rows * cols, -1)  # (rows * cols, width)
    return torch.cat([cls_pos, patch_pos.to(pos.dtype)])


def embed_windows(visual: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Tokens entering block 1: ``ln_pre(cat(CLS, patches) + positions)``.

    ``pixels`` is ``(B, 3, H, W)``; ``H // patch`` x ``W // patch`` patches are used (the
    convolution drops a remainder).  Returns ``(B, 1 + rows * cols, width)``; see
    :func:`patch_grid` for ``(rows, cols)``.
    """
    patch_tokens = visual.conv1(pixels)  # (B, width, rows, cols)
    batch, _, rows, cols = patch_tokens.shape
    patch_tokens = patch_tokens.flatten(2).transpose(1, 2)  # (B, rows * cols, width)
    cls_token = visual.class_embedding.to(patch_tokens.dtype).expand(batch, 1, -1)  # (B, 1, width)
    x = torch.cat([cls_token, patch_tokens], dim=1)  # (B, 1 + rows * cols, width)
    x = x + interpolate_positional_embedding(visual, (rows, cols)).to(x.dtype)
    return visual.ln_pre(x)


def patch_grid(visual: torch.nn.Module, pixels: torch.Tensor) -> tuple[int, int]:
    """``(rows, cols)`` of the patch grid of ``(B, 3, H, W)`` windows."""
    patch_h, patch_w = visual.conv1.kernel_size
    return pixels.shape[-2] // patch_h, pixels.shape[-1] // patch_w


def qkv_heads(block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of ``ln_1(x)`` for the block's attention, each ``(B, heads, T, head_dim)``."""
    attn = block.attn
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # (B, T, 3D)
    return tuple(split_heads(t, attn.num_heads) for t in qkv.chunk(3, dim=-1))


def attention_path(block: torch.nn.Module, x: torch.Tensor, attend) -> torch.Tensor:
    """The last block reduced to its attention path: ``out_proj(attend(q, k, v))`` from
    ``ln_1(x)``, with no residual and no MLP (NACLIP, ClearCLIP, MaskCLIP, SC-CLIP).

    ``attend(q, k, v)`` maps ``(B, heads, T, head_dim)`` tensors to ``A v`` of the same shape.
    A block with LayerScale scales the path by it, as the block scales its attention branch.
    """
    q, k, v = qkv_heads(block, x)
    return block.ls_1(block.attn.out_proj(merge_heads(attend(q, k, v))))  # (B, T, D)


def project_patches(visual: torch.nn.Module, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``ln_post`` then ``proj`` of ``(B, rows * cols, width)`` patch tokens (CLS already
    dropped), L2-normalised: ``(B, rows, cols, E)`` features in the joint image-text space."""
    features = visual.ln_post(tokens) @ visual.proj  # (B, rows * cols, E)
    features = F.normalize(features.float(), dim=-1)
    return features.reshape(features.shape[0], *grid, -1)
