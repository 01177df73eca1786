"""Instant vocabulary iteration: a re-run after adding a class reuses the image's features.

Run from the repository root:

    python benchmarks/bench_cache.py                       # CPU, every method
    python benchmarks/bench_cache.py --device cuda

Per method: a cold first segmentation of a 512 x 512 image with 5 classes (no text or feature
cache), then the same image with a sixth class (its name is new to the text cache too), and a
fresh run with the six classes to check that the labels are equal.  The goal is a re-run of at
most 0.25x the first run's time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src_tests"))

from bench_engine import NAMES, _checkpoint, _cpu_name  # noqa: E402


def _timed(fn, device: str):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    value = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, value


def measure(checkpoint: Path, method: str, device: str, rgb, repeats: int) -> dict:
    import numpy as np

    from napari_sclip import Segmenter
    from napari_sclip.engine import text as text_module
    from napari_sclip.engine.feature_cache import FEATURE_CACHE

    five, six = NAMES[:5], NAMES[:6]
    rows = []
    for _ in range(repeats):
        # Cold: no feature cache, no text cache (memory or disk: a new cache folder per attempt).
        FEATURE_CACHE.clear()
        text_module._MEMORY.clear()
        os.environ["NAPARI_SCLIP_CACHE_DIR"] = tempfile.mkdtemp()
        segmenter = Segmenter("ViT-B-16-quickgelu", str(checkpoint), device, method=method)
        segmenter.load()
        first_s, _ = _timed(lambda seg=segmenter: seg.segment(rgb, five), device)
        rerun_s, rerun = _timed(lambda seg=segmenter: seg.segment(rgb, six), device)
        rows.append((first_s, rerun_s, rerun))
    first_s = min(r[0] for r in rows)
    rerun_s = min(r[1] for r in rows)
    rerun = rows[-1][2]
    fresh = Segmenter("ViT-B-16-quickgelu", str(checkpoint), device, method=method, feature_cache=False).segment(rgb, six)
    return {"method": method, "first_s": first_s, "rerun_s": rerun_s, "ratio": rerun_s / first_s,
            "features_reused": rerun.params["features_reused"],
            "labels_equal_fresh": bool(np.array_equal(rerun.labels, fresh.labels)),
            "cache_mb": FEATURE_CACHE.nbytes / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="cold/re-run pairs per method (best kept)")
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    from napari_sclip.engine.methods import METHODS

    from conftest import natural_image

    rgb = natural_image(512, 512)
    figures = {"machine": {"cpu": _cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                           "device": args.device}, "image": [512, 512], "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = _checkpoint(Path(tmp))
        for method in args.methods or list(METHODS):
            row = measure(checkpoint, method, args.device, rgb, args.repeats)
            figures["rows"].append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
