"""Bringing the engine (torch and open_clip) into napari's process without stalling its GUI thread.

Importing torch and open_clip takes seconds, so it never happens on the GUI thread: the widget
calls :func:`engine_devices` in a worker as soon as it opens, so that the import is usually done
before the first click, and the segmentation job calls :func:`make_segmenter` in its worker.

A background import still holds the GIL in bursts, and while it does the GUI thread cannot run
either.  Two steps of the import cause the long ones (figures in docs/benchmarks.md):

* Full garbage collections.  The import allocates enough to trigger five or six, each walking
  every object of the process, napari's included, with the GIL held, each longer than the last.
  They wait until the import is done (young collections still free its garbage as it goes), and
  then one runs: it costs what every full collection costs from then on, napari's included (it
  runs one whenever a layer is removed), the price of having torch in the process.  Rejected:
  ``gc.freeze()`` would freeze napari's objects too (a layer removed later is never freed);
  freezing then unfreezing skips that collection, but later full ones take a third longer.
* Loading torch's C++ libraries (about 1 GB of code and its static initialisers).  CPython's
  ``dlopen`` calls for extension modules and ``ctypes.CDLL`` keep the GIL; calling the C library's
  ``dlopen`` as a ctypes foreign function releases it.  So right before torch imports its
  extension ``torch._C``, after its own preparations, ``libtorch`` (which does not use Python) is
  loaded that way, and Python's own ``dlopen`` of ``torch._C`` then finds it already there.

Everything still goes through :mod:`napari_sclip.engine._torch` and its Mesa/triton guard.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.abc
import importlib.machinery
import os
import sys
import threading
from collections.abc import Iterator

_LOCK = threading.Lock()
_loaded = False


def load_engine() -> None:
    """Import the engine, and pandas for the labels layer's class table, in the calling thread
    (never napari's GUI thread); returns at once once done.

    Thread-safe: a second caller waits for the first one's import.
    """
    global _loaded
    with _LOCK:
        if _loaded:
            return
        with _full_collections_deferred(), _torch_libraries_loaded_without_gil():
            import pandas  # noqa: F401

            import napari_sclip.engine.segmenter  # noqa: F401  (torch and open_clip, through the guard)
        _loaded = True


def engine_devices() -> list[str]:
    """Load the engine, then name the devices that work here, best first (``"auto"`` excluded)."""
    load_engine()
    from napari_sclip.engine.model import available_devices

    return available_devices()


def make_segmenter(model: str, pretrained: str, device: str, quick_gelu: bool | None = None):
    """A :class:`~napari_sclip.engine.segmenter.Segmenter`, loading the engine first (a worker's job)."""
    load_engine()
    from napari_sclip.engine.segmenter import Segmenter

    return Segmenter(model, pretrained, device, quick_gelu=quick_gelu)


@contextlib.contextmanager
def _full_collections_deferred() -> Iterator[None]:
    thresholds = gc.get_threshold()
    if not gc.isenabled() or thresholds[0] == 0:  # the application runs the collector itself
        yield
        return
    gc.set_threshold(thresholds[0], thresholds[1], 1 << 30)  # young collections only
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.collect()  # the one full collection the import left due, now rather than at random


class _LibtorchFirst(importlib.abc.MetaPathFinder):
    """Finds ``torch._C`` with a loader that loads ``libtorch`` without the GIL first.

    Not in ``find_spec`` itself: importlib calls finders with its global import lock held, which
    would stall every import on the GUI thread meanwhile.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "torch._C":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and type(spec.loader) is importlib.machinery.ExtensionFileLoader:
            spec.loader = _LibtorchFirstLoader(spec.loader.name, spec.loader.path)
        return spec


class _LibtorchFirstLoader(importlib.machinery.ExtensionFileLoader):
    def create_module(self, spec):
        suffix = ".dylib" if sys.platform == "darwin" else ".so"
        dlopen_releasing_gil(os.path.join(os.path.dirname(self.path), "lib", "libtorch" + suffix))
        return super().create_module(spec)


@contextlib.contextmanager
def _torch_libraries_loaded_without_gil() -> Iterator[None]:
    finder = _LibtorchFirst()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


def dlopen_releasing_gil(path: str) -> bool:
    """Load a shared library that does not use Python, letting other threads run meanwhile.

    Returns whether it loaded; a missing file or a failure does nothing (the import that needs the
    library then reports its own error).  POSIX only.
    """
    if os.name != "posix" or not os.path.isfile(path):
        return False
    try:
        dlopen = ctypes.CDLL(None).dlopen  # a foreign function: called with the GIL released
    except (OSError, AttributeError):
        return False
    dlopen.restype = ctypes.c_void_p
    dlopen.argtypes = (ctypes.c_char_p, ctypes.c_int)
    # The flags Python uses for extension modules, so that their own dlopen shares this handle.
    return bool(dlopen(os.fsencode(path), sys.getdlopenflags()))
