"""napari-sclip: open-vocabulary semantic segmentation with SCLIP, in napari and from Python.

The public API loads lazily so that ``import napari_sclip`` (and napari's start-up) stays cheap:
torch and open_clip are imported only when a model is first needed.

>>> from napari_sclip import Segmenter
>>> seg = Segmenter()                       # ViT-B-16 / openai on cuda, mps or cpu
>>> res = seg.segment(image, ["cat", "dog, puppy", "grass"])
>>> res.labels, res.confidence              # (H, W) label values 1..C and winning probabilities
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> module that defines it.  Resolved on first attribute access (PEP 562).
_LAZY = {
    "Segmenter": "napari_sclip.engine.segmenter",
    "SegmentationResult": "napari_sclip.engine.segmenter",
    "Progress": "napari_sclip.engine.progress",
    "Vocabulary": "napari_sclip.engine.vocabulary",
    "parse_vocabulary": "napari_sclip.engine.vocabulary",
    "SclipError": "napari_sclip.engine.errors",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # the lazy names, for type checkers and IDEs
    from napari_sclip.engine.errors import SclipError  # noqa: F401
    from napari_sclip.engine.progress import Progress  # noqa: F401
    from napari_sclip.engine.segmenter import SegmentationResult, Segmenter  # noqa: F401
    from napari_sclip.engine.vocabulary import Vocabulary, parse_vocabulary  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'napari_sclip' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
