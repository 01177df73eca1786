"""Batch labelling at scale (issue 11): the dataset side, the pipeline and the model, measured apart.

Run from the repository root; each subcommand prints a small table, ``--json OUT`` also writes
the figures (with the machine and the load averages) to a file:

    # 1. per-image overhead against dataset size (tiny model, tiny windows: the dataset side dominates)
    python benchmarks/bench_batch.py overhead --sizes 1000 20000 --writer-sizes 500 2000 5000 20000
    # 2. images/s from JPEG files (label_images, what the CLI runs) against the model alone
    python benchmarks/bench_batch.py end-to-end --device cpu --images 8
    python benchmarks/bench_batch.py end-to-end --device cuda --images 512
    # 3. windows/s of the vision tower (SCLIP) by batch size; on CUDA also fp16 vs fp32 labels
    python benchmarks/bench_batch.py windows --device cpu --batch-sizes 4 8
    python benchmarks/bench_batch.py windows --device cuda --batch-sizes 32 128 256
    # 4. a local Dask cluster of 1, 2 and 4 workers against the single-process pipeline, with
    #    Dask's MALLOC_TRIM_THRESHOLD_=65536 for its workers and without it (--malloc-trim)
    python benchmarks/bench_batch.py dask --workers 1 2 4 --images 200
    python benchmarks/bench_batch.py dask --device cuda --workers 1 2 4 --images 2000

Figures, machines and notes: docs/benchmarks.md, "Batch labelling at scale (issue 11)".

No weights are downloaded.  ``overhead`` and ``dask`` use the tests' tiny model (``sclip-test-tiny``,
``src_tests/conftest.py``); ``end-to-end`` and ``windows`` a randomly initialised ViT-B-16
(QuickGELU), as ``bench_engine.py`` does.  Either is saved to a temporary checkpoint and loaded
through the engine's own loading code: speed depends on the architecture, not on the values.

Precision is the engine's (``--precision auto``): fp16 autocast on CUDA, fp32 elsewhere;
``--precision fp32`` turns the autocast off on CUDA (for comparison only).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src_tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_engine import _cpu_name  # noqa: E402
from gpu_variants import VARIANTS  # noqa: E402

CLASSES = ["person", "sky", "tree", "road", "car", "building", "grass", "dog"]
VIT_B16 = "ViT-B-16-quickgelu"


# -- the machine and its load ------------------------------------------------------------------------


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _rss_mb() -> float:
    """The process's resident memory now (not the peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def machine() -> dict:
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{k} {torch.cuda.get_device_name(k)}" for k in range(torch.cuda.device_count())]
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "python": platform.python_version(),
            "torch": torch.__version__, "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "devices": devices, "load_at_start": loadavg()}


class Timer:
    """Wall time of a block, and the load averages before and after it."""

    def __enter__(self):
        self.load_before = loadavg()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self.load_after = loadavg()

    @property
    def load(self) -> str:
        return f"{self.load_before} -> {self.load_after}"


def table(headers: list[str], rows: list[list]) -> None:
    """A Markdown table (paste-able into docs/benchmarks.md)."""
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    print()


def in_thread(function):
    """``function()`` in a fresh thread, as the pipeline runs the model (its device thread).

    Timing torch in the main thread instead is unfair on a busy CPU: libgomp's workers spin at
    every barrier while the team is not larger than the CPUs, and when another process holds a
    core that spinning doubled the CPU time of the ViT here (2 cores, load 3; gone with
    OMP_WAIT_POLICY=PASSIVE).  A second team (a thread's own) puts libgomp in its throttled mode."""
    import threading

    found: list = []

    def run():
        try:
            found.append((True, function()))
        except BaseException as exc:  # re-raised in the caller
            found.append((False, exc))

    thread = threading.Thread(target=run, name="bench model")
    thread.start()
    thread.join()
    ok, value = found[0]
    if not ok:
        raise value
    return value


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# -- models ------------------------------------------------------------------------------------------


def tiny_checkpoint(folder: Path) -> tuple[str, str]:
    """The tests' tiny CLIP, registered with open_clip and saved: ``(model name, checkpoint)``."""
    import torch

    from conftest import TINY_MODEL, make_tiny_clip, register_tiny_model

    register_tiny_model(folder)
    path = folder / "tiny.pt"
    torch.save(make_tiny_clip().state_dict(), path)
    return TINY_MODEL, str(path)


