"""Shared fixtures: a tiny, randomly initialised CLIP ViT registered with open_clip and saved to
checkpoint files, so that every test goes through the same loading code as real weights.

Nothing is downloaded: the cache folder and the environment defaults point at temporary files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

TINY_MODEL = "sclip-test-tiny"
#: 14 x 14 patches of 16 px (the real geometry), 3 blocks of width 64 with 2 heads.
TINY_CONFIG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 3, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


#: The same with 12 vision blocks, as SC-CLIP's block indices need.
TINY_DEEP_MODEL = "sclip-test-tiny-deep"
TINY_DEEP_CONFIG = {**TINY_CONFIG, "vision_cfg": {**TINY_CONFIG["vision_cfg"], "layers": 12}}


def register_tiny_model(folder: Path) -> None:
    """Make ``sclip-test-tiny`` and ``sclip-test-tiny-deep`` known to open_clip (idempotent)."""
    # Through the Mesa guard: a GUI test may have made a canvas first.
    from napari_sclip.engine._torch import open_clip

    for name, cfg in ((TINY_MODEL, TINY_CONFIG), (TINY_DEEP_MODEL, TINY_DEEP_CONFIG)):
        if name not in open_clip.list_models():
            path = folder / f"{name}.json"
            path.write_text(json.dumps(cfg))
            open_clip.add_model_config(path)


def random_clip(cfg: dict, seed: int = 0):
    """A CLIP of open_clip config ``cfg`` with random weights and non-trivial biases (so that
    every term of the attention matters)."""
    from napari_sclip.engine._torch import open_clip, torch

    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.02)
    return model


def make_tiny_clip(seed: int = 0, vision_layers: int | None = None):
    """The tiny CLIP with random weights; ``vision_layers`` overrides the ViT's depth."""
    cfg = json.loads(json.dumps(TINY_CONFIG))
    if vision_layers is not None:
        cfg["vision_cfg"]["layers"] = vision_layers
    return random_clip(cfg, seed)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    register_tiny_model(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_dir) -> Path:
    """An open_clip-layout state dict of the tiny model, saved with ``torch.save``."""
    import torch

    path = tiny_dir / "tiny.pt"
    torch.save(make_tiny_clip().state_dict(), path)
    return path


@pytest.fixture(autouse=True)
def _isolated_environment(tmp_path, monkeypatch):
    """Every test gets its own cache folder and no stray NAPARI_SCLIP_* settings; downloads fail."""
    for name in list(os.environ):
        if name.startswith("NAPARI_SCLIP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("NAPARI_SCLIP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import sys

    if "napari_sclip.engine.feature_cache" in sys.modules:  # no features from earlier tests
        sys.modules["napari_sclip.engine.feature_cache"].FEATURE_CACHE.clear()


@pytest.fixture
def segmenter(tiny_checkpoint):
    from napari_sclip import Segmenter

    return Segmenter(TINY_MODEL, str(tiny_checkpoint), "cpu")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def natural_image(height: int = 200, width: int = 300) -> np.ndarray:
    """scikit-image's astronaut, resized: structured content, deterministic."""
    from skimage import data, transform

    image = transform.resize(data.astronaut(), (height, width), preserve_range=True, anti_aliasing=True)
    return image.astype(np.uint8)


@pytest.fixture
def display():
    """A real X display (pytest-xvfb starts Xvfb); skipped without one, except in CI."""
    if not os.environ.get("DISPLAY"):
        if os.environ.get("CI"):
            pytest.fail("CI must run the GUI tests under Xvfb (install xvfb; pytest-xvfb starts it)")
        pytest.skip("no X display: install xvfb so that pytest-xvfb can start one")
    return os.environ["DISPLAY"]


def same_files_apart_from_timestamps(first: Path, second: Path) -> None:
    """Two dataset folders hold the same files; JSON files may differ in created/updated only, and
    the owner's journal (a cache of the meta files' time stamps) is not compared."""
    from napari_sclip.dataset.writer import JOURNAL

    def files_of(folder: Path) -> list[Path]:
        return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and p.name != JOURNAL)

    files = files_of(first)
    assert files == files_of(second)
    for relative in files:
        a, b = (first / relative).read_bytes(), (second / relative).read_bytes()
        if relative.suffix == ".json":
            a, b = json.loads(a), json.loads(b)
            for document in (a, b):
                document.pop("created", None), document.pop("updated", None)
        assert a == b, relative
