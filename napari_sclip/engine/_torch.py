"""Import torch and open_clip safely, also inside a process that already renders with Mesa's OpenGL.

Mesa's llvmpipe (and the Intel and AMD Linux drivers) load their own ``libLLVM``.  torch pulls in
triton when open_clip (through timm and torch's compiler stack) is imported, and triton's bundled
LLVM clashes with the one already loaded: the process segfaults.  napari creates its OpenGL canvas
long before the plugin needs a model, so when a Mesa ``libLLVM`` is mapped into this process we hide
triton before torch is imported.  torch then runs without triton, which it only needs for
``torch.compile`` on CUDA, something the engine does not use.
"""

from __future__ import annotations

import sys
from pathlib import Path

_MAPS = Path("/proc/self/maps")


def mesa_llvm_loaded(maps: Path = _MAPS) -> bool:
    """Whether a ``libLLVM`` shared library is mapped into this process (Linux only)."""
    try:
        return "libLLVM" in maps.read_text(errors="replace")
    except OSError:  # not Linux, or /proc unavailable
        return False


def hide_triton_if_mesa_loaded() -> bool:
    """Make ``import triton`` fail when Mesa's LLVM is loaded and triton is not yet imported.

    Returns whether triton was hidden.  A ``None`` entry in :data:`sys.modules` makes every later
    ``import triton`` raise ImportError, which torch and timm treat as "triton not installed".
    """
    if "triton" in sys.modules or not mesa_llvm_loaded():
        return False
    sys.modules["triton"] = None  # type: ignore[assignment]
    return True


hide_triton_if_mesa_loaded()

import open_clip  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

__all__ = ["F", "hide_triton_if_mesa_loaded", "mesa_llvm_loaded", "open_clip", "torch"]