def vit_b16_checkpoint(folder: Path) -> tuple[str, str]:
    """A randomly initialised ViT-B-16 (QuickGELU, OpenAI's architecture), saved."""
    import torch

    from napari_sclip.engine._torch import open_clip

    torch.manual_seed(0)
    model = open_clip.model.CLIP(**open_clip.get_model_config(VIT_B16))
    path = folder / "vit-b-16-random.pt"
    torch.save(model.state_dict(), path)
    return VIT_B16, str(path)


@contextlib.contextmanager
def precision(mode: str, device: str):
    """``auto``: what the engine does (fp16 autocast on CUDA, fp32 elsewhere); ``fp32``: the
    autocast turned off, wherever the engine takes it (the segmenter's module)."""
    import torch

    from napari_sclip.engine import segmenter as segmenter_module

    if mode == "auto":
        yield "fp16" if torch.device(device).type == "cuda" else "fp32"
        return
    if mode != "fp32":
        raise SystemExit(f"--precision {mode}: only auto (the engine's) and fp32 are supported")
    original = segmenter_module.autocast
    segmenter_module.autocast = lambda device: torch.autocast("cuda", enabled=False)
    try:
        yield "fp32"
    finally:
        segmenter_module.autocast = original


# -- images ------------------------------------------------------------------------------------------


def small_pngs(folder: Path, count: int, size: int | tuple[int, int]) -> list[Path]:
    """``count`` different PNGs of ``size`` (a side, or height and width): crops of the astronaut
    at varying places, the first pixel holding the index (so no two files are equal)."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    base = data.astronaut()
    height, width = (size, size) if isinstance(size, int) else size
    rows, cols = base.shape[0] - height, base.shape[1] - width
    paths = []
    for k in range(count):
        y, x = (37 * k) % rows, (101 * k + k // rows) % cols
        crop = base[y : y + height, x : x + width].copy()
        crop[0, 0] = (k >> 16 & 255, k >> 8 & 255, k & 255)
        path = folder / f"im{k:06d}.png"
        Image.fromarray(crop).save(path)
        paths.append(path)
    return paths


def photo_jpegs(folder: Path, count: int, size: int = 512, seed: int = 0) -> list[Path]:
    """``count`` ``size`` x ``size`` JPEG photos: random crops of scikit-image's astronaut,
    coffee and chelsea at random scales, some flipped, with random brightness and gamma."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bases = [Image.fromarray(data.astronaut()), Image.fromarray(data.coffee()), Image.fromarray(data.chelsea())]
    paths = []
    for k in range(count):
        base = bases[k % len(bases)]
        scale = size / min(base.size) * rng.uniform(1.0, 1.6)
        width, height = round(base.width * scale), round(base.height * scale)
        resized = np.asarray(base.resize((width, height), Image.BILINEAR), np.float32)
        y, x = rng.integers(0, height - size + 1), rng.integers(0, width - size + 1)
        crop = resized[y : y + size, x : x + size]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = 255 * (crop / 255) ** rng.uniform(0.7, 1.4) * rng.uniform(0.8, 1.2)
        path = folder / f"photo{k:04d}.jpg"
        Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def decoded(paths: list[Path]) -> list[np.ndarray]:
    from napari_sclip.io.images import read_with_layout

    return [np.asarray(read_with_layout(path)[0]) for path in paths]


# -- running the pipeline ----------------------------------------------------------------------------


def run_pipeline(paths, out: Path, segmenter, options: dict, client=None) -> dict:
    """``label_images`` into a new dataset, as ``napari-sclip segment`` runs it; the time of each
    finished file (seconds since the start), the total including the writer's consolidation."""
    from napari_sclip.dataset.batch import label_images
    from napari_sclip.engine.vocabulary import parse_vocabulary

    vocabulary = parse_vocabulary(CLASSES)
    marks, statuses = [], {}
    cpu = time.process_time()  # every thread of this process (not a Dask cluster's workers)
    with Timer() as timer:
        for item in label_images(paths, vocabulary, out, segmenter, options=options, client=client):
            marks.append(time.perf_counter() - timer.start)
            statuses[item.status] = statuses.get(item.status, 0) + 1
    cpu = time.process_time() - cpu
    if statuses.get("written", 0) != len(paths):
        raise SystemExit(f"expected {len(paths)} images written, got {statuses}")
    return {"images": len(paths), "seconds": timer.seconds, "cpu_s": cpu, "last_item_s": marks[-1],
            "consolidate_s": timer.seconds - marks[-1], "marks": marks, "load": timer.load}


