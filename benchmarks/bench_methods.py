"""Every method on the same image: time (and where it goes) and peak memory.

Run from the repository root:

    python benchmarks/bench_methods.py                  # CPU
    python benchmarks/bench_methods.py --device cuda    # GPU (peak memory from torch.cuda)

Like ``bench_engine.py`` the model is a randomly initialised ViT-B-16 loaded through the engine's
own code: time and memory depend on the architecture, not on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src_tests"))

from bench_engine import NAMES, _checkpoint, _cpu_name  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_method(segmenter, method: str, rgb, classes, repeats: int, device: str) -> dict:
    """Best-of-``repeats`` warm time, and the split between windows and the final stage."""
    segmenter.segment(rgb, classes, method=method)  # warm-up, text cached
    best, stages = float("inf"), {}
    for _ in range(repeats):
        marks: dict[str, float] = {}
        _sync(device)
        start = time.perf_counter()
        result = segmenter.segment(rgb, classes, method=method,
                                   progress=lambda step, marks=marks: marks.__setitem__(step.stage, time.perf_counter()))
        _sync(device)
        elapsed = time.perf_counter() - start
        if elapsed < best:
            best = elapsed
            windows_end = marks.get("windows", start)
            stages = {"windows_s": windows_end - start, "labelling_s": start + elapsed - windows_end}
    return {"method": method, "seconds": best, **stages, "windows": result.params["windows"],
            "window": result.params["window"], "pamr": result.params["pamr"]}


def peak_memory(checkpoint: Path, method: str, device: str, shape: tuple[int, int], classes: list[str]) -> dict:
    """Peak memory of a fresh process that segments one ``shape`` image with ``method``."""
    code = textwrap.dedent(
        f"""
        import time, numpy as np, torch
        from napari_sclip import Segmenter
        image = np.random.default_rng(0).integers(0, 255, {shape + (3,)!r}, dtype=np.uint8)
        seg = Segmenter("ViT-B-16-quickgelu", {str(checkpoint)!r}, {device!r}, method={method!r})
        seg.load()
        start = time.perf_counter()
        seg.segment(image, {classes!r})
        elapsed = time.perf_counter() - start
        gpu = torch.cuda.max_memory_allocated() / 2**20 if {device!r}.startswith("cuda") else 0
        print(int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) / 1024, gpu, elapsed)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rss, gpu, elapsed = (float(v) for v in done.stdout.split()[-3:])
    return {"shape": list(shape), "peak_rss_mb": rss, "peak_gpu_mb": gpu, "seconds": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--memory-shape", type=int, nargs=2, default=(3000, 4000), metavar=("H", "W"))
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--compare-cpu", action="store_true",
                        help="also give each method's label agreement with an fp32 CPU run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    from napari_sclip import Segmenter
    from napari_sclip.engine.methods import METHODS

    from conftest import natural_image

    classes = NAMES[: args.classes]
    rgb = natural_image(448, 640)
    figures: dict = {"machine": {"cpu": _cpu_name(), "threads": torch.get_num_threads(),
                                 "torch": torch.__version__, "device": args.device},
                     "image": [448, 640], "classes": len(classes), "methods": []}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["NAPARI_SCLIP_CACHE_DIR"] = tmp
        checkpoint = _checkpoint(Path(tmp))
        segmenter = Segmenter("ViT-B-16-quickgelu", str(checkpoint), args.device)
        cpu = Segmenter("ViT-B-16-quickgelu", str(checkpoint), "cpu", feature_cache=False) if args.compare_cpu else None
        for name in METHODS:
            row = time_method(segmenter, name, rgb, classes, args.repeats, args.device)
            if cpu is not None:
                ours = segmenter.segment(rgb, classes, method=name, return_probs=True)
                reference = cpu.segment(rgb, classes, method=name, return_probs=True)
                row["label_agreement_with_cpu"] = float((ours.labels == reference.labels).mean())
                row["max_prob_diff_with_cpu"] = float(abs(ours.probs - reference.probs).max())
            if not args.skip_memory:
                row["memory"] = peak_memory(checkpoint, name, args.device, tuple(args.memory_shape), classes)
            figures["methods"].append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
