"""Evaluating a sweep (issue 13): what one more setting costs, against one more pass of the model.

Run from the repository root:

    python benchmarks/bench_evaluate.py --images 8 --json evaluate.json

A folder of ``--images`` VOC-sized JPEG photos (500 x 375) with random 21-class masks is scored
with VOC21's class names (56 names) by a randomly initialised ViT-B/16 (OpenAI's architecture;
no weights can be downloaded here), on the CPU unless ``--device`` says otherwise:

* ``one setting``: SCLIP, one logit scale and threshold;
* ``sweep``: SCLIP with 3 logit scales x 3 probability thresholds x 3 area thresholds (27);
* ``separate runs``: the same 27 settings, estimated as 27 times ``one setting`` (what scoring
  each setting with its own run would cost).

Each figure is seconds per image over the whole run; the model is loaded and the class names
encoded before the clock starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src_tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from bench_batch import machine, photo_jpegs, vit_b16_checkpoint
    from PIL import Image

    from napari_sclip.engine.segmenter import Segmenter
    from napari_sclip.engine.vocabulary import parse_vocabulary
    from napari_sclip.evaluate.benchmarks import get_benchmark
    from napari_sclip.evaluate.run import evaluate, folder_truth, sweep

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        photos = photo_jpegs(folder / "images", args.images, size=500)
        (folder / "masks").mkdir()
        rng = np.random.default_rng(0)
        for path in photos:  # VOC's 500 x 375: a crop of each square photo
            Image.open(path).crop((0, 0, 500, 375)).save(path, quality=90)
            Image.fromarray(rng.integers(0, 21, (375, 500)).astype(np.uint8)).save(folder / "masks" / f"{path.stem}.png")
        model, checkpoint = vit_b16_checkpoint(folder)
        segmenter = Segmenter(model, checkpoint, args.device, quick_gelu=True, feature_cache=False)
        segmenter.load()
        vocabulary = parse_vocabulary(get_benchmark("voc21").class_names(), unique=False)
        segmenter.text_features(vocabulary.names)  # the text encoder's one-off cost, outside the clock
        truth = folder_truth(folder / "images", folder / "masks", vocabulary, background_class=0)
        rows = []
        for name, settings in (
            ("one setting", sweep(truth, ["sclip"], [65.0], [0.1], [None])),
            ("sweep (27 settings)", sweep(truth, ["sclip"], [40.0, 50.0, 65.0], [0.0, 0.1, 0.2], [None, 0.1, 0.2])),
        ):
            start = time.perf_counter()
            evaluate(truth, segmenter, settings)
            seconds = (time.perf_counter() - start) / args.images
            rows.append({"run": name, "settings": len(settings), "s_per_image": seconds})
            print(f"{name:<22} {seconds:6.2f} s/image", flush=True)
        one = rows[0]["s_per_image"]
        rows.append({"run": "separate runs (27 x one)", "settings": 27, "s_per_image": 27 * one})
        print(f"{'separate runs (27 x one)':<22} {27 * one:6.2f} s/image; the sweep costs "
              f"{rows[1]['s_per_image'] / one:.1f} x one setting", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "images": args.images, "device": args.device,
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