def _window_ms(marks: list[float], first: bool, span: int = 1000) -> float:
    """ms per image over the first (or last) ``span`` finished images."""
    span = min(span, len(marks))
    if first:
        return 1000 * marks[span - 1] / span
    before = marks[-span - 1] if len(marks) > span else 0.0
    return 1000 * (marks[-1] - before) / span


# -- 1. overhead -------------------------------------------------------------------------------------


def bench_overhead(args, tmp: Path) -> dict:
    from napari_sclip.engine.segmenter import Segmenter

    figures: dict = {"pipeline": [], "writer": []}
    if args.sizes:
        model, checkpoint = tiny_checkpoint(tmp)
        segmenter = Segmenter(model, checkpoint, "cpu", feature_cache=False)
        segmenter.load()
        options = {"short_side": args.image_size, "window": args.image_size, "stride": args.image_size}
        started = time.perf_counter()
        paths = small_pngs(tmp / "images", max(args.sizes), args.image_size)
        print(f"made {len(paths)} PNGs of {args.image_size} px in {time.perf_counter() - started:.1f} s")
        # Text embeddings and first-call costs out of the timings: a warm-up dataset of a few images.
        run_pipeline(paths[:8], tmp / "warm-up", segmenter, options)
        for n in args.sizes:
            result = run_pipeline(paths[:n], tmp / f"dataset-{n}", segmenter, options)
            marks = result.pop("marks")
            result.update(ms_per_image=1000 * result["seconds"] / n, first_1000_ms=_window_ms(marks, True),
                          last_1000_ms=_window_ms(marks, False), rss_mb_after=_rss_mb())
            figures["pipeline"].append(result)
            print(f"  {n} images: {result['seconds']:.1f} s (load {result['load']})", flush=True)
        base = figures["pipeline"][0]
        table(["images", "total (s)", "ms/image", "first 1000 (ms/image)", "last 1000 (ms/image)",
               "consolidation at close (s)", f"ratio to {base['images']}", "load before -> after"],
              [[r["images"], f"{r['seconds']:.1f}", f"{r['ms_per_image']:.2f}", f"{r['first_1000_ms']:.2f}",
                f"{r['last_1000_ms']:.2f}", f"{r['consolidate_s']:.2f}",
                f"{r['ms_per_image'] / base['ms_per_image']:.2f}", r["load"]] for r in figures["pipeline"]])
    for n in args.writer_sizes or []:
        figures["writer"].append(writer_only(tmp / f"writer-{n}", n))
        print(f"  writer, {n} samples: {figures['writer'][-1]['seconds']:.1f} s", flush=True)
    if figures["writer"]:
        table(["samples", "total (s)", "ms/sample", "first 1000 (ms/sample)", "last 1000 (ms/sample)",
               "slowest write (ms)", "writes > 50 ms", "close (s)", "load before -> after"],
              [[r["samples"], f"{r['seconds']:.1f}", f"{r['ms_per_sample']:.2f}", f"{r['first_1000_ms']:.2f}",
                f"{r['last_1000_ms']:.2f}", f"{r['slowest_ms']:.1f}", r["over_50ms"], f"{r['close_s']:.2f}", r["load"]]
               for r in figures["writer"]])
    return figures


def writer_only(root: Path, count: int, size: int = 64) -> dict:
    """``DatasetWriter.write`` of ``count`` different ``size`` px samples (image, labels,
    confidence) into a new dataset; each write timed, and the close (the consolidation)."""
    from skimage import data

    from napari_sclip.dataset.writer import DatasetWriter, Sample

    rng = np.random.default_rng(0)
    base = data.astronaut()
    times = []
    with Timer() as timer:
        writer = DatasetWriter(root, vocabulary=[(name,) for name in CLASSES])
        uids = np.array([0, *writer.registry.active])
        for k in range(count):
            y, x = (37 * k) % (512 - size), (101 * k) % (512 - size)
            image = base[y : y + size, x : x + size].copy()
            image[0, 0] = (k >> 16 & 255, k >> 8 & 255, k & 255)
            labels = uids[rng.integers(0, len(uids), (size, size))]
            sample = Sample(f"s{k}", labels, image=image, confidence=rng.random((size, size), np.float32))
            start = time.perf_counter()
            writer.write(sample)
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        writer.close()
        close = time.perf_counter() - start
    span = min(1000, count)
    return {"samples": count, "seconds": timer.seconds, "ms_per_sample": 1000 * sum(times) / count,
            "first_1000_ms": 1000 * sum(times[:span]) / span, "last_1000_ms": 1000 * sum(times[-span:]) / span,
            "slowest_ms": 1000 * max(times), "over_50ms": sum(t > 0.05 for t in times),
            "slowest_at": sorted(range(count), key=times.__getitem__)[-5:], "close_s": close, "load": timer.load}


