"""Defaults that the API, the CLI and the widget share, each overridable by an environment variable.

=========================  ==================================================  =================
Variable                   Meaning                                             Default
=========================  ==================================================  =================
``NAPARI_SCLIP_MODEL``     open_clip model name                                ``ViT-B-16``
``NAPARI_SCLIP_PRETRAINED``  open_clip pretrained tag, or a checkpoint path     ``openai``
``NAPARI_SCLIP_DEVICE``    ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``  ``auto``
``NAPARI_SCLIP_CACHE_DIR`` model downloads and the text-embedding cache        see :func:`cache_dir`
``NAPARI_SCLIP_FEATURE_CACHE_MB``  bound of the in-memory image-feature cache  ``512``
=========================  ==================================================  =================

Variables are read at call time, so a process can change them before it creates a Segmenter.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"
DEFAULT_DEVICE = "auto"

#: The paper's protocol (section 4.1): short side 336, 224 px windows moved by 112 px.
DEFAULT_SHORT_SIDE = 336
DEFAULT_WINDOW = 224
DEFAULT_STRIDE = 112
#: Logit scale of SCLIP's configs for datasets without a background class.
DEFAULT_LOGIT_SCALE = 40.0
DEFAULT_PROB_THRESHOLD = 0.0
#: The resize caps the long side at this length (the authors' ``2048 x short_side`` scale).
LONG_SIDE_CAP = 2048
#: Default bound of the image-feature cache (:mod:`napari_sclip.engine.feature_cache`).
DEFAULT_FEATURE_CACHE_MB = 512


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value or default


def default_model() -> str:
    """The model name: ``$NAPARI_SCLIP_MODEL`` or ``ViT-B-16``."""
    return _env("NAPARI_SCLIP_MODEL", DEFAULT_MODEL)


def default_pretrained() -> str:
    """The weights, a tag or a file path: ``$NAPARI_SCLIP_PRETRAINED`` or ``openai``."""
    return _env("NAPARI_SCLIP_PRETRAINED", DEFAULT_PRETRAINED)


def default_device() -> str:
    """The device: ``$NAPARI_SCLIP_DEVICE`` or ``auto`` (cuda, then mps, then cpu)."""
    return _env("NAPARI_SCLIP_DEVICE", DEFAULT_DEVICE)


def cache_dir() -> Path:
    """Where downloads and cached text embeddings live.

    ``$NAPARI_SCLIP_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/napari-sclip``, else
    ``~/.cache/napari-sclip``.  The folder is created when something is first written to it.
    """
    explicit = os.environ.get("NAPARI_SCLIP_CACHE_DIR", "").strip()
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "napari-sclip"


def models_dir() -> Path:
    """Downloaded weights: ``<cache_dir>/models``."""
    return cache_dir() / "models"


def text_cache_dir() -> Path:
    """Cached text embeddings: ``<cache_dir>/text``."""
    return cache_dir() / "text"


def feature_cache_mb() -> float:
    """``$NAPARI_SCLIP_FEATURE_CACHE_MB``, or 512; an unusable value warns and gives 512."""
    import warnings

    raw = _env("NAPARI_SCLIP_FEATURE_CACHE_MB", str(DEFAULT_FEATURE_CACHE_MB))
    try:
        value = float(raw)
        if value < 0 or value != value:
            raise ValueError
    except ValueError:
        warnings.warn(f"NAPARI_SCLIP_FEATURE_CACHE_MB={raw!r} is not a size in MB; using "
                      f"{DEFAULT_FEATURE_CACHE_MB}", stacklevel=2)
        return float(DEFAULT_FEATURE_CACHE_MB)
    return value
