"""The CUDA path, checked and timed: fp16 against the CPU's fp32, batching, a real out-of-memory
fallback, and peak GPU memory.

Run from the repository root on a machine with a CUDA GPU:

    python benchmarks/bench_cuda.py --json cuda.json

Like ``bench_engine.py`` it uses a randomly initialised ViT-B-16 loaded through the engine's own
code (speed and memory depend on the architecture, not on the weights).  GPU timings synchronise
the device and keep the best of ``--repeats`` runs.
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
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src_tests"))

from bench_engine import NAMES, _checkpoint  # noqa: E402


def _best(fn, repeats: int) -> tuple[float, object]:
    import torch

    times, value = [], None
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        value = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times), value


def fp16_vs_cpu(gpu, cpu, classes: list[str]) -> dict:
    """The same image and weights: CUDA (fp16 autocast) against the CPU (fp32)."""
    import numpy as np

    from conftest import natural_image

    rgb = natural_image(448, 640)
    a = gpu.segment(rgb, classes, return_probs=True)
    b = cpu.segment(rgb, classes, return_probs=True)
    return {"precision": a.params["precision"], "label_agreement": float((a.labels == b.labels).mean()),
            "max_abs_prob_diff": float(np.abs(a.probs - b.probs).max()),
            "mean_abs_prob_diff": float(np.abs(a.probs - b.probs).mean())}


def batching(gpu_factory, classes: list[str], repeats: int) -> list[dict]:
    """Warm time of one image with many windows, per batch size."""
    import torch

    from conftest import natural_image

    rgb = natural_image(1344, 2016)
    rows = []
    for batch_size in (1, 4, 16, 32, 64):
        seg = gpu_factory(batch_size)
        seg.segment(rgb, classes, short_side=672)  # warm-up (and text cache)
        torch.cuda.reset_peak_memory_stats()
        seconds, result = _best(lambda seg=seg: seg.segment(rgb, classes, short_side=672), repeats)
        rows.append({"batch_size": batch_size, "windows": result.params["windows"], "seconds": seconds,
                     "windows_per_s": result.params["windows"] / seconds,
                     "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20})
    return rows


def text_cold(gpu, names: list[str], repeats: int) -> dict:
    from napari_sclip.engine import text as text_module
    from napari_sclip.engine.progress import drive
    from napari_sclip.engine.text import TextEncoder

    model = gpu.load()

    def encode():
        text_module._MEMORY.clear()
        encoder = TextEncoder(model)
        encoder._disk_ok = False
        encoder._read_disk = lambda name: None
        return drive(encoder.iter_features(names))

    seconds, _ = _best(encode, repeats)
    return {"names": len(names), "prompts": 80 * len(names), "seconds": seconds}


def large(gpu, classes: list[str]) -> dict:
    import numpy as np
    import torch

    image = np.random.default_rng(0).integers(0, 255, (6000, 8000, 3), dtype=np.uint8)
    gpu.segment(image[:600, :800], classes)  # warm
    torch.cuda.reset_peak_memory_stats()
    seconds, result = _best(lambda: gpu.segment(image, classes), 2)
    stages: dict[str, float] = {}
    start = time.perf_counter()
    gpu.segment(image, classes, progress=lambda step: stages.__setitem__(step.stage, time.perf_counter() - start))
    return {"shape": [6000, 8000], "classes": len(classes), "seconds": seconds,
            "windows_done_s": stages.get("windows"), "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20,
            "labels_shape": list(result.labels.shape)}


def out_of_memory(gpu_factory, classes: list[str]) -> dict:
    """Cap the process's GPU memory so that a big batch cannot fit, and check that the engine
    halves the batch and still gives the unconstrained result."""
    import numpy as np
    import torch

    from napari_sclip.engine import segmenter as segmenter_module

    from conftest import natural_image

    rgb = natural_image(2048, 2048)
    reference = gpu_factory(16).segment(rgb, classes, short_side=2048)
    total = torch.cuda.get_device_properties(0).total_memory
    attempts = []
    original = segmenter_module.Segmenter._window_features

    def recording(self, method, crops):
        attempts.append(len(crops))
        return original(self, method, crops)

    segmenter_module.Segmenter._window_features = recording
    try:
        for cap_gb in (1.0, 1.5, 2.0, 3.0, 4.0):
            attempts.clear()
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(cap_gb * 2**30 / total)
            try:
                result = gpu_factory(512).segment(rgb, classes, short_side=2048)
            except Exception as exc:  # report whatever the cap caused
                outcome = {"cap_gb": cap_gb, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                continue
            outcome = {"cap_gb": cap_gb, "batch_sizes_tried": sorted(set(attempts), reverse=True),
                       "windows": result.params["windows"],
                       "labels_equal_unconstrained": bool(np.array_equal(result.labels, reference.labels))}
            if len(set(attempts)) > 1:
                break
    finally:
        segmenter_module.Segmenter._window_features = original
        torch.cuda.set_per_process_memory_fraction(1.0)
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    from napari_sclip import Segmenter

    if not torch.cuda.is_available():
        sys.exit("bench_cuda.py needs a CUDA GPU")
    classes = NAMES[: args.classes]
    figures: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["NAPARI_SCLIP_CACHE_DIR"] = tmp
        checkpoint = str(_checkpoint(Path(tmp)))

        def gpu_factory(batch_size=None):
            return Segmenter("ViT-B-16-quickgelu", checkpoint, "cuda", batch_size=batch_size)

        gpu = gpu_factory()
        start = time.perf_counter()
        gpu.load()
        figures["load_s"] = time.perf_counter() - start
        for name, run in (
            ("fp16_vs_cpu", lambda: fp16_vs_cpu(gpu, Segmenter("ViT-B-16-quickgelu", checkpoint, "cpu"), classes)),
            ("text_cold", lambda: text_cold(gpu, classes, args.repeats)),
            ("batching", lambda: batching(gpu_factory, classes, args.repeats)),
            ("large", lambda: large(gpu, NAMES[:20])),
            ("out_of_memory", lambda: out_of_memory(gpu_factory, classes)),
        ):
            try:
                figures[name] = run()
            except Exception as exc:  # keep the other figures
                figures[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(name, json.dumps(figures[name]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
