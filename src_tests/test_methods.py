"""NACLIP, SC-CLIP, ClearCLIP, MaskCLIP and PAMR against plain renderings of their equations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sclip import Segmenter
from napari_sclip.engine import segmenter as segmenter_module
from napari_sclip.engine.errors import ModelError, ParameterError
from napari_sclip.engine.methods import METHODS, get_method
from napari_sclip.engine.methods.clearclip import query_query_attention
from napari_sclip.engine.methods.naclip import neighbourhood_bias
from napari_sclip.engine.methods.scclip import (
    _calibrated_attention,
    aggregate,
    local_outlier_factor,
    outlier_mask,
    repair,
    scclip_patch_features,
)
from napari_sclip.engine.pamr import refine_tile
from napari_sclip.engine.vit import attention_path

from conftest import TINY_MODEL, make_tiny_clip, natural_image
from reference_methods import (
    aggregate_reference,
    attention_reference,
    lof_reference,
    method_features_reference,
    naclip_bias_reference,
    pamr_loop_reference,
    pamr_stacked_reference,
    repair_reference,
)
from reference_sclip import sclip_reference

CLASSES = ["person, astronaut", "sky", "flag, banner", "rocket"]


@pytest.fixture(scope="module")
def block():
    """A random open_clip block with non-trivial biases."""
    from open_clip.transformer import ResidualAttentionBlock

    torch.manual_seed(3)
    block = ResidualAttentionBlock(64, 4, batch_first=True).eval()
    with torch.no_grad():
        block.attn.in_proj_bias.normal_(0, 0.5)
        block.attn.out_proj.bias.normal_(0, 0.5)
    return block


def test_naclip_bias_matches_hand_computed_values():
    bias = neighbourhood_bias((2, 3))
    assert bias.shape == (7, 7)
    assert (bias[0] == 0).all() and (bias[:, 0] == 0).all()  # CLS row and column
    torch.testing.assert_close(torch.diagonal(bias)[1:], torch.ones(6))
    # patch 0 is (0, 0); patch 1 (0, 1); patch 5 (1, 2): exp(-(di² + dj²) / (2 σ²)), σ = 5
    assert bias[1, 2].item() == pytest.approx(np.exp(-1 / 50))
    assert bias[1, 6].item() == pytest.approx(np.exp(-5 / 50))
    assert bias[6, 1].item() == pytest.approx(np.exp(-5 / 50))
    torch.testing.assert_close(neighbourhood_bias((4, 5)), naclip_bias_reference(4, 5))


@pytest.mark.parametrize("kind", ["naclip", "clearclip", "maskclip", "scclip"])
def test_attention_matches_the_equation(block, kind):
    torch.manual_seed(0)
    rows, cols = 3, 4
    tokens = 1 + rows * cols if kind != "scclip" else rows * cols  # SC-CLIP attends patches only
    x = torch.randn(1, tokens, 64)
    bias = neighbourhood_bias((rows, cols)) if kind == "naclip" else None
    similarity = None
    if kind == "scclip":
        f = torch.nn.functional.normalize(torch.randn(1, tokens, 16), dim=-1)
        similarity = f @ f.transpose(1, 2)
    attend = {
        "naclip": lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(k, k, v, attn_mask=bias),
        "clearclip": query_query_attention,
        "maskclip": lambda q, k, v: v,
        "scclip": _calibrated_attention(similarity) if similarity is not None else None,
    }[kind]
    with torch.no_grad():
        ours = attention_path(block, x, attend)
        expected = attention_reference(block.ln_1(x), block.attn, kind, bias=bias, similarity=similarity)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_lof_matches_a_direct_loop():
    rng = np.random.default_rng(1)
    points = rng.normal(size=(40, 5))
    points[7] += 6  # an obvious outlier
    ours = local_outlier_factor(torch.from_numpy(points)[None].float(), neighbours=6)[0].numpy()
    np.testing.assert_allclose(ours, lof_reference(points, 6), rtol=1e-4)
    assert ours.argmax() == 7
    assert outlier_mask(torch.from_numpy(points)[None].float())[0, 7]


def test_repair_and_aggregate_match_direct_loops():
    rng = np.random.default_rng(2)
    rows, cols = 4, 5
    patches = rng.normal(size=(rows * cols, 3)).astype(np.float32)
    outliers = np.zeros(rows * cols, bool)
    outliers[[0, 1, 5, 6, 12, 19]] = True  # a corner cluster, a middle patch, the far corner
    ours = repair(torch.from_numpy(patches)[None], torch.from_numpy(outliers)[None], (rows, cols))[0].numpy()
    np.testing.assert_allclose(ours, repair_reference(patches, outliers, rows, cols), rtol=1e-6, atol=1e-6)

    lonely = np.zeros(9, bool)
    lonely[:] = True  # nobody has a valid neighbour: nothing changes
    single = rng.normal(size=(9, 2)).astype(np.float32)
    kept = repair(torch.from_numpy(single)[None], torch.from_numpy(lonely)[None], (3, 3))[0].numpy()
    np.testing.assert_array_equal(kept, single)

    x = torch.randn(1, 20, 8)
    f = torch.nn.functional.normalize(torch.randn(1, 20, 4), dim=-1)
    s = f @ f.transpose(1, 2)
    torch.testing.assert_close(aggregate(x, s), aggregate_reference(x, s))


def test_pamr_matches_a_pixel_loop():
    rng = np.random.default_rng(4)
    image = rng.normal(size=(3, 9, 11)).astype(np.float32)
    logits = rng.normal(size=(4, 9, 11)).astype(np.float32)
    ours = refine_tile(torch.from_numpy(image), torch.from_numpy(logits), iterations=3, dilations=(1, 2)).numpy()
    expected = pamr_loop_reference(image.astype(np.float64), logits, 3, (1, 2))
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)
    stacked = pamr_stacked_reference(torch.from_numpy(image), torch.from_numpy(logits), 3, (1, 2)).numpy()
    np.testing.assert_allclose(ours, stacked, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def deep_visual():
    """A tiny ViT with 12 blocks, as SC-CLIP's block indices need."""
    visual = make_tiny_clip(seed=5, vision_layers=12).visual.eval()
    return visual


