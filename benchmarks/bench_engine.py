"""Time and memory of the engine, side by side with a plain per-window fp32 SCLIP.

Run from the repository root:

    python benchmarks/bench_engine.py                 # all measurements, ViT-B-16 architecture
    python benchmarks/bench_engine.py --names 10 --repeats 5

No weights are downloaded: speed and memory depend on the architecture, not on the values, so the
model is a randomly initialised ViT-B-16 (QuickGELU, as OpenAI's) saved to a temporary checkpoint
and loaded through the engine's own loading code.  The baseline is ``src_tests/reference_sclip.py``:
full 77-token text encoding, one window at a time, explicit attention matrices, full-size canvases.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src_tests"))

NAMES = ["person", "sky", "tree", "road", "car", "building", "grass", "dog", "cat", "water",
         "mountain", "boat", "bicycle", "chair", "table", "flower", "bird", "horse", "cloud", "wall"]


def _timed_pair(first, second, repeats: int) -> tuple[float, float, object, object]:
    """Best-of-``repeats`` times of two functions, run alternately so that both see the same
    background load (the minimum is the least disturbed run, as ``timeit`` advises)."""
    times: tuple[list[float], list[float]] = ([], [])
    values: list[object] = [None, None]
    for _ in range(repeats):
        for i, fn in enumerate((first, second)):
            start = time.perf_counter()
            values[i] = fn()
            times[i].append(time.perf_counter() - start)
    return min(times[0]), min(times[1]), values[0], values[1]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _checkpoint(folder: Path) -> Path:
    import torch

    from napari_sclip.engine._torch import open_clip

    torch.manual_seed(0)
    model = open_clip.model.CLIP(**open_clip.get_model_config("ViT-B-16-quickgelu"))
    path = folder / "vit-b-16-random.pt"
    torch.save(model.state_dict(), path)
    return path


def bench_text(segmenter, names: list[str], repeats: int) -> dict:
    import torch

    from napari_sclip.engine import text as text_module
    from napari_sclip.engine.progress import drive
    from napari_sclip.engine.text import TextEncoder, prompt_templates

    from reference_sclip import text_features_reference

    model = segmenter.load()

    def ours():
        text_module._MEMORY.clear()  # cold: no memory cache ...
        encoder = TextEncoder(model)
        encoder._disk_ok = False  # ... and no disk cache
        encoder._read_disk = lambda name: None
        return drive(encoder.iter_features(names))

    def naive():
        with torch.no_grad():
            return text_features_reference(model.clip, model.tokenizer, names, list(prompt_templates()))

    t_ours, t_naive, a, b = _timed_pair(ours, naive, repeats)
    diff = float((a - b).abs().max())
    return {"names": len(names), "prompts": 80 * len(names), "ours_s": t_ours, "naive_s": t_naive,
            "speedup": t_naive / t_ours, "max_abs_diff": diff}


def bench_image(segmenter, classes: list[str], repeats: int, shape=(448, 640)) -> dict:
    import numpy as np
    import torch

    from napari_sclip.engine.vocabulary import parse_vocabulary

    from conftest import natural_image
    from reference_sclip import sclip_reference

    rgb = natural_image(*shape)
    vocabulary = parse_vocabulary(classes)
    text = torch.from_numpy(segmenter.text_features(vocabulary.names))  # warm: text is cached
    segmenter.segment(rgb, classes)  # warm-up
    clip = segmenter.load().clip
    t_ours, t_naive, result, (labels, _, probs) = _timed_pair(
        lambda: segmenter.segment(rgb, classes, return_probs=True),
        lambda: sclip_reference(clip, text, list(vocabulary.name_class_index), rgb),
        repeats,
    )
    return {"shape": list(shape), "classes": len(classes), "windows": result.params["windows"],
            "ours_s": t_ours, "naive_s": t_naive, "ratio": t_ours / t_naive,
            "max_abs_prob_diff": float(np.abs(result.probs - probs).max()),
            "label_agreement": float((result.labels == labels).mean())}


def bench_stages(segmenter, classes: list[str], shape=(448, 640)) -> dict:
    """Where one warm segmentation spends its time."""
    from conftest import natural_image

    rgb = natural_image(*shape)
    segmenter.segment(rgb, classes)
    marks: dict[str, float] = {}
    start = time.perf_counter()

    def mark(step):
        marks[step.stage] = time.perf_counter() - start

    segmenter.segment(rgb, classes, progress=mark)
    order = [s for s in ("text", "windows", "resize") if s in marks]
    spans, previous = {}, 0.0
    for stage in order:
        spans[stage] = marks[stage] - previous
        previous = marks[stage]
    return spans


def bench_large_memory(checkpoint: Path, shape=(6000, 8000), num_classes=20) -> dict:
    """Peak RSS of a fresh process that segments a large image (reported by the kernel)."""
    code = textwrap.dedent(
        f"""
        import resource, time, numpy as np
        from napari_sclip import Segmenter
        rng = np.random.default_rng(0)
        image = rng.integers(0, 255, {shape + (3,)!r}, dtype=np.uint8)
        seg = Segmenter("ViT-B-16-quickgelu", {str(checkpoint)!r}, "cpu")
        seg.load()
        start = time.perf_counter()
        res = seg.segment(image, {NAMES[:num_classes]!r})
        elapsed = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(peak_mb, elapsed, res.labels.shape)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak_mb, elapsed, _ = done.stdout.split(maxsplit=2)
    return {"shape": list(shape), "classes": num_classes, "peak_rss_mb": float(peak_mb), "seconds": float(elapsed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", type=int, default=5, help="class names for the text benchmark")
    parser.add_argument("--classes", type=int, default=5, help="classes for the image benchmark")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each timing (best is kept)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-large", action="store_true", help="skip the 6000 x 8000 memory run")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()

    import torch

    from napari_sclip import Segmenter

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["NAPARI_SCLIP_CACHE_DIR"] = tmp
        checkpoint = _checkpoint(Path(tmp))
        segmenter = Segmenter("ViT-B-16-quickgelu", str(checkpoint), args.device)
        segmenter.load()
        figures = {
            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpu": _cpu_name(), "threads": torch.get_num_threads(),
                        "device": str(segmenter.device)},
            "text": bench_text(segmenter, NAMES[: args.names], args.repeats),
            "image": bench_image(segmenter, NAMES[: args.classes], args.repeats),
            "stages": bench_stages(segmenter, NAMES[: args.classes]),
        }
        if not args.skip_large:
            figures["large"] = bench_large_memory(checkpoint)

    t, i = figures["text"], figures["image"]
    rows = [
        ("text, cold", f"{t['names']} names x 80 prompts", f"{t['ours_s']:.2f} s", f"{t['naive_s']:.2f} s",
         f"{t['speedup']:.1f}x faster (max diff {t['max_abs_diff']:.1e})"),
        ("image, warm", f"{i['shape'][0]}x{i['shape'][1]}, {i['classes']} classes, {i['windows']} windows",
         f"{i['ours_s']:.2f} s", f"{i['naive_s']:.2f} s",
         f"{i['ratio']:.2f}x the time (max prob diff {i['max_abs_prob_diff']:.1e})"),
    ]
    print(f"{'measurement':<12} | {'input':<36} | {'engine':>8} | {'naive':>8} | comparison")
    print("-" * 110)
    for row in rows:
        print(f"{row[0]:<12} | {row[1]:<36} | {row[2]:>8} | {row[3]:>8} | {row[4]}")
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in figures["stages"].items())
    print(f"\nwarm segmentation stages: {stages}")
    if "large" in figures:
        large = figures["large"]
        print(f"large image {large['shape'][0]}x{large['shape'][1]}, {large['classes']} classes: "
              f"peak RSS {large['peak_rss_mb']:.0f} MB, {large['seconds']:.1f} s")
    print(f"\nmachine: {json.dumps(figures['machine'])}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
