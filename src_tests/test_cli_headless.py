"""``napari-sclip gui`` on a machine without a display: one line, not Qt's abort."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the X/Wayland display check is Linux's")
def test_gui_without_a_display_says_what_to_do_in_one_line():
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    done = subprocess.run(
        [sys.executable, "-m", "napari_sclip.cli", "gui"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no display" in lines[0] and "xvfb-run" in lines[0], done.stderr
    # The check runs before anything imports Qt or napari (cheap, and before Qt can abort).
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from napari_sclip.cli import _check_display\n"
         "try:\n    _check_display()\nexcept Exception: pass\nprint('qtpy' in sys.modules, 'napari' in sys.modules)"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert probe.stdout.split() == ["False", "False"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the X/Wayland display check is Linux's")
def test_review_without_a_display_names_its_own_command(tmp_path):
    import numpy as np

    from napari_sclip.classes import ClassRegistry
    from napari_sclip.dataset.writer import DatasetWriter, Sample

    with DatasetWriter(tmp_path / "ds", ClassRegistry({1: ("cat",)}, [1])) as writer:
        writer.write(Sample("a", np.ones((20, 20), np.uint8), image=np.zeros((20, 20), np.uint8)))
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    done = subprocess.run([sys.executable, "-m", "napari_sclip.cli", "review", str(tmp_path / "ds")], env=env,
                          capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and "xvfb-run -a napari-sclip review" in lines[0], done.stderr