@pytest.mark.parametrize("method", ["sclip", "naclip", "clearclip", "maskclip", "sc-clip"])
def test_patch_features_match_the_reference(deep_visual, method):
    torch.manual_seed(6)
    windows = torch.randn(2, 3, 112, 128)  # 7 x 8 patches: not the pretrained grid
    with torch.no_grad():
        ours = get_method(method).features(deep_visual, windows)
        for i in range(2):
            expected, grid = method_features_reference(deep_visual, windows[i : i + 1], method)
            assert ours.shape[1:3] == grid
            torch.testing.assert_close(ours[i].reshape(-1, ours.shape[-1]), expected, rtol=1e-4, atol=1e-4)


def test_sc_clip_windows_are_independent_in_a_batch(deep_visual):
    torch.manual_seed(7)
    windows = torch.randn(4, 3, 96, 96)
    windows[2] *= 3  # a different statistic per window changes outliers and means
    with torch.no_grad():
        batched = scclip_patch_features(deep_visual, windows)
        single = torch.cat([scclip_patch_features(deep_visual, windows[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_sc_clip_gives_a_window_the_same_bits_alone_or_in_a_batch(deep_visual):
    """196 patches: with one window, a mean over the whole similarity matrix at once is split
    across threads; the row-means-first mean is not."""
    torch.manual_seed(8)
    windows = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        batched = scclip_patch_features(deep_visual, windows)
        single = torch.cat([scclip_patch_features(deep_visual, windows[i : i + 1]) for i in range(3)])
    assert torch.equal(batched, single)


def test_sc_clip_on_windows_of_one_and_few_patches(deep_visual):
    with torch.no_grad():
        for size in (16, 32, 48):  # 1, 4 and 9 patches: fewer than 30 neighbours
            features = scclip_patch_features(deep_visual, torch.randn(2, 3, size, size))
            assert features.shape[1:3] == (size // 16, size // 16) and torch.isfinite(features).all()


def test_sc_clip_refuses_a_one_block_vit():
    visual = make_tiny_clip(vision_layers=1).visual
    with pytest.raises(ModelError, match="at least 2 blocks; this one has 1"):
        scclip_patch_features(visual, torch.zeros(1, 3, 64, 64))


@pytest.mark.parametrize("method", ["naclip", "clearclip", "maskclip"])
def test_whole_pipeline_matches_the_reference(segmenter, method):
    """Slide inference, PAMR (NACLIP's default) and labelling against the plain reference."""
    from reference_methods import pamr_stacked_reference as pamr

    # Textured everywhere: in a perfectly flat region PAMR divides rounding noise by ~1e-8, so
    # two correct implementations that round differently part there.
    noise = np.random.default_rng(8).integers(-4, 5, (96, 120, 3))
    rgb = np.clip(natural_image(96, 120).astype(int) + noise, 0, 255).astype(np.uint8)
    chosen = get_method(method)
    result = segmenter.segment(rgb, CLASSES, method=method, return_probs=True, short_side=112,
                               window=64 if method != "clearclip" else 96, stride=32 if method != "clearclip" else 48)
    clip = segmenter.load().clip
    vocabulary_names = ["person", "astronaut", "sky", "flag", "banner", "rocket"]
    text = torch.from_numpy(segmenter.text_features(vocabulary_names))
    _, _, probs = sclip_reference(
        clip, text, [0, 0, 1, 2, 2, 3], rgb, short_side=112,
        window=result.params["window"], stride=result.params["stride"], logit_scale=chosen.logit_scale,
        features=lambda visual, crop: method_features_reference(visual, crop, method),
        refine=(lambda image, logits: pamr(image, logits)) if chosen.refinement else None,
    )
    assert result.params["pamr"] == (method == "naclip")
    np.testing.assert_allclose(result.probs, probs, atol=2e-3)


def test_method_defaults_and_overrides(segmenter):
    rgb = natural_image(60, 80)
    clear = segmenter.segment(rgb, ["a", "b"], method="clearclip")
    assert (clear.params["short_side"], clear.params["window"], clear.params["stride"]) == (448, 448, 224)
    assert clear.params["logit_scale"] == 50.0 and clear.params["method"] == "clearclip"
    tuned = segmenter.segment(rgb, ["a", "b"], method="clearclip", window=224, stride=112, logit_scale=10)
    assert (tuned.params["window"], tuned.params["stride"], tuned.params["logit_scale"]) == (224, 112, 10.0)
    naclip = segmenter.segment(rgb, ["a", "b"], method="NACLIP")
    assert naclip.params["pamr"] and naclip.params["pamr_dilations"] == [8, 16]
    assert not segmenter.segment(rgb, ["a", "b"], method="naclip", pamr=False).params["pamr"]
    assert segmenter.segment(rgb, ["a", "b"], pamr=True).params["pamr_iterations"] == 10
    assert segmenter.segment(rgb, ["a", "b"]).params["method"] == "sclip"


def test_unknown_method_is_a_clear_error(tiny_checkpoint):
    with pytest.raises(ParameterError, match="unknown method 'fastclip'; choose one of sclip, naclip"):
        Segmenter(TINY_MODEL, str(tiny_checkpoint), "cpu", method="fastclip")
    assert set(METHODS) == {"sclip", "naclip", "sc-clip", "clearclip", "maskclip"}
    assert all(m.description and len(m.description) < 90 for m in METHODS.values())


def test_pamr_tiles_equal_one_whole_image(segmenter, monkeypatch):
    rgb = natural_image(150, 170)
    whole = segmenter.segment(rgb, CLASSES, method="naclip", return_probs=True)
    monkeypatch.setattr(segmenter_module, "_PAMR_ELEMENTS", 30 * (64 + 2 * 160) ** 2)  # 64 px tiles
    assert len(segmenter_module._tiles((150, 170), 6, get_method("naclip").refinement)) > 4
    tiled = segmenter.segment(rgb, CLASSES, method="naclip", return_probs=True)
    np.testing.assert_allclose(tiled.probs, whole.probs, atol=1e-5)
    np.testing.assert_array_equal(tiled.labels, whole.labels)
