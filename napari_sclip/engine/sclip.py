"""SCLIP's dense image features: CLIP's ViT with Correlative Self-Attention in its last block.

Only the last transformer block changes (Wang, Mei, Yuille, ECCV 2024, section 3).  Per head, with
q, k, v from that block's own ``in_proj`` (biases included) and ``s = head_dim ** -0.5``::

    A   = softmax(q qᵀ s) + softmax(k kᵀ s)
    CSA = out_proj(A v)

and the block keeps its residual and MLP::

    x = x + CSA(ln_1(x))
    x = x + mlp(ln_2(x))

Every token takes part, CLS included.  After ``ln_post`` and ``proj`` the CLS token is dropped and
each patch feature is L2-normalised; its dot product with a text embedding is the patch's logit.
"""

from __future__ import annotations

from napari_sclip.engine._torch import F, torch


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, D) -> (B, heads, T, D // heads)."""
    batch, tokens, width = x.shape
    return x.reshape(batch, tokens, heads, width // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, T, head_dim) -> (B, T, heads * head_dim)."""
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def correlative_self_attention(x: torch.Tensor, attn: torch.nn.MultiheadAttention) -> torch.Tensor:
    """SCLIP's attention for a batch-first ``(B, T, D)`` input, using ``attn``'s weights.

    ``softmax(q qᵀ s) v + softmax(k kᵀ s) v`` equals ``A v``; each term is one fused
    scaled-dot-product attention call (whose default scale is ``head_dim ** -0.5``), so the
    ``(T, T)`` matrices are never stored.
    """
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # (B, T, 3D)
    q, k, v = (_split_heads(t, attn.num_heads) for t in qkv.chunk(3, dim=-1))  # (B, heads, T, head_dim)
    mixed = F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)
    return attn.out_proj(_merge_heads(mixed))  # (B, T, D)


def _activation_(mlp: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The MLP's activation, in place where it is QuickGELU: ``x sigmoid(1.702 x)`` equals
    ``silu(1.702 x) / 1.702``, three in-place passes instead of three new tensors."""
    if type(mlp.gelu).__name__ == "QuickGELU":
        return F.silu(hidden.mul_(1.702), inplace=True).div_(1.702)
    return mlp.gelu(hidden)


def _mlp_residual(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x + mlp(ln_2(x))`` for ``(B, T, D)``, with the residual added inside the last GEMM."""
    batch, tokens, width = x.shape
    hidden = _activation_(block.mlp, block.mlp.c_fc(block.ln_2(x)))  # (B, T, 4D)
    c_proj = block.mlp.c_proj
    out = torch.addmm(x.reshape(-1, width), hidden.reshape(batch * tokens, -1), c_proj.weight.T)
    return out.add_(c_proj.bias).reshape(batch, tokens, width)


def _plain_block(block: torch.nn.Module) -> bool:
    return isinstance(block.ls_1, torch.nn.Identity) and isinstance(block.ls_2, torch.nn.Identity)


def residual_block(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One of CLIP's own blocks (1 .. L-1), unchanged in value: self-attention and MLP with
    residuals.  Computed with fused attention and the residuals folded into the output GEMMs,
    which saves about a tenth of the ViT's time on a CPU; blocks with LayerScale run as is."""
    if not _plain_block(block):
        return block(x)
    batch, tokens, width = x.shape
    attn = block.attn
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # (B, T, 3D)
    q, k, v = (_split_heads(t, attn.num_heads) for t in qkv.chunk(3, dim=-1))
    mixed = _merge_heads(F.scaled_dot_product_attention(q, k, v)).reshape(batch * tokens, width)
    x = torch.addmm(x.reshape(-1, width), mixed, attn.out_proj.weight.T).add_(attn.out_proj.bias)
    return _mlp_residual(block, x.reshape(batch, tokens, width))


def correlative_block(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SCLIP's last block: ``x + CSA(ln_1(x))``, then ``x + mlp(ln_2(x))``."""
    x = x + block.ls_1(correlative_self_attention(block.ln_1(x), block.attn))
    if not _plain_block(block):
        return x + block.ls_2(block.mlp(block.ln_2(x)))
    return _mlp_residual(block, x)


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


def sclip_patch_features(visual: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """SCLIP patch features of a batch of windows.

    Parameters
    ----------
    visual
        open_clip's ``VisionTransformer``.
    pixels
        ``(B, 3, H, W)`` normalised windows.  ``H // patch`` x ``W // patch`` patches are used
        (the convolution drops a remainder).

    Returns
    -------
    ``(B, rows, cols, E)`` L2-normalised patch features in the joint image-text space.
    """
    patch_tokens = visual.conv1(pixels)  # (B, width, rows, cols)
    batch, _, rows, cols = patch_tokens.shape
    patch_tokens = patch_tokens.flatten(2).transpose(1, 2)  # (B, rows * cols, width)
    cls_token = visual.class_embedding.to(patch_tokens.dtype).expand(batch, 1, -1)  # (B, 1, width)
    x = torch.cat([cls_token, patch_tokens], dim=1)  # (B, 1 + rows * cols, width)
    x = x + interpolate_positional_embedding(visual, (rows, cols)).to(x.dtype)
    x = visual.ln_pre(x)

    *blocks, last = visual.transformer.resblocks
    for block in blocks:
        x = residual_block(block, x)
    x = correlative_block(last, x)

    x = visual.ln_post(x) @ visual.proj  # (B, 1 + rows * cols, E)
    patch_features = F.normalize(x[:, 1:].float(), dim=-1)
    return patch_features.reshape(batch, rows, cols, -1)
