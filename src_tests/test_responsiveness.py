"""A fresh napari process stays responsive on the first click: torch and open_clip are imported in
a worker, never on the GUI thread, and the import's GIL bursts are kept short.

Each test starts its own interpreter: the test session has long imported torch, which would hide
where a fresh process imports it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import TINY_MODEL

#: Runs first in the fresh interpreter.  Records whether the GUI (main) thread was the one that
#: imported torch and open_clip, and that created or loaded a Segmenter (``ON_MAIN_THREAD``);
#: registers the tiny model with open_clip right after open_clip's own import (registering it up
#: front would import open_clip on the main thread).
WATCH_IMPORTS = """
import importlib.abc, importlib.machinery, sys, threading

ON_MAIN_THREAD = {}

def on_main_thread(what):
    ON_MAIN_THREAD[what] = ON_MAIN_THREAD.get(what, False) or threading.current_thread() is threading.main_thread()

def watch_segmenter(module):
    for method in ("__init__", "load"):
        def watched(self, *args, _method=getattr(module.Segmenter, method), _name=method, **kwargs):
            on_main_thread(f"Segmenter.{_name}")
            return _method(self, *args, **kwargs)
        setattr(module.Segmenter, method, watched)

AFTER_IMPORT = {
    "open_clip": lambda module: module.add_model_config(TINY_CONFIG),
    "napari_sclip.engine.segmenter": watch_segmenter,
}

