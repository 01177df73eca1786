"""Correlative Self-Attention and the dense ViT forward against plain reference computations."""

from __future__ import annotations

import pytest
import torch

from napari_sclip.engine.methods.sclip import correlative_self_attention, sclip_patch_features
from napari_sclip.engine.vit import interpolate_positional_embedding

from conftest import make_tiny_clip
from reference_sclip import csa_reference, image_features_reference


@pytest.mark.parametrize("heads", [1, 2, 8])
def test_csa_matches_the_equation(heads):
    torch.manual_seed(heads)
    width, tokens = 64, 197
    attn = torch.nn.MultiheadAttention(width, heads, batch_first=True).eval()
    with torch.no_grad():
        attn.in_proj_bias.normal_(0, 0.5)  # biases must enter q, k and v
        attn.out_proj.bias.normal_(0, 0.5)
    x = torch.randn(3, tokens, width)
    with torch.no_grad():
        expected = csa_reference(x, attn)
        actual = correlative_self_attention(x, attn)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_csa_differs_from_ordinary_attention():
    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(32, 2, batch_first=True).eval()
    x = torch.randn(1, 10, 32)
    with torch.no_grad():
        ordinary = attn(x, x, x, need_weights=False)[0]
        csa = correlative_self_attention(x, attn)
    assert (csa - ordinary).abs().max() > 1e-3


def test_csa_is_per_window_independent():
    """A batch of windows gives each window the result it gets alone."""
    torch.manual_seed(1)
    attn = torch.nn.MultiheadAttention(64, 2, batch_first=True).eval()
    x = torch.randn(4, 50, 64)
    with torch.no_grad():
        batched = correlative_self_attention(x, attn)
        single = torch.cat([correlative_self_attention(x[i : i + 1], attn) for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)


def test_positional_embedding_is_unchanged_on_the_pretrained_grid():
    visual = make_tiny_clip().visual
    assert interpolate_positional_embedding(visual, (14, 14)) is visual.positional_embedding


@pytest.mark.parametrize("grid", [(9, 14), (14, 5), (20, 20), (1, 3)])
def test_positional_embedding_interpolation(grid):
    """Bicubic on the 14 x 14 grid with scale (g + 0.1) / 14, CLS kept; checked by hand on one
    output position against the bicubic formula would be long, so compare with F.interpolate."""
    visual = make_tiny_clip().visual
    rows, cols = grid
    pos = interpolate_positional_embedding(visual, grid)
    assert pos.shape == (1 + rows * cols, visual.positional_embedding.shape[1])
    torch.testing.assert_close(pos[0], visual.positional_embedding[0])
    base = visual.positional_embedding[1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(
        base, scale_factor=((rows + 0.1) / 14, (cols + 0.1) / 14), mode="bicubic", align_corners=False
    )
    torch.testing.assert_close(pos[1:], expected.permute(0, 2, 3, 1).reshape(rows * cols, -1))


@pytest.mark.parametrize("size", [(224, 224), (224, 150), (100, 224)])
def test_patch_features_match_reference(size):
    clip = make_tiny_clip(seed=3)
    torch.manual_seed(5)
    windows = torch.randn(2, 3, *size)
    with torch.no_grad():
        features = sclip_patch_features(clip.visual, windows)
        for i in range(2):
            expected, (rows, cols) = image_features_reference(clip.visual, windows[i : i + 1])
            assert features.shape[1:3] == (rows, cols) == (size[0] // 16, size[1] // 16)
            torch.testing.assert_close(features[i].reshape(rows * cols, -1), expected, rtol=1e-4, atol=1e-5)
    norms = features.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


@pytest.mark.parametrize("rows, name", [(slice(0, 64), "q"), (slice(64, 128), "k")])
def test_both_correlation_terms_contribute(rows, name):
    """A = softmax(q qᵀ s) + softmax(k kᵀ s): scaling q's or k's projection changes the output."""
    clip = make_tiny_clip(seed=4)
    windows = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        before = sclip_patch_features(clip.visual, windows)
        clip.visual.transformer.resblocks[-1].attn.in_proj_weight[rows].mul_(3.0)
        after = sclip_patch_features(clip.visual, windows)
    assert (after - before).abs().max() > 1e-4, name


@pytest.mark.parametrize("quick_gelu", [True, False])
@pytest.mark.parametrize("layer_scale", [None, 0.1])
def test_residual_block_equals_open_clips_block(quick_gelu, layer_scale):
    """Blocks 1..L-1 are CLIP's own: our fused forward computes exactly what open_clip's does."""
    from open_clip.transformer import QuickGELU, ResidualAttentionBlock

    from napari_sclip.engine.vit import residual_block

    torch.manual_seed(2)
    act = QuickGELU if quick_gelu else torch.nn.GELU
    block = ResidualAttentionBlock(64, 4, ls_init_value=layer_scale, act_layer=act).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
        x = torch.randn(3, 50, 64)
        torch.testing.assert_close(residual_block(block, x.clone()), block(x), rtol=1e-5, atol=1e-5)
