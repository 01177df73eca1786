"""Training-free dense CLIP methods: each is how the last block(s) of CLIP's ViT turn windows into
patch features, plus the settings its authors use.

========== ======================================================================
``sclip``     SCLIP (ECCV 2024): Correlative Self-Attention; the default
``naclip``    NACLIP (WACV 2025): key-key attention with a Gaussian neighbourhood, PAMR
``sc-clip``   SC-CLIP: outlier repair, self-calibrated attention, multi-level fusion
``clearclip`` ClearCLIP (ECCV 2024): query-query attention, no residual, 448 px windows
``maskclip``  MaskCLIP (ECCV 2022): the value path alone; the classic baseline
========== ======================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from napari_sclip.engine import config
from napari_sclip.engine.errors import ParameterError


@dataclass(frozen=True)
class Refinement:
    """PAMR settings (:mod:`napari_sclip.engine.pamr`)."""

    iterations: int = 10
    dilations: tuple[int, ...] = (8, 16)


@dataclass(frozen=True)
class Method:
    """A dense CLIP method and its authors' defaults.

    ``features(visual, pixels)`` maps ``(B, 3, H, W)`` normalised windows to ``(B, rows, cols, E)``
    L2-normalised patch features; it never mixes the windows of a batch.  ``settings(visual)``
    gives what results record of the method on that ViT beyond the shared parameters (``None``:
    nothing).  The window, stride and short side are in pixels, the same for every patch size:
    the authors use them unchanged with ViT-L/14 (SC-CLIP, ClearCLIP) and give none for /32.
    """

    name: str
    title: str
    description: str
    features: Callable
    short_side: int = config.DEFAULT_SHORT_SIDE
    window: int = config.DEFAULT_WINDOW
    stride: int = config.DEFAULT_STRIDE
    logit_scale: float = config.DEFAULT_LOGIT_SCALE
    refinement: Refinement | None = None
    settings: Callable | None = None


def _features(module: str, function: str) -> Callable:
    """Import the method's module on first use (they all import torch)."""

    def features(*args):
        import importlib

        return getattr(importlib.import_module(f"napari_sclip.engine.methods.{module}"), function)(*args)

    features.__name__ = function
    return features


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("sclip", "SCLIP", "Correlative self-attention (ECCV 2024); the default",
               _features("sclip", "sclip_patch_features")),
        Method("naclip", "NACLIP", "Neighbourhood-aware key-key attention, refined with PAMR (WACV 2025)",
               _features("naclip", "naclip_patch_features"), refinement=Refinement()),
        Method("sc-clip", "SC-CLIP", "Self-calibrated: outlier repair and multi-level fusion; best published mIoU",
               _features("scclip", "scclip_patch_features"), settings=_features("scclip", "scclip_settings")),
        Method("clearclip", "ClearCLIP", "Query-query attention without residual, 448 px windows (ECCV 2024)",
               _features("clearclip", "clearclip_patch_features"),
               short_side=448, window=448, stride=224, logit_scale=50.0),
        Method("maskclip", "MaskCLIP", "The value path alone (ECCV 2022); the classic baseline",
               _features("maskclip", "maskclip_patch_features")),
    )
}
DEFAULT_METHOD = "sclip"


def get_method(name: str) -> Method:
    """The method called ``name`` (case-insensitive); a clear error lists the others."""
    key = str(name).strip().lower()
    if key not in METHODS:
        raise ParameterError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[key]
