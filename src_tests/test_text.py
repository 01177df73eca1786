"""Text embeddings: truncated encoding, the 80-template average, and the caches."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from napari_sclip.engine import text as text_module
from napari_sclip.engine.text import TextEncoder, encode_tokens, prompt_templates

from conftest import TINY_MODEL
from reference_sclip import text_features_reference


def test_templates_are_openais_80():
    templates = prompt_templates()
    assert len(templates) == 80
    assert templates[0] == "a bad photo of a {}."
    assert all(t.count("{}") == 1 for t in templates)


def test_truncated_encoding_equals_full_length(segmenter):
    model = segmenter.load()
    prompts = [t.format(name) for name in ("cat", "traffic light", "a very long name " * 3) for t in prompt_templates()[:20]]
    tokens = model.tokenizer(prompts)
    assert int(tokens.argmax(-1).max()) + 1 < tokens.shape[1]  # there is something to cut
    with torch.no_grad():
        full = model.clip.encode_text(tokens)
        truncated = encode_tokens(model.clip, tokens)
    torch.testing.assert_close(truncated, full, rtol=1e-5, atol=1e-5)


def test_features_match_the_template_average(segmenter):
    model = segmenter.load()
    names = ["cat", "dog", "person in shirt"]
    with torch.no_grad():
        expected = text_features_reference(model.clip, model.tokenizer, names, list(prompt_templates()))
    actual = segmenter.text_features(names)
    assert actual.shape == (3, 32) and actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(actual, axis=1), 1.0, rtol=1e-6)


def test_order_and_repeats_are_kept(segmenter):
    a = segmenter.text_features(["cat", "dog"])
    b = segmenter.text_features(["dog", "cat", "dog"])
    np.testing.assert_array_equal(b, a[[1, 0, 1]])


def test_memory_cache_skips_the_text_tower(segmenter, monkeypatch):
    first = segmenter.text_features(["zebra"])
    monkeypatch.setattr(text_module, "encode_tokens", _fail)
    np.testing.assert_array_equal(segmenter.text_features(["zebra"]), first)


def test_disk_cache_survives_the_process_cache(segmenter, monkeypatch, tmp_path):
    monkeypatch.setattr(text_module, "_MEMORY", {})  # an earlier test may have embedded these (COCO has giraffes)
    first = segmenter.text_features(["giraffe", "okapi"])
    files = list((tmp_path / "cache" / "text").rglob("*.npy"))
    assert len(files) == 2
    monkeypatch.setattr(text_module, "_MEMORY", {})
    monkeypatch.setattr(text_module, "encode_tokens", _fail)
    np.testing.assert_array_equal(segmenter.text_features(["okapi", "giraffe"]), first[[1, 0]])


def test_corrupt_disk_entry_is_recomputed(segmenter, monkeypatch, tmp_path):
    monkeypatch.setattr(text_module, "_MEMORY", {})
    first = segmenter.text_features(["heron"])
    (path,) = (tmp_path / "cache" / "text").rglob("*.npy")
    path.write_bytes(b"not a numpy file")
    monkeypatch.setattr(text_module, "_MEMORY", {})
    np.testing.assert_allclose(segmenter.text_features(["heron"]), first)


def test_cache_key_includes_the_weights(segmenter, tiny_dir, monkeypatch):
    """Other weights under the same model name never reuse these embeddings."""
    from napari_sclip import Segmenter

    from conftest import make_tiny_clip

    other_path = tiny_dir / "other.pt"
    torch.save(make_tiny_clip(seed=99).state_dict(), other_path)
    other = Segmenter(TINY_MODEL, str(other_path), "cpu")
    a = segmenter.text_features(["cat"])
    b = other.text_features(["cat"])
    assert np.abs(a - b).max() > 1e-3


def test_unwritable_cache_only_disables_the_disk_cache(segmenter, monkeypatch, tmp_path):
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("NAPARI_SCLIP_CACHE_DIR", str(blocker))
    encoder = TextEncoder(segmenter.load())
    with pytest.warns(UserWarning, match="cache disabled"):
        features = torch.stack([encoder_features(encoder, ["ibis"])[0]])
    assert features.shape == (1, 32)


def test_names_longer_than_the_context_warn(segmenter):
    long_name = " ".join(["extraordinarily"] * 40)
    with pytest.warns(UserWarning, match="longer than CLIP's 77-token context"):
        features = segmenter.text_features([long_name])
    assert np.isfinite(features).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        segmenter.text_features(["short name"])


def encoder_features(encoder, names):
    from napari_sclip.engine.progress import drive

    return drive(encoder.iter_features(names))


def _fail(*args, **kwargs):
    raise AssertionError("the text tower ran although the embedding was cached")
