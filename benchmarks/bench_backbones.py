"""Backbones (issue 14): time per image and peak memory for ViT-B/32, B/16, L/14 and L/14-336.

Run from the repository root:

    python benchmarks/bench_backbones.py --json backbones.json
    python benchmarks/bench_backbones.py --device cuda --json backbones-cuda.json   # fp16 on a GPU

Each model is randomly initialised in OpenAI's architecture (no weights can be downloaded here;
the time does not depend on the values) and saved in OpenAI's layout, then measured in its own
process: load, one warm-up image, then ``--images`` 448 x 640 photos segmented with 8 class
names by SCLIP at its defaults (short side 336, 224 px windows moved by 112: 8 windows).

Columns: seconds per image (median), the process's peak memory over its memory after imports
(peak RSS, loading included, on the CPU; ``torch.cuda.max_memory_allocated`` on a GPU), and the
engine's estimate
(:func:`napari_sclip.engine.memory.estimate_memory`) for comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src_tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

MODELS = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336")
CLASSES = ["person", "sky", "tree", "building", "grass", "road", "car", "water"]


def _status(field: str) -> int:
    """A /proc/self/status memory figure in bytes (VmHWM: the peak RSS of this program since it
    started; getrusage's peak would carry the forking parent's over ``exec``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def save_random(model: str, folder: Path) -> Path:
    """A randomly initialised ``model`` in OpenAI's layout (fp16, with its integer entries)."""
    import torch

    from napari_sclip.engine._torch import open_clip

    cfg = open_clip.get_model_config(model)
    torch.manual_seed(0)
    state = {k: v.half() for k, v in open_clip.model.CLIP(**cfg, quick_gelu=True).state_dict().items()}
    state.update(input_resolution=torch.tensor(cfg["vision_cfg"]["image_size"]), context_length=torch.tensor(77),
                 vocab_size=torch.tensor(49408))
    path = folder / f"{model}.pt"
    torch.save(state, path)
    return path


def measure(model: str, device: str, images: int, folder: Path) -> dict:
    """One model, in this process (the parent runs each in a fresh one)."""
    import numpy as np
    import torch
    from PIL import Image

    from napari_sclip.engine._torch import open_clip
    from napari_sclip.engine.memory import Architecture, estimate_memory
    from napari_sclip.engine.segmenter import Segmenter

    cfg = open_clip.get_model_config(model)
    path = folder / f"{model}.pt"
    photos = [np.asarray(Image.open(p).convert("RGB"))[:448] for p in sorted((folder / "photos").glob("*.jpg"))]

    baseline = _status("VmRSS")
    segmenter = Segmenter(model, str(path), device, feature_cache=False)
    segmenter.load()
    segmenter.text_features(CLASSES)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    segmenter.segment(photos[0], CLASSES)  # warm-up
    seconds = []
    for photo in photos[1:]:
        start = time.perf_counter()
        result = segmenter.segment(photo, CLASSES)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else _status("VmHWM") - baseline
    cuda = device.startswith("cuda")
    estimate = estimate_memory(Architecture.from_config(cfg), (448, 640), len(CLASSES),
                               batch_size=segmenter.batch_size, half_precision=cuda)
    return {"model": model, "device": device, "precision": result.params["precision"],
            "windows": result.params["windows"], "seconds_per_image": statistics.median(seconds),
            "peak_bytes": peak, "estimate_bytes": estimate.total, "images": images}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child's model
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.device, args.images, args.folder)))
        return

    from bench_batch import machine, photo_jpegs

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        photo_jpegs(Path(tmp) / "photos", args.images + 1, 640)  # 640 x 640, cut to 448 x 640
        for model in args.models:
            save_random(model, Path(tmp))
            out = subprocess.run([sys.executable, __file__, "--one", model, "--device", args.device,
                                  "--images", str(args.images), "--folder", tmp],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            row = rows[-1]
            print(f"{model:<13} {row['precision']}  {row['windows']} windows  {row['seconds_per_image']:6.2f} s/image  "
                  f"peak {row['peak_bytes'] / 1e9:5.2f} GB  estimate {row['estimate_bytes'] / 1e9:5.2f} GB", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
