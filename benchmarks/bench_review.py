"""Reviewing a dataset (issue 12): time to open, memory after opening, and time to move to the
next sample, against the dataset's size.  The goal is flat in size.

Run from the repository root under a display (napari needs OpenGL):

    xvfb-run -a python benchmarks/bench_review.py --sizes 100 2000 20000 --json review.json

Each dataset (``--size``x``--size`` px samples with labels and confidence, written once by
:class:`DatasetWriter` into ``--cache``) is opened in a fresh interpreter, as a user opens it:
a shown napari window, then :func:`show_review` (what File > Open of the manifest does).  The
figures: seconds until the panel is docked (the GUI thread's part), until the first sample
shows (found in the journal's first rows and read in a worker while the owner scans the index),
and until the queue is ready (the owner's scan of the index, the queue), the
process's RSS after opening minus before (the SCLIP widget docks too, and imports the engine in
the background: the moves start 8 s later), and the median seconds of ``next()`` over
``--moves`` moves, each after the GUI has been idle for ``--pause`` s (the prefetch's chance).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_dataset(root: Path, count: int, size: int) -> None:
    import numpy as np

    sys.path.insert(0, str(ROOT / "src_tests"))
    from napari_sclip.classes import ClassRegistry
    from napari_sclip.dataset.writer import DatasetWriter, Sample

    from conftest import natural_image

    registry = ClassRegistry({1: ("grass",), 2: ("sky",), 3: ("person",)}, [1, 2, 3])
    base = natural_image(size, size)
    labels = np.ones((size, size), np.uint8)
    labels[: size // 2] = 2
    with DatasetWriter(root, registry) as writer:
        for k in range(count):
            confidence = np.full((size, size), (k % 97) / 97, np.float32)
            writer.write(Sample(f"s{k:06d}", labels, image=np.roll(base, k, axis=1), confidence=confidence))


def measure(root: str, moves: int, pause: float) -> dict:
    """In this (fresh) process: open the review in a shown window and move on."""
    import os

    import napari
    import psutil
    from qtpy.QtWidgets import QApplication

    from napari_sclip.plugin.review_panel import show_review

    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    app.processEvents()
    process = psutil.Process(os.getpid())
    before = process.memory_info().rss
    start = time.perf_counter()
    panel = show_review(viewer, root)
    docked = time.perf_counter() - start  # the GUI thread's share: the index is read in a worker
    while panel.session is None or panel.session.current_id is None:
        app.processEvents()
        time.sleep(0.002)
    shown = time.perf_counter() - start
    while panel.session.opening:
        app.processEvents()
        time.sleep(0.002)
    opened = time.perf_counter() - start
    grown = process.memory_info().rss - before
    settle = time.perf_counter() + 8  # the docked widget imports the engine in the background
    while time.perf_counter() < settle:
        app.processEvents()
        time.sleep(0.01)
    times = []
    for _ in range(moves):
        deadline = time.perf_counter() + pause
        while time.perf_counter() < deadline:
            app.processEvents()
            time.sleep(0.005)
        start = time.perf_counter()
        panel.session.next()
        app.processEvents()
        times.append(time.perf_counter() - start)
    samples = len(panel.session)
    panel.close_review()
    viewer.close()
    times.sort()
    return {"samples": samples, "docked_s": docked, "first_sample_s": shown, "queue_ready_s": opened, "rss_growth_mb": grown / 2**20,
            "next_median_s": times[len(times) // 2], "next_max_s": times[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 2000, 20000])
    parser.add_argument("--size", type=int, default=128, help="sample height and width in pixels")
    parser.add_argument("--moves", type=int, default=15)
    parser.add_argument("--pause", type=float, default=0.3)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/napari-sclip-bench-review"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.moves, args.pause)))
        return
    rows = []
    for count in args.sizes:
        root = args.cache / f"{count}-{args.size}"
        if not (root / "dataset.json").is_file():
            start = time.perf_counter()
            make_dataset(root, count, args.size)
            print(f"wrote {count} samples in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        result = subprocess.run([sys.executable, __file__, "--measure", str(root), "--moves", str(args.moves),
                                 "--pause", str(args.pause)], capture_output=True, text=True, check=True, cwd=ROOT)
        row = {"dataset_samples": count, **json.loads(result.stdout.strip().splitlines()[-1])}
        rows.append(row)
        print(f"{count:>7} samples: panel docked {row['docked_s']:.3f} s, first sample {row['first_sample_s']:.3f} s, "
              f"queue ready {row['queue_ready_s']:.3f} s, "
              f"RSS +{row['rss_growth_mb']:.0f} MB, "
              f"next {row['next_median_s'] * 1000:.1f} ms (max {row['next_max_s'] * 1000:.1f} ms)")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
