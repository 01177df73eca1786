"""Packaging: cheap import, the manifest inside the wheel, and the Mesa/triton import guard."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_import_is_cheap():
    done = _run(
        """
        import sys, napari_sclip, napari_sclip.cli, napari_sclip.colors
        from napari_sclip.engine import config, vocabulary, image, errors
        heavy = sorted(m for m in ("torch", "open_clip", "napari", "qtpy") if m in sys.modules)
        print(heavy)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_opening_the_widget_and_reader_does_not_import_torch():
    """Nor pandas (0.2 s): napari imports these on its GUI thread; the widget's worker loads them."""
    done = _run(
        """
        import sys
        import napari_sclip.plugin.widget, napari_sclip.plugin.sample_data
        from napari_sclip.plugin.io import get_reader
        get_reader("dataset.json")  # napari asks the reader about every dataset.json it opens
        print(sorted(m for m in ("torch", "open_clip", "pandas") if m in sys.modules))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_public_api_loads_on_demand():
    done = _run("import napari_sclip, sys; napari_sclip.Segmenter; print('torch' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


def test_manifest_is_found_by_npe2():
    npe2 = pytest.importorskip("npe2")
    manifest = npe2.PluginManifest.from_distribution("napari-sclip")
    assert manifest.name == "napari-sclip"


def test_wheel_ships_the_manifest_and_entry_points(tmp_path):
    pytest.importorskip("hatchling")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = tmp_path.glob("napari_sclip-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        manifest = archive.read("napari_sclip/napari.yaml").decode()
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert manifest == (ROOT / "napari.yaml").read_text()
    assert "[napari.manifest]\nnapari-sclip = napari_sclip:napari.yaml" in entry_points
    assert "napari-sclip = napari_sclip.cli:main" in entry_points
    assert not any(n.startswith(("src_tests/", "benchmarks/")) for n in names)


def test_guard_hides_triton_only_when_mesa_llvm_is_mapped(tmp_path, monkeypatch):
    from napari_sclip.engine import _torch

    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libLLVM-15.so.1\n")
    assert _torch.mesa_llvm_loaded(maps)
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/libc.so.6\n")
    assert not _torch.mesa_llvm_loaded(maps)
    assert not _torch.mesa_llvm_loaded(tmp_path / "missing")

    monkeypatch.delitem(sys.modules, "triton", raising=False)
    monkeypatch.setattr(_torch, "mesa_llvm_loaded", lambda: True)
    assert _torch.hide_triton_if_mesa_loaded()
    with pytest.raises(ImportError):
        import triton  # noqa: F401
    monkeypatch.delitem(sys.modules, "triton")


@pytest.mark.gui
def test_engine_runs_inside_a_napari_window_on_mesa(display, tiny_dir, tiny_checkpoint):
    """napari's OpenGL canvas first, then the engine's lazy torch/open_clip import and a real
    segmentation, in one process: without the guard this segfaults on Mesa (llvmpipe)."""
    done = _run(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import numpy as np
        import napari
        from qtpy.QtWidgets import QApplication

        viewer = napari.Viewer(show=True)
        viewer.add_image(np.zeros((32, 32), np.uint8))
        QApplication.processEvents()
        mapped = "libLLVM" in open("/proc/self/maps").read()

        # The plugin's lazy import of torch and open_clip happens here, after the canvas exists.
        from napari_sclip import Segmenter
        from conftest import register_tiny_model
        from pathlib import Path
        register_tiny_model(Path({str(tiny_dir)!r}))
        result = Segmenter("sclip-test-tiny", {str(tiny_checkpoint)!r}, "cpu").segment(
            np.zeros((40, 50, 3), np.uint8), ["a", "b"])
        viewer.add_labels(result.labels)
        QApplication.processEvents()
        print("mesa-llvm" if mapped else "no-mesa-llvm", "triton-hidden" if sys.modules.get("triton", 0) is None else "triton-free", result.labels.shape)
        viewer.close()
        """
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    line = done.stdout.strip().splitlines()[-1]
    assert line.endswith("(40, 50)")
    if line.startswith("mesa-llvm"):
        assert "triton-hidden" in line


def test_closing_napari_while_the_engine_still_imports_exits_cleanly(display):
    """A script that docks the widget and closes the viewer at once: the widget's background
    import is still running when the interpreter exits (Qt aborted the process, exit 134)."""
    done = _run(
        """
        import time
        from qtpy.QtWidgets import QApplication
        from napari_sclip.cli import open_gui
        viewer, widget = open_gui([])
        end = time.time() + 0.3
        while time.time() < end:
            QApplication.processEvents()
            time.sleep(0.02)
        viewer.close()
        print("closed")
        """
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.strip().splitlines()[-1] == "closed" and "Traceback" not in done.stderr


def test_npe2_validates_the_manifest_with_imports():
    done = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", "--imports", "napari-sclip"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "valid" in done.stdout
