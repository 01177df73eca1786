"""How long napari's GUI thread stalls while the widget segments and re-segments a large image.

Run from the repository root under a display (Xvfb works):

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/bench_widget.py --size 3000 4000

A 10 ms QTimer ticks on the GUI thread; the largest gap between ticks is the longest stall a user
would feel.  The first run creates the labels layer; the re-runs change the vocabulary so that
every pixel is rewritten through napari's undo history.  The model is a random ViT-B-16 (see
bench_engine.py): the GUI thread's work does not depend on the weights.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=2, default=(3000, 4000), metavar=("H", "W"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["NAPARI_SCLIP_CACHE_DIR"] = tmp
        from bench_engine import _checkpoint

        os.environ["NAPARI_SCLIP_PRETRAINED"] = str(_checkpoint(Path(tmp)))
        os.environ["NAPARI_SCLIP_MODEL"] = "ViT-B-16"
        os.environ["NAPARI_SCLIP_DEVICE"] = "cpu"

        import napari
        from qtpy.QtCore import QTimer
        from qtpy.QtWidgets import QApplication

        viewer = napari.Viewer()
        image = (np.random.default_rng(0).random((*args.size, 3)) * 255).astype(np.uint8)
        viewer.add_image(image, name="big", rgb=True)
        _, widget = viewer.window.add_plugin_dock_widget("napari-sclip", "SCLIP segmentation")

        print(f"image {args.size[0]} x {args.size[1]} RGB")
        for run, vocabulary in enumerate((["cat", "dog", "grass"], ["sky", "tree"], ["road", "car", "person"])):
            ticks: list[float] = []
            timer = QTimer()
            timer.setInterval(10)
            timer.timeout.connect(lambda ticks=ticks: ticks.append(time.perf_counter()))
            widget.set_vocabulary(vocabulary)
            timer.start()
            start = time.perf_counter()
            widget.segment()
            while widget.running:
                QApplication.processEvents()
                time.sleep(0.002)
            timer.stop()
            gaps = np.diff(ticks) * 1000
            kind = "first run (new layer)" if run == 0 else "re-run (all pixels rewritten)"
            print(f"{kind:<30} {time.perf_counter() - start:5.1f} s   largest GUI stall {gaps.max():4.0f} ms   "
                  f"99th percentile {np.percentile(gaps, 99):4.0f} ms   ({widget._status.text()})")
        viewer.close()


if __name__ == "__main__":
    main()