# -- 2. end-to-end -----------------------------------------------------------------------------------


def model_only(segmenter, images: list[np.ndarray], options: dict) -> float:
    """prepare -> run_windows -> finish on decoded images, in one thread, no files: seconds."""
    from napari_sclip.engine.vocabulary import parse_vocabulary

    vocabulary = parse_vocabulary(CLASSES)
    start = time.perf_counter()
    prepared = (segmenter.prepare(image, vocabulary, **options) for image in images)
    for item, canvas in segmenter.run_windows(prepared):
        segmenter.finish(item, canvas)
    _sync(segmenter.device)
    return time.perf_counter() - start


def bench_end_to_end(args, tmp: Path) -> dict:
    from napari_sclip.engine.segmenter import Segmenter

    model, checkpoint = (tiny_checkpoint if args.model == "tiny" else vit_b16_checkpoint)(tmp)
    segmenter = Segmenter(model, checkpoint, args.device, batch_size=args.batch_size, feature_cache=False)
    segmenter.load()
    count = args.images or (16 if segmenter.device.type == "cpu" and args.model != "tiny" else 512)
    paths = photo_jpegs(tmp / "photos", count)
    images = decoded(paths)
    options: dict = {}
    rows = []
    with precision(args.precision, args.device) as mode:
        segmenter.segment(images[0], CLASSES)  # warm-up: text embeddings, first-call costs
        for repeat in range(args.repeats):
            with Timer() as alone:
                seconds = in_thread(lambda: model_only(segmenter, images, options))
            piped = run_pipeline(paths, tmp / f"dataset-{repeat}", segmenter, options)
            piped.pop("marks")
            rows.append({"model_only_s": seconds, "model_only_load": alone.load, "end_to_end_s": piped["seconds"],
                         "end_to_end_cpu_s": piped["cpu_s"], "end_to_end_load": piped["load"]})
    best_alone = min(row["model_only_s"] for row in rows)
    best_piped = min(row["end_to_end_s"] for row in rows)
    cpu_ms = 1000 * min(row["end_to_end_cpu_s"] for row in rows) / count
    figures = {"device": str(segmenter.device), "model": args.model, "precision": mode, "images": count, "size": 512,
               "end_to_end_cpu_ms_per_image": cpu_ms,
               "classes": len(CLASSES), "batch_size": segmenter.batch_size,
               "windows_per_image": 4, "runs": rows, "model_only_images_per_s": count / best_alone,
               "end_to_end_images_per_s": count / best_piped, "ratio": best_alone / best_piped}
    table(["device", "model", "precision", "images", "model only (images/s)", "end-to-end (images/s)",
           "end-to-end / model only", "end-to-end CPU per image (ms)", "load (model only; end-to-end)"],
          [[figures["device"], args.model, mode, count, f"{figures['model_only_images_per_s']:.2f}",
            f"{figures['end_to_end_images_per_s']:.2f}", f"{figures['ratio']:.0%}", f"{cpu_ms:.1f}",
            "; ".join(f"{row['model_only_load']}; {row['end_to_end_load']}" for row in rows)]])
    return figures


# -- 3. windows --------------------------------------------------------------------------------------