class WatchImports(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in ("torch", "open_clip") and name not in ON_MAIN_THREAD:
            on_main_thread(name)
        if name not in AFTER_IMPORT:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            AFTER_IMPORT[name](module)

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, WatchImports())
"""


def _fresh(code: str, tiny_dir: Path, env: dict | None = None) -> dict:
    """Run ``code`` after WATCH_IMPORTS in a new interpreter; it prints one JSON line last."""
    preamble = f"TINY_CONFIG = {str(tiny_dir / f'{TINY_MODEL}.json')!r}\n" + WATCH_IMPORTS
    done = subprocess.run(
        [sys.executable, "-c", preamble + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.gui
def test_first_click_in_a_fresh_napari_keeps_the_gui_thread_free(display, tiny_dir, tiny_checkpoint, tmp_path):
    """Open the widget, type classes, click the real Segment button, wait for the labels: torch
    and open_clip are imported by a worker, and the event loop never stalls for long."""
    result = _fresh(
        """
        import gc, json, os, time, weakref
        import numpy as np
        import napari
        from qtpy.QtCore import QPoint, Qt, QTimer
        from qtpy.QtTest import QTest
        from qtpy.QtWidgets import QApplication, QPlainTextEdit, QPushButton

        def wait(condition, timeout=300):
            end = time.perf_counter() + timeout
            while not condition():
                assert time.perf_counter() < end, "timed out"
                QApplication.processEvents()
                time.sleep(0.005)

        viewer = napari.Viewer(show=True)
        image = (np.random.default_rng(0).random((600, 800, 3)) * 255).astype(np.uint8)
        viewer.add_image(image, name="img", rgb=True)
        settled = time.perf_counter() + 0.5
        wait(lambda: time.perf_counter() > settled)
        ticks = []
        timer = QTimer()
        timer.setInterval(10)
        timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
        timer.start()

        _, widget = viewer.window.add_plugin_dock_widget("napari-sclip", "SCLIP segmentation")
        editor = widget.findChild(QPlainTextEdit)
        editor.selectAll()
        QTest.keyClicks(editor, "cat")
        for name in ("dog", "grass"):
            QTest.keyClick(editor, Qt.Key.Key_Return)
            QTest.keyClicks(editor, name)
        typed = editor.toPlainText()
        button = next(b for b in widget.findChildren(QPushButton) if b.text() == "Segment")
        QTest.mouseClick(button, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, QPoint(5, 5))
        wait(lambda: "img labels" in viewer.layers and button.text() == "Segment")
        landed = len(ticks)
        wait(lambda: len(ticks) > landed + 1)  # the ticks that end the landing's gap
        timer.stop()

        layer = viewer.layers["img labels"]
        labels = layer.data
        # A removed image is freed: nothing froze it, and no finished worker holds it.
        image_layer = weakref.ref(viewer.layers["img"])
        viewer.layers.remove("img")
        wait(lambda: True)
        gc.collect()
        print(json.dumps({
            "on_main_thread": ON_MAIN_THREAD,
            "typed": typed,
            "shape": list(labels.shape),
            "values": sorted(int(v) for v in np.unique(labels)),
            "classes": list(layer.features["class_name"]) if "class_name" in layer.features else [],
            "ticks": len(ticks),
            "longest_gap": float(np.diff(ticks).max()),
            "mesa_llvm": "libLLVM" in open("/proc/self/maps").read(),
            "triton_hidden": sys.modules.get("triton", 0) is None,
            "removed_layer_freed": image_layer() is None,
            "frozen": gc.get_freeze_count(),
        }), flush=True)
        os._exit(0)  # skip napari's teardown
        """,
        tiny_dir,
        {
            "NAPARI_SCLIP_MODEL": TINY_MODEL,
            "NAPARI_SCLIP_PRETRAINED": str(tiny_checkpoint),
            "NAPARI_SCLIP_DEVICE": "cpu",
            "NAPARI_SCLIP_CACHE_DIR": str(tmp_path / "cache"),
        },
    )
    assert result["typed"] == "cat\ndog\ngrass"
    assert result["shape"] == [600, 800]
    assert set(result["values"]) <= {1, 2, 3} and result["values"]
    assert result["classes"] == ["unlabelled", "cat", "dog", "grass"]
    # Both were imported, and the model made and loaded, by workers.
    assert result["on_main_thread"] == {
        "torch": False, "open_clip": False, "Segmenter.__init__": False, "Segmenter.load": False
    }
    if result["mesa_llvm"]:  # the import went through the Mesa/triton guard
        assert result["triton_hidden"]
    # The flow's correctness, not a benchmark (benchmarks/bench_responsiveness.py measures): an
    # import on the GUI thread stalls it for seconds.
    assert result["removed_layer_freed"] and result["frozen"] == 0
    assert result["ticks"] > 50
    assert result["longest_gap"] < 1.0, f"the GUI thread stalled for {result['longest_gap']:.2f} s"


def test_load_engine_loads_libtorch_without_the_gil_and_collects_once(tiny_dir):
    """Two threads at once: one import, by a worker.  libtorch came through the GIL-free loader;
    the import ran one full garbage collection, at its end (without the deferral it runs five or
    six); the collector's settings are back and nothing is frozen; the loader's finder is gone."""
    result = _fresh(
        """
        import gc, json, sys, threading, time
        from napari_sclip.plugin import engine_loader

        full = []
        gc.callbacks.append(lambda phase, info: phase == "start" and info["generation"] == 2
                            and full.append(time.perf_counter()))
        thresholds = gc.get_threshold()
        threads = [threading.Thread(target=engine_loader.load_engine) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        done = time.perf_counter()
        import torch

        print(json.dumps({
            "on_main_thread": ON_MAIN_THREAD,
            "loader": type(torch._C.__loader__).__name__,
            "works": float(torch.ones(3).sum()),
            "pandas": "pandas" in sys.modules,
            "full_collections": len(full),
            "last_collection_before_done_s": done - full[-1] if full else None,
            "thresholds_restored": gc.get_threshold() == thresholds and gc.isenabled(),
            "frozen": gc.get_freeze_count(),
            "finders": [type(finder).__name__ for finder in sys.meta_path],
            "devices": engine_loader.engine_devices(),
        }))
        """,
        tiny_dir,
    )
    assert result["on_main_thread"] == {"torch": False, "open_clip": False}
    assert result["loader"] == "_LibtorchFirstLoader"
    assert result["works"] == 3.0 and result["pandas"]
    assert result["full_collections"] == 1 and result["last_collection_before_done_s"] < 5.0, result
    assert result["thresholds_restored"] and result["frozen"] == 0
    assert "_LibtorchFirst" not in result["finders"]
    assert result["devices"][-1] == "cpu"


@pytest.mark.parametrize("setting", ["gc.disable()", "gc.set_threshold(0)"])
def test_load_engine_leaves_a_collector_the_application_runs_alone(tiny_dir, setting):
    result = _fresh(
        f"""
        import gc, json
        from napari_sclip.plugin import engine_loader

        full = []
        gc.callbacks.append(lambda phase, info: phase == "start" and info["generation"] == 2 and full.append(1))
        {setting}
        before = (gc.isenabled(), gc.get_threshold())
        engine_loader.load_engine()
        print(json.dumps({{"unchanged": (gc.isenabled(), gc.get_threshold()) == before, "full": len(full)}}))
        """,
        tiny_dir,
    )
    assert result == {"unchanged": True, "full": 0}


def test_dlopen_releasing_gil_loads_a_library_and_ignores_what_is_not_one(tmp_path):
    import zlib  # noqa: F401  (maps libz into this process)

    from napari_sclip.plugin.engine_loader import dlopen_releasing_gil

    assert not dlopen_releasing_gil(str(tmp_path / "missing.so"))
    (tmp_path / "junk.so").write_bytes(b"not a shared library")
    assert not dlopen_releasing_gil(str(tmp_path / "junk.so"))
    maps = Path("/proc/self/maps")
    if maps.exists():
        libz = next((line.split()[-1] for line in maps.read_text().splitlines() if "/libz.so" in line), None)
        if libz is not None:
            assert dlopen_releasing_gil(libz)
