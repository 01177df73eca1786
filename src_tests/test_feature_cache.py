"""The image-feature cache: results equal fresh runs, what reuses and what recomputes, the byte
bound, invalidation by pixels, and no growth in the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sclip import Segmenter
from napari_sclip.engine import feature_cache
from napari_sclip.engine.feature_cache import FEATURE_CACHE, FeatureCache
from napari_sclip.engine.methods import METHODS

from conftest import TINY_DEEP_MODEL, TINY_MODEL, make_tiny_clip, natural_image

FIRST = ["person", "sky", "flag"]
SECOND = ["person, astronaut", "sky", "flag", "rocket"]


@pytest.fixture
def deep_checkpoint(tiny_dir, tmp_path_factory):
    """A 12-block tiny model (SC-CLIP needs one) saved through the same loading path."""
    path = tmp_path_factory.mktemp("deep") / "deep.pt"
    torch.save(make_tiny_clip(seed=9, vision_layers=12).state_dict(), path)
    return path


@pytest.mark.parametrize("method", list(METHODS))
def test_a_vocabulary_edit_reuses_features_and_equals_a_fresh_run(deep_checkpoint, method):
    rgb = natural_image(150, 200)
    cached = Segmenter(TINY_DEEP_MODEL, str(deep_checkpoint), "cpu", method=method)
    first = cached.segment(rgb, FIRST)
    assert not first.params["features_reused"] and len(FEATURE_CACHE) == 1
    again = cached.segment(rgb, SECOND, return_probs=True)
    assert again.params["features_reused"]
    fresh = Segmenter(TINY_DEEP_MODEL, str(deep_checkpoint), "cpu", method=method, feature_cache=False)
    expected = fresh.segment(rgb, SECOND, return_probs=True)
    np.testing.assert_array_equal(again.labels, expected.labels)
    np.testing.assert_array_equal(again.probs, expected.probs)
    np.testing.assert_array_equal(again.confidence, expected.confidence)


def test_what_reuses_and_what_recomputes(segmenter):
    rgb = natural_image(120, 160)
    assert not segmenter.segment(rgb, FIRST).params["features_reused"]
    for options in ({"logit_scale": 10.0}, {"prob_threshold": 0.6}, {"pamr": True}):
        assert segmenter.segment(rgb, SECOND, **options).params["features_reused"], options
    for options in ({"short_side": 224}, {"window": 112, "stride": 56}, {"stride": 56}, {"method": "maskclip"}):
        assert not segmenter.segment(rgb, SECOND, **options).params["features_reused"], options
        assert segmenter.segment(rgb, FIRST, **options).params["features_reused"], options


def test_changed_pixels_never_reuse_stale_features(segmenter):
    rgb = natural_image(120, 160)
    segmenter.segment(rgb, FIRST)
    edited = rgb.copy()
    edited[60:70, 80:90] = 255  # an edit large enough to survive the resize to 336 px
    result = segmenter.segment(edited, FIRST, return_probs=True)
    assert not result.params["features_reused"]
    fresh = Segmenter(segmenter.model_name, segmenter.pretrained, "cpu", feature_cache=False)
    np.testing.assert_array_equal(result.probs, fresh.segment(edited, FIRST, return_probs=True).probs)


def test_the_cache_respects_its_byte_bound(segmenter, monkeypatch):
    per_image = 8 * 14 * 14 * 32 * 4  # 8 windows of 14 x 14 patches, E = 32, float32
    monkeypatch.setattr(FEATURE_CACHE, "max_bytes", int(2.5 * per_image))
    for shift in range(4):
        segmenter.segment(np.roll(natural_image(200, 300), 7 * shift, axis=1), FIRST)
        assert FEATURE_CACHE.nbytes <= FEATURE_CACHE.max_bytes
    assert len(FEATURE_CACHE) == 2 and FEATURE_CACHE.nbytes == 2 * per_image
    # the two most recent images stay; the oldest went first
    assert segmenter.segment(np.roll(natural_image(200, 300), 21, axis=1), FIRST).params["features_reused"]
    assert not segmenter.segment(natural_image(200, 300), FIRST).params["features_reused"]


def test_lru_unit_behaviour():
    cache = FeatureCache(max_bytes=100)
    a, b, c = torch.zeros(10), torch.zeros(10), torch.zeros(20)  # 40, 40, 80 bytes
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # a is now the most recent
    cache.put("c", c)  # 160 > 100: b, then a are evicted until it fits
    assert cache.get("b") is None and cache.get("a") is None and cache.get("c") is c
    assert cache.nbytes == 80
    cache.put("huge", torch.zeros(1000))  # larger than the bound: not kept, nothing evicted
    assert cache.get("huge") is None and cache.nbytes == 80
    cache.put("c", torch.zeros(5))  # replacing an entry updates the count
    assert cache.nbytes == 20
    cache.resize(10)
    assert len(cache) == 0 and cache.nbytes == 0


def test_size_setting_and_bad_environment_value(monkeypatch):
    from napari_sclip.engine import config

    monkeypatch.setenv("NAPARI_SCLIP_FEATURE_CACHE_MB", "64")
    assert config.feature_cache_mb() == 64
    monkeypatch.setenv("NAPARI_SCLIP_FEATURE_CACHE_MB", "lots")
    with pytest.warns(UserWarning, match="not a size in MB"):
        assert config.feature_cache_mb() == 512
    before = FEATURE_CACHE.max_bytes
    try:
        feature_cache.set_feature_cache_size(0)
        assert FEATURE_CACHE.max_bytes == 0 and len(FEATURE_CACHE) == 0
    finally:
        FEATURE_CACHE.resize(before)


def test_the_cli_does_not_grow_the_cache(tmp_path, tiny_checkpoint):
    from PIL import Image

    from napari_sclip.cli import main

    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(3):
        Image.fromarray(np.roll(natural_image(80, 100), 5 * k, axis=0)).save(folder / f"{k}.png")
    code = main(["segment", str(folder), "--classes", "a; b", "--out", str(tmp_path / "ds"), "--model", TINY_MODEL,
                 "--pretrained", str(tiny_checkpoint), "--device", "cpu", "--quiet"])
    assert code == 0 and len(FEATURE_CACHE) == 0