def bench_windows(args, tmp: Path) -> dict:
    import torch
    from gpu_variants import build, profile_by_kind

    from napari_sclip.engine.segmenter import Segmenter

    model, checkpoint = vit_b16_checkpoint(tmp)
    segmenter = Segmenter(model, checkpoint, args.device, feature_cache=False)
    loaded = segmenter.load()
    device, visual = loaded.device, loaded.clip.visual
    photo_crops, text, reference = photo_windows(segmenter, tmp, args.agreement_images)
    rows, profiles = [], {}
    with precision(args.precision, args.device) as mode:
        for variant in args.variants:
            for batch in args.batch_sizes:
                try:  # one variant failing (a compiler, a capture) must not cost the others' figures
                    with Timer() as timer:
                        row = in_thread(functools.partial(measure_variant, variant, visual, batch, args.repeats,
                                                          (photo_crops, text, reference)))
                except Exception as exc:
                    print(f"  {variant}, batch {batch}: failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                    rows.append({"variant": variant, "batch": batch, "error": f"{type(exc).__name__}: {exc}"[:2000]})
                    continue
                rows.append({**row, "load": timer.load})
                print(f"  {variant}, batch {batch}: {row['windows_per_s']:.1f} windows/s, "
                      f"patch labels {row['patch_labels_equal_fp32']:.3%} equal to fp32's", flush=True)
            if args.profile and device.type == "cuda":
                batch = min(args.batch_sizes, key=lambda b: abs(b - 128))
                try:
                    run = build(variant, visual, batch, (224, 224))
                    profiles[variant] = {"batch": batch,
                                         "kinds": profile_by_kind(run, torch.randn(batch, 3, 224, 224, device=device))}
                except Exception as exc:
                    print(f"  profile of {variant} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    figures: dict = {"device": str(device), "precision": mode, "rows": rows, "profiles": profiles}
    table(["variant", "device", "batch", "best of", "first call (s)", "s per batch", "windows/s", "patch labels = fp32",
           "peak GPU memory", "load"],
          [[r["variant"], figures["device"], r["batch"], args.repeats, f"{r['first_s']:.2f}", f"{r['seconds']:.3f}",
            f"{r['windows_per_s']:.1f}", f"{r['patch_labels_equal_fp32']:.2%}",
            f"{r['peak_gpu_mb']:.0f} MB" if r["peak_gpu_mb"] is not None else "-", r["load"]]
           for r in rows if "error" not in r])
    for variant, found in profiles.items():
        print(f"where the time goes: {variant}, batch {found['batch']}, GPU kernel time by kind")
        table(["kind", "ms per batch", "share"], [[k, f"{ms:.2f}", f"{share:.0%}"] for k, ms, share in found["kinds"]])
    if device.type == "cuda" and "engine" in args.variants:
        figures["agreement"] = fp16_agreement(segmenter, tmp, args.agreement_images)
        a = figures["agreement"]
        print(f"fp16 vs fp32 labels on {a['images']} photos of 512 px, 8 classes: "
              f"{a['equal_pixels']:.2%} of pixels equal (worst image {a['worst_image']:.2%})")
    return figures


def measure_variant(variant: str, visual, batch: int, repeats: int, agreement_set) -> dict:
    """One variant at one batch size: its speed on random windows, peak GPU memory, and its
    patch labels on the photos' windows against fp32's."""
    import torch
    from gpu_variants import build, label_agreement, time_variant

    device = next(visual.parameters()).device
    crops = torch.randn(batch, 3, 224, 224, device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    run = build(variant, visual, batch, (224, 224))
    timing = time_variant(run, crops, repeats, lambda: _sync(device))
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    photo_crops, text, reference = agreement_set
    return {"variant": variant, "batch": batch, **timing, "windows_per_s": batch / timing["seconds"],
            "peak_gpu_mb": peak, "patch_labels_equal_fp32": label_agreement(run, reference, photo_crops, text, batch)}


def photo_windows(segmenter, tmp: Path, count: int):
    """The engine's normalised 224 px windows of ``count`` photos ``(W, 3, 224, 224)`` on the
    device, the vocabulary's text features ``(N, E)``, and fp32's best class per patch."""
    import torch

    from napari_sclip.engine.methods.sclip import sclip_patch_features
    from napari_sclip.engine.vocabulary import parse_vocabulary

    device = segmenter.device
    vocabulary = parse_vocabulary(CLASSES)
    crops = []
    for image in decoded(photo_jpegs(tmp / "windows", count, seed=2)):
        prepared = segmenter.prepare(image, vocabulary)
        crops += [prepared.pixels[:, y1:y2, x1:x2] for y1, y2, x1, x2 in prepared.windows]
    crops = torch.stack(crops).to(device)
    text = torch.from_numpy(segmenter.text_features(CLASSES)).to(device)
    with torch.inference_mode():
        reference = (sclip_patch_features(segmenter.load().clip.visual, crops).float() @ text.T).argmax(-1)
    return crops, text, reference


def fp16_agreement(segmenter, tmp: Path, count: int) -> dict:
    """Labels of the same photos with the engine's fp16 autocast and with fp32 on the GPU."""
    images = decoded(photo_jpegs(tmp / "agreement", count, seed=1))
    labels = {}
    for mode in ("auto", "fp32"):
        with precision(mode, str(segmenter.device)):
            labels[mode] = [segmenter.segment(image, CLASSES).labels for image in images]
    equal = [float((a == b).mean()) for a, b in zip(labels["auto"], labels["fp32"])]
    return {"images": count, "equal_pixels": float(np.mean(equal)), "worst_image": min(equal)}


# -- 4. dask -----------------------------------------------------------------------------------------


def bench_dask(args, tmp: Path) -> dict:
    import logging

    import torch

    logging.getLogger("distributed").setLevel(logging.ERROR)  # the clusters' start and stop messages

    from napari_sclip.engine.segmenter import Segmenter

    model, checkpoint = tiny_checkpoint(tmp)
    segmenter = Segmenter(model, checkpoint, args.device, feature_cache=False)
    segmenter.load()
    paths = small_pngs(tmp / "images", args.images, (96, 128))
    options: dict = {}
    run_pipeline(paths[:4], tmp / "warm-up", segmenter, options)
    rows = []
    single = run_pipeline(paths, tmp / "single", segmenter, options)
    rows.append({"setting": "single process", "workers": 0, "start_s": 0.0, "install_s": 0.0,
                 "torch_threads": torch.get_num_threads(), "seconds": single["seconds"], "load": single["load"]})
    print(f"  single process: {single['seconds']:.1f} s", flush=True)
    variants = ["dask", "unset"] if args.malloc_trim == "both" else [args.malloc_trim]
    for variant in variants:
        for k in args.workers:
            rows.append(dask_row(segmenter, paths, options, tmp, k, variant))
            print(f"  {rows[-1]['setting']}: {rows[-1]['seconds']:.1f} s", flush=True)
    for row in rows:
        row["images_per_s"] = args.images / row["seconds"]
    devices = machine()["devices"]
    print(f"{args.images} images of 96 x 128, tiny model, device {args.device}; os.cpu_count() = {os.cpu_count()}; "
          f"devices: {', '.join(devices)}")
    table(["setting", "cluster start (s)", "model install (s)", "torch threads per worker", "labelling (s)",
           "images/s", "vs single process", "load before -> after"],
          [[r["setting"], f"{r['start_s']:.1f}", f"{r['install_s']:.1f}", r["torch_threads"], f"{r['seconds']:.1f}",
            f"{r['images_per_s']:.1f}", f"{r['images_per_s'] / rows[0]['images_per_s']:.2f}x", r["load"]]
           for r in rows])
    return {"images": args.images, "size": [96, 128], "device": args.device, "cpu_count": os.cpu_count(),
            "devices": devices, "rows": rows}


def dask_row(segmenter, paths, options: dict, tmp: Path, workers: int, malloc_trim: str) -> dict:
    """One local cluster of ``workers`` processes: start it, install the model, label ``paths``.

    ``malloc_trim="dask"`` leaves Dask's nanny environment as it is: it starts workers with
    ``MALLOC_TRIM_THRESHOLD_=65536`` (and ``OMP_NUM_THREADS=1``); ``"unset"`` drops that one
    variable (``distributed.nanny.pre-spawn-environ``), so glibc's malloc keeps its defaults."""
    import dask

    from napari_sclip.dataset.cluster import PLUGIN_NAME, install_segmenter, open_client
    from napari_sclip.engine._torch import open_clip

    overrides = {} if malloc_trim == "dask" else {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
    # A nanny writes its pre-spawn variables into this process's os.environ and leaves them there
    # (distributed/nanny.py), where the next cluster's nannies would take them: restored below.
    environ = dict(os.environ)
    with dask.config.set(overrides), Timer() as started:
        client_context = open_client(workers=workers)
        client = client_context.__enter__()
    try:
        # What label_images installs (so that its own install is a no-op and the timing is labelling).
        config = open_clip.get_model_config(segmenter.model_name)
        with Timer() as installed:
            install_segmenter(client, {**segmenter.settings(), "feature_cache": False},
                              model_configs={segmenter.model_name: config})
        threads = sorted(set(client.run(lambda: __import__("torch").get_num_threads()).values()))
        trim = sorted(set(client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_", "unset")).values()))
        # Every worker's text embeddings out of the timing (each worker encodes them once).
        client.run(lambda dask_worker: dask_worker.plugins[PLUGIN_NAME].segmenter.text_features(CLASSES).shape)
        result = run_pipeline(paths, tmp / f"dask-{malloc_trim}-{workers}", segmenter, options, client=client)
    finally:
        client_context.__exit__(None, None, None)
        os.environ.clear()
        os.environ.update(environ)
    return {"setting": f"Dask, {workers} worker{'s' if workers > 1 else ''}, MALLOC_TRIM_THRESHOLD_ {trim[0]}",
            "workers": workers, "malloc_trim": trim, "start_s": started.seconds, "install_s": installed.seconds,
            "torch_threads": threads, "seconds": result["seconds"], "load": result["load"]}


# -- main --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    overhead = commands.add_parser("overhead", help="per-image overhead against dataset size (CPU, tiny model)")
    overhead.add_argument("--sizes", type=int, nargs="*", default=[1000, 20000], help="images per pipeline run")
    overhead.add_argument("--image-size", type=int, default=32, help="side of the PNGs, short side and window")
    overhead.add_argument("--writer-sizes", type=int, nargs="*", default=[500, 2000, 5000, 20000],
                          help="samples per DatasetWriter.write run (none: skip)")

    end_to_end = commands.add_parser("end-to-end", help="images/s from JPEG files against the model alone")
    end_to_end.add_argument("--images", type=int, default=None, help="default: 16 on the CPU, 512 on a GPU")
    end_to_end.add_argument("--repeats", type=int, default=1, help="runs of each (best is kept)")
    end_to_end.add_argument("--model", choices=["vit-b-16", "tiny"], default="vit-b-16",
                            help="tiny: the tests' 3-block CLIP, so that the dataset side's CPU cost shows")

    windows = commands.add_parser("windows", help="windows/s of the vision tower by batch size")
    windows.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                         help="default: 32 128 256 on CUDA, 4 8 on the CPU")
    windows.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (best is kept)")
    windows.add_argument("--agreement-images", type=int, default=4, help="photos for fp16 vs fp32 (CUDA)")
    windows.add_argument("--variants", nargs="+", default=["engine"], choices=VARIANTS,
                         help="ways to run the tower (benchmarks/gpu_variants.py); default: the engine's")
    windows.add_argument("--profile", action="store_true", help="GPU kernel time by kind per variant (CUDA)")

    dask = commands.add_parser("dask", help="a local Dask cluster against the single-process pipeline")
    dask.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    dask.add_argument("--images", type=int, default=200)
    dask.add_argument("--malloc-trim", choices=["dask", "unset", "both"], default="both",
                      help="workers with Dask's MALLOC_TRIM_THRESHOLD_=65536, without it, or both")

    for sub in (overhead, end_to_end, windows, dask):
        sub.add_argument("--json", type=Path, help="also write the figures to this file")
    for sub in (end_to_end, windows, dask):
        sub.add_argument("--device", default="cpu")
    for sub in (end_to_end, windows):
        sub.add_argument("--precision", choices=["auto", "fp32"], default="auto",
                         help="auto: the engine's (fp16 autocast on CUDA); fp32: autocast off")
    end_to_end.add_argument("--batch-size", type=int, default=None, help="windows per batch (engine default)")
    args = parser.parse_args()
    if args.command == "windows" and args.batch_sizes is None:
        args.batch_sizes = [32, 128, 256] if args.device.startswith("cuda") else [4, 8]

    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        os.environ["NAPARI_SCLIP_CACHE_DIR"] = str(Path(tmp) / "cache")
        os.environ["HF_HUB_OFFLINE"] = "1"
        figures = {"machine": machine(), "command": " ".join(sys.argv)}
        run = {"overhead": bench_overhead, "end-to-end": bench_end_to_end, "windows": bench_windows,
               "dask": bench_dask}[args.command]
        figures[args.command] = run(args, Path(tmp))
        figures["machine"]["load_at_end"] = loadavg()
    m = figures["machine"]
    print(f"machine: {m['cpu']}, os.cpu_count() {m['cpu_count']}, torch {m['torch']} ({m['torch_threads']} threads), "
          f"devices {m['devices']}, load {m['load_at_start']} -> {m['load_at_end']}, {m['date']}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
