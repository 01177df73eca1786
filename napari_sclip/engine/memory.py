"""How much memory a model and a segmentation will take, before anything is loaded.

Pure Python (no torch), so the widget can show it on napari's GUI thread.  The estimate is the
fp32 weights plus the larger of two transients: the checkpoint's tensors while the model loads
(at most the fp32 weights again), and the largest working set of a run: one batch of windows
going through one block (or, for SC-CLIP, the hidden states it keeps), the logit canvas of the
resized image and the outputs at the input's size.  docs/benchmarks.md compares it with measured
peaks.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

from napari_sclip.engine import config


@dataclass(frozen=True)
class Architecture:
    """The shape of a CLIP ViT, as its open_clip config gives it."""

    patch_size: int
    depth: int
    width: int
    heads: int
    mlp_ratio: float
    image_size: int
    embed_dim: int
    text_width: int
    text_depth: int
    vocab_size: int
    context_length: int

    @classmethod
    def from_config(cls, model_cfg: dict) -> Architecture:
        """The shape a config gives (open_clip's defaults where it is silent); a ``ValueError``
        where a size is not a whole number (booleans included)."""
        vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
        width = _whole(vision.get("width"), 768)
        image_size = vision.get("image_size", 224)
        if isinstance(image_size, (list, tuple)):  # (height, width): the larger bounds the grid
            image_size = max(_whole(side, 224) for side in image_size)
        return cls(
            patch_size=_whole(vision.get("patch_size"), 16),
            depth=_whole(vision.get("layers"), 12),
            width=width,
            heads=width // max(_whole(vision.get("head_width"), 64), 1),
            mlp_ratio=_real(vision.get("mlp_ratio"), 4.0),
            image_size=_whole(image_size, 224),
            embed_dim=_whole(model_cfg.get("embed_dim"), 512),
            text_width=_whole(text.get("width"), 512),
            text_depth=_whole(text.get("layers"), 12),
            vocab_size=_whole(text.get("vocab_size"), 49408),
            context_length=_whole(text.get("context_length"), 77),
        )

    @staticmethod
    def _blocks(width: int, depth: int, ratio: float) -> int:
        # attention 4w² + 4w, two LayerNorms 4w, MLP 2rw² + rw + w
        hidden = int(ratio * width)
        return depth * (4 * width * width + 4 * width + 4 * width + 2 * width * hidden + hidden + width)

    @property
    def parameters(self) -> int:
        """Parameters of the whole CLIP (both towers), as open_clip builds it."""
        w, grid = self.width, self.image_size // self.patch_size
        vision = (3 * self.patch_size**2 * w + w + (grid * grid + 1) * w + 4 * w
                  + self._blocks(w, self.depth, self.mlp_ratio) + w * self.embed_dim)
        t = self.text_width
        text = (self.vocab_size * t + self.context_length * t + self._blocks(t, self.text_depth, 4.0)
                + 2 * t + t * self.embed_dim + 1)
        return vision + text


def _real(value, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{value!r} is not a finite number")
    return float(value)


def _whole(value, default: int) -> int:
    number = _real(value, default)
    if number != int(number):
        raise ValueError(f"{value!r} is not a whole number")
    return int(number)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes: the fp32 weights, the checkpoint's tensors while loading (at most as much again),
    and the working set of segmenting one image."""

    weights: int
    working: int

    @property
    def loading(self) -> int:
        return self.weights

    @property
    def total(self) -> int:
        """The peak: the weights, plus the larger of the loading copy and the working set."""
        return self.weights + max(self.loading, self.working)

    def describe(self) -> str:
        return (f"up to {_size(self.total)} ({_size(self.weights)} of weights, twice that while loading; "
                f"{_size(self.working)} for this image)")


def _size(count: int) -> str:
    return f"{count / 1e9:.1f} GB" if count >= 1e9 else f"{max(count / 1e6, 1):.0f} MB"


def architecture_of(model: str | None, pretrained: str | None = None, *, load: bool = True) -> Architecture | None:
    """The architecture that ``model`` names, found without downloading anything: a preset's,
    an open_clip name's, or a ``local-dir:`` folder's (or a folder given as ``pretrained``);
    ``None`` for a Hugging Face repo, whose config is not here yet.  ``load=False`` never imports
    the engine (napari's GUI thread): an open_clip name gives ``None`` until it is loaded."""
    from napari_sclip.engine.presets import find_preset
    from napari_sclip.engine.sources import (
        CONFIG_FILE,
        LOCAL_DIR,
        plausible,
        read_config_file,
        registered_config,
    )

    try:
        model = str(model or config.default_model()).strip()
        preset = find_preset(model)
        if preset is not None:
            model = preset.architecture
        folder = None
        if model.startswith(LOCAL_DIR):
            folder = Path(model[len(LOCAL_DIR):]).expanduser()
        elif pretrained and pretrained.startswith(LOCAL_DIR):
            folder = Path(pretrained[len(LOCAL_DIR):]).expanduser()
        elif pretrained and Path(pretrained).expanduser().is_dir():
            folder = Path(pretrained).expanduser()
        if folder is None and not load and "napari_sclip.engine._torch" not in sys.modules:
            return None
        model_cfg = read_config_file(folder / CONFIG_FILE)[0] if folder else registered_config(model)
        return Architecture.from_config(model_cfg) if model_cfg and plausible(model_cfg) else None
    except Exception:  # an unreadable or odd config is reported in one line when the model loads
        return None


def estimate_memory(
    arch: Architecture,
    image_shape: tuple[int, int],
    names: int,
    *,
    method: str = "sclip",
    short_side: int = config.DEFAULT_SHORT_SIDE,
    window: int = config.DEFAULT_WINDOW,
    batch_size: int = 4,
    half_precision: bool = False,
) -> MemoryEstimate:
    """Memory to segment an ``image_shape`` image into ``names`` class names.

    ``half_precision`` is CUDA's fp16 autocast (activations of 2 bytes).  The resize follows
    the engine's (short side ``short_side``, long side at most 2048).
    """
    height, width = image_shape
    scale = min(short_side / max(min(height, width), 1), config.LONG_SIDE_CAP / max(height, width, 1))
    resized = (max(round(height * scale), arch.patch_size), max(round(width * scale), arch.patch_size))
    grid = (min(window, resized[0]) // arch.patch_size) * (min(window, resized[1]) // arch.patch_size)
    tokens = grid + 1
    activation = 2 if half_precision else 4
    # One block: the input, q/k/v, the MLP's hidden layer and the output, per token.
    block = batch_size * tokens * arch.width * (5 + arch.mlp_ratio) * activation
    attention = batch_size * arch.heads * tokens * tokens * activation  # where attention is not fused
    kept = 0
    if method == "sc-clip":  # every block's output, and patch-by-patch similarities and distances
        kept = batch_size * tokens * arch.width * (arch.depth - 1) * activation + 6 * batch_size * grid * grid * 4
    canvas = names * resized[0] * resized[1] * 4
    outputs = height * width * (2 + 4) + (1 << 25)  # labels, confidence, one band of logits
    working = int(block + attention + kept + canvas + outputs)
    return MemoryEstimate(weights=arch.parameters * 4, working=working)


def describe_choice(model: str | None, pretrained: str | None, *, load: bool = True) -> str:
    """One line for menus: the preset's description and size, or the architecture's size."""
    from napari_sclip.engine.presets import preset_for
    from napari_sclip.engine.sources import normalise_choice

    preset = preset_for(*normalise_choice(model, pretrained))
    arch = architecture_of(model, pretrained, load=load)
    if preset is not None:
        terms = f"; {preset.terms}" if preset.terms else ""
        return f"{preset.description}; {_size(preset.size_mb * 10**6)} download{terms}"
    if arch is not None:
        return f"ViT with {arch.patch_size} px patches, {arch.depth} blocks; {_size(arch.parameters * 4)} of weights"
    return "its size is known once its config is read"
