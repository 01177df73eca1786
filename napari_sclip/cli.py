"""The ``napari-sclip`` command line.

* ``segment IMAGE... --classes-file FILE --out DATASET`` pseudo-labels images or folders of images
  into a dataset folder (``docs/dataset.md``); it resumes where an interrupted run stopped;
* ``export-coco DATASET OUT.json`` and ``export-voc DATASET OUT/`` convert a dataset;
* ``gui`` opens napari with the widget; ``review`` opens a dataset's review panel; ``info`` describes
  the installation.

Errors are one line on stderr and a non-zero exit status; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from napari_sclip import __version__
from napari_sclip.engine import config
from napari_sclip.engine.errors import SclipError
from napari_sclip.engine.methods import DEFAULT_METHOD, METHODS

EXIT_ERROR = 1
EXIT_SOME_FAILED = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line and exit status 1, like every other error (argparse prints the
    whole usage and exits 2, which ``segment`` uses for "some images were skipped")."""

    def error(self, message: str):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="napari-sclip",
        description="Open-vocabulary semantic segmentation with SCLIP and later training-free CLIP "
        "methods (any CLIP ViT, no training).",
    )
    parser.add_argument("--version", action="version", version=f"napari-sclip {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    seg = commands.add_parser(
        "segment",
        help="pseudo-label images into a dataset folder",
        description=(
            "Segment images (or folders of images) into the given classes and write them into a\n"
            "dataset folder: images, 8-bit training-id masks, confidence, provenance and a manifest\n"
            "(see docs/dataset.md). Images already in the dataset (same SHA-256) are skipped, so an\n"
            "interrupted run continues where it stopped."
        ),
        epilog="methods:\n" + "\n".join(f"  {m.name:<10} {m.description}" for m in METHODS.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    seg.add_argument("images", nargs="*", metavar="IMAGE", help="image files or folders of images")
    seg.add_argument("-r", "--recursive", action="store_true",
                     help="take the images in the folders' subfolders too (hidden ones and linked folders left out)")
    seg.add_argument("--files-from", metavar="LIST", action="append",
                     help="a text file of image paths, one per line (relative ones from the current folder; "
                     "# starts a comment), for more files than a command line takes; - reads standard input; "
                     "may be given more than once")
    vocab = seg.add_mutually_exclusive_group(required=True)
    vocab.add_argument(
        "--classes",
        metavar="TEXT",
        help='classes separated by ";", synonyms by ",": "cat; dog, puppy; grass"',
    )
    vocab.add_argument(
        "--classes-file", metavar="FILE", help="text file, one class per line, synonyms after commas"
    )
    seg.add_argument(
        "--out", required=True, metavar="DATASET", help="dataset folder (new, empty, or a dataset to add to)"
    )
    _add_model_options(seg)
    seg.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        choices=list(METHODS),
        metavar="METHOD",
        help=f"the training-free method (default: {DEFAULT_METHOD}; all of them are listed below)",
    )
    seg.add_argument("--short-side", type=int, default=None, metavar="PX", help="default: the method's (336; clearclip 448)")
    seg.add_argument("--window", type=int, default=None, metavar="PX", help="default: the method's (224; clearclip 448)")
    seg.add_argument("--stride", type=int, default=None, metavar="PX", help="default: the method's (112; clearclip 224)")
    seg.add_argument("--logit-scale", type=float, default=None, metavar="S", help="default: the method's (40; clearclip 50)")
    seg.add_argument(
        "--pamr",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="refine with PAMR (10 iterations, dilations 8 and 16); default: the method's (naclip only)",
    )
    seg.add_argument(
        "--prob-threshold",
        type=float,
        default=config.DEFAULT_PROB_THRESHOLD,
        metavar="P",
        help="leave pixels unlabelled (ignore, 255) where the winning probability is below P",
    )
    seg.add_argument(
        "--background-class", type=int, default=None, metavar="I",
        help="give pixels below --prob-threshold class I (the I-th class, from 0) instead of leaving them unlabelled",
    )
    seg.add_argument(
        "--area-threshold", type=float, default=None, metavar="A",
        help="drop classes (but the background class) that win at most a fraction A of the other pixels of an "
        "image, as SCLIP's authors do on VOC (needs --background-class)",
    )
    seg.add_argument("--batch-size", type=int, default=None, metavar="N", help="windows per forward pass")
    seg.add_argument(
        "--devices",
        default=None,
        metavar="LIST",
        help='several devices of this machine, one model each: "cuda:0,cuda:1", or "all" for every GPU',
    )
    seg.add_argument(
        "--workers", type=_positive, default=None, metavar="N",
        help="run on a Dask cluster of N worker processes on this machine, one model and one torch thread "
        "each (needs the 'distributed' package: pip install -e '.[cluster]')",
    )
    seg.add_argument(
        "--scheduler", default=None, metavar="ADDRESS",
        help="run on an existing Dask cluster, e.g. tcp://HOST:8786 (see docs/cluster.md)",
    )
    seg.add_argument(
        "--splits",
        type=_split_ratios,
        default=None,
        metavar="RATIOS",
        help='split ratios of a new dataset, e.g. "train=0.7,val=0.2,test=0.1" (default train=0.8,val=0.2)',
    )
    seg.add_argument(
        "--overwrite",
        action="store_true",
        help="label images already in the dataset again (never those a person edited or reviewed)",
    )
    seg.add_argument("--quiet", action="store_true", help="no progress bar")
    seg.add_argument("--log-every", type=_positive_seconds, default=60.0, metavar="SECONDS",
                     help="where stderr is not a terminal (a batch job's log): a progress line this often "
                     "(0.1 to 86400; default 60)")

    coco = commands.add_parser(
        "export-coco",
        help="write a dataset as COCO JSON (compressed RLE)",
        description="Write a dataset as COCO JSON: one annotation per class per 8-connected "
        "component, with pycocotools' compressed RLE.  Image paths are relative to DATASET.",
    )
    coco.add_argument("dataset", metavar="DATASET")
    coco.add_argument("out", metavar="OUT.json")
    coco.add_argument("--overwrite", action="store_true", help="replace OUT.json if it exists")
    coco.add_argument("--quiet", action="store_true", help="no progress bar")

    voc = commands.add_parser(
        "export-voc",
        help="write a dataset in VOC / CVAT 'Segmentation mask 1.1' layout",
        description="Write a dataset in the Pascal VOC layout that CVAT ('Segmentation mask 1.1') "
        "and Datumaro import: palette PNG masks, labelmap.txt, image lists per split.",
    )
    voc.add_argument("dataset", metavar="DATASET")
    voc.add_argument("out", metavar="OUT", help="folder: new, empty, or an earlier export to update")
    voc.add_argument("--quiet", action="store_true", help="no progress bar")

    gui = commands.add_parser(
        "gui",
        help="open napari with the SCLIP widget and an image",
        description="Open napari with the SCLIP segmentation widget docked, showing the given images "
        "(or the astronaut sample).",
    )
    gui.add_argument("images", nargs="*", metavar="IMAGE", help="image files or folders (default: a sample)")

    review = commands.add_parser(
        "review",
        help="review a dataset in napari, one image at a time",
        description="Open napari with a dataset's review panel (and the SCLIP widget): the first "
        "sample not yet reviewed is shown; edits are saved as you move on.",
    )
    review.add_argument("dataset", metavar="DATASET", help="a napari-sclip dataset folder (or its dataset.json)")

    _add_evaluate(commands)
    commands.add_parser("info", help="show versions, devices, defaults and cache folders")
    commands.add_parser(
        "models",
        help="list the model presets (--model KEY) with their sizes",
        description="The model presets: general CLIPs and CLIPs trained on biology, histopathology and "
        "remote-sensing images. Give a KEY as --model (in segment and evaluate) or pick it in the widget. "
        "Any other plain open_clip ViT works too: --model NAME --pretrained TAG|FILE, --model "
        "hf-hub:ORG/REPO or --model local-dir:FOLDER (see docs/models.md).",
    )
    return parser


def _add_model_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--model",
        default=None,
        help="a preset ('napari-sclip models'), an open_clip ViT name, hf-hub:ORG/REPO or local-dir:FOLDER "
        f"(default: {config.default_model()})",
    )
    command.add_argument(
        "--pretrained",
        default=None,
        help="open_clip tag, checkpoint file, hf-hub:ORG/REPO/FILE or a model folder (default: "
        f"{config.default_pretrained()}, or the model's own weights for a preset, repo or folder)",
    )
    command.add_argument("--device", default=None, help=f"auto, cpu, cuda, cuda:N, mps (default: {config.default_device()})")
    command.add_argument(
        "--quick-gelu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="build the MLPs with QuickGELU, as OpenAI's weights need (default: decided from the weights, "
        "with a warning where they cannot tell)",
    )


def _add_evaluate(commands) -> None:
    from napari_sclip.evaluate.benchmarks import BENCHMARKS

    evaluate = commands.add_parser(
        "evaluate",
        help="score methods and settings against ground truth (mIoU, as mmseg)",
        description=(
            "Score the methods, and every combination of the swept settings, against ground truth:\n"
            "a benchmark in its standard layout, a folder of images with index-PNG masks, or a\n"
            "dataset's reviewed samples. Prints per-setting mIoU / mAcc / aAcc (mmseg's IoUMetric),\n"
            "the share of pixels labelled and of those the share right, then the best setting's\n"
            "per-class table. Lists take commas: --prob-threshold 0,0.1,0.2. An interrupted run\n"
            "goes on where it stopped when the same command is run again."
        ),
        epilog="benchmarks (SCLIP's Table 1; settings as the authors' configs):\n" + "\n".join(
            f"  {b.name:<12} {b.title:<12} short side {b.short_side}, logit scale {b.logit_scale:g}, "
            f"prob. threshold {b.prob_threshold:g}"
            + (f", area threshold {b.area_threshold:g}" if b.area_threshold is not None else "")
            + f"; SCLIP {b.paper_miou:.1f}" for b in BENCHMARKS.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--benchmark", metavar="NAME", help="one of the benchmarks below (with --data-root)")
    source.add_argument("--images", metavar="DIR", help="a folder of images (with --masks and --classes-file)")
    source.add_argument("--dataset", metavar="DATASET", help="a napari-sclip dataset: its reviewed samples")
    evaluate.add_argument("--data-root", metavar="DIR", help="the benchmark's folder, e.g. VOCdevkit/VOC2012")
    evaluate.add_argument("--masks", metavar="DIR", help="index PNGs named as the images (value i = class i, 255 ignore)")
    evaluate.add_argument("--classes-file", metavar="FILE", help="one class per line (synonyms after commas), "
                          "in the masks' order")
    evaluate.add_argument("--status", default="reviewed", type=_statuses, metavar="STATUS",
                          help="which of the dataset's samples are ground truth: reviewed (the default), edited, "
                          "or reviewed,edited")
    evaluate.add_argument("--background-class", type=int, default=None, metavar="I",
                          help="pixels below the probability threshold get class I (benchmarks: the authors' choice)")
    _add_model_options(evaluate)
    evaluate.add_argument("--methods", default=DEFAULT_METHOD, metavar="LIST",
                          help=f"methods to compare, e.g. sclip,naclip (default: {DEFAULT_METHOD}; "
                          f"any of {', '.join(METHODS)})")
    evaluate.add_argument("--logit-scale", default=None, metavar="LIST",
                          help="logit scales to sweep (default: the method's authors' on a benchmark, else the "
                          "method's)")
    evaluate.add_argument("--prob-threshold", default=None, metavar="LIST",
                          help="probability thresholds to sweep (default: the method's authors' on a benchmark, else 0)")
    evaluate.add_argument("--area-threshold", default=None, metavar="LIST",
                          help="area thresholds to sweep, 'none' for off (default: the method's authors' on a "
                          "benchmark, else none; needs a background class)")
    evaluate.add_argument("--short-side", type=int, default=None, metavar="PX",
                          help="default: the method's authors' on a benchmark, else the method's")
    evaluate.add_argument("--window", type=int, default=None, metavar="PX", help="default: as --short-side")
    evaluate.add_argument("--stride", type=int, default=None, metavar="PX", help="default: as --short-side")
    evaluate.add_argument("--pamr", action=argparse.BooleanOptionalAction, default=None,
                          help="refine with PAMR; default: the method's (naclip only)")
    evaluate.add_argument("--batch-size", type=int, default=None, metavar="N", help="windows per forward pass")
    evaluate.add_argument("--limit", type=_positive, default=None, metavar="N", help="score the first N images only")
    evaluate.add_argument("--workers", type=_positive, default=None, metavar="N",
                          help="score on a Dask cluster of N worker processes on this machine (needs 'distributed')")
    evaluate.add_argument("--scheduler", default=None, metavar="ADDRESS",
                          help="score on an existing Dask cluster, e.g. tcp://HOST:8786 (the images must be readable "
                          "there)")
    evaluate.add_argument("--json", metavar="REPORT.json", help="write every figure, the settings and the versions")
    evaluate.add_argument("--plot", metavar="REPORT.png", help="draw per-class IoU bars, one per method (its best setting)")
    evaluate.add_argument("--save-predictions", metavar="DIR",
                          help="write each image's predicted classes as PNG: DIR/<setting>/<image>.png")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")


def _load_vocabulary(args: argparse.Namespace):
    from napari_sclip.engine.vocabulary import parse_vocabulary_text, read_vocabulary_file

    if args.classes_file:
        return read_vocabulary_file(args.classes_file)
    return parse_vocabulary_text(args.classes, separator=";")


def _split_ratios(text: str) -> dict[str, float]:
    """``"train=0.7,val=0.3"`` -> ``{"train": 0.7, "val": 0.3}`` (checked by the dataset writer)."""
    try:
        pairs = [item.split("=") for item in text.split(",") if item.strip()]
        return {name.strip(): float(value) for name, value in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected name=ratio pairs such as train=0.8,val=0.2, got {text!r}") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _gpu_count() -> int:
    from napari_sclip.engine._torch import torch

    return torch.cuda.device_count()


def _devices(text: str) -> list[str]:
    """``"cuda:0,cuda:1"`` -> the devices; ``"all"`` -> every GPU torch sees (else the CPU)."""
    if text.strip() == "all":
        return [f"cuda:{k}" for k in range(_gpu_count())] or ["cpu"]
    devices = [name.strip() for name in text.split(",") if name.strip()]
    if not devices:
        raise SclipError(f"--devices expects names such as cuda:0,cuda:1, got {text!r}")
    kinds = [name.split(":")[0] for name in devices]
    if len(set(devices)) != len(devices) or kinds.count("cpu") > 1:
        raise SclipError(f"--devices names a device twice: {text!r}")
    return devices


@contextlib.contextmanager
def _progress_bar(quiet: bool, **options) -> Iterator:
    """A tqdm bar on a terminal only (logs and pipes get none), erased when the command fails so
    that its error stays one line."""
    from tqdm.auto import tqdm

    bar = tqdm(disable=True if quiet else None, dynamic_ncols=True, **options)
    try:
        yield bar
    except BaseException:
        bar.leave = False
        raise
    finally:
        bar.close()


class _SliceProgress:
    """The ``segment`` progress bar: one step per 2D slice, with images per second and the time
    left (a file counts as one slice until it is read; a stack then grows the total), and the
    model's download in its postfix; in a log, its lines (:class:`_LogLines`)."""

    def __init__(self, bar, log: _LogLines | None = None):
        self.bar, self.log = bar, log

    def __call__(self, step) -> None:
        if step.stage == "slices":
            if self.log is not None:
                self.log.update(step.done, step.total)
            if step.done and getattr(self.bar, "postfix", None):
                self.bar.set_postfix_str("", refresh=False)
            self.bar.total = step.total
            self.bar.n = step.done
            self.bar.refresh()
        elif step.stage == "download":
            size = f" {step.done / 2**20:.0f}/{step.total / 2**20:.0f} MB" if step.total else ""
            self.bar.set_postfix_str("downloading weights" + size)
        elif step.stage == "load":
            self.bar.set_postfix_str("loading model" if step.done < step.total else "")


class _LogLines:
    """Progress for a log (stderr not a terminal, as in a batch job): every ``every`` seconds a
    line with the slices done, failures, the rate and the time left, or that nothing is done yet
    (the model loading, or a cluster with no workers)."""

    def __init__(self, every: float, out=None):
        import threading
        import time

        self.every, self.out, self._clock = every, out or sys.stderr, time.monotonic
        self.done = self.total = self.failed = 0
        self._start = self._clock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="napari-sclip log progress", daemon=True)

    def __enter__(self) -> _LogLines:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def update(self, done: int, total: int) -> None:
        self.done, self.total = done, total

    def line(self) -> str:
        failed = f" ({self.failed} failed)" if self.failed else ""
        if not self.done:
            return (f"napari-sclip: 0 of {self.total} done so far (reading and planning, loading the model, "
                    "or waiting for Dask workers)")
        rate = self.done / max(self._clock() - self._start, 1e-9)
        left = (self.total - self.done) / rate
        return (f"napari-sclip: {self.done} of {self.total} done{failed}, {rate:.1f}/s, "
                f"about {_duration(left)} left")

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            print(self.line(), file=self.out, flush=True)


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 1:
        return f"{max(1, round(seconds))} s"
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.1 <= value <= 86400:  # NaN too; shorter would flood a log, longer overflows a timer
        raise argparse.ArgumentTypeError(f"expected a number of seconds from 0.1 to 86400, got {text!r}")
    return value


def _segment(args: argparse.Namespace) -> int:
    from napari_sclip.dataset.batch import label_images
    from napari_sclip.dataset.splits import check_ratios
    from napari_sclip.engine.segmenter import Segmenter
    from napari_sclip.io.images import find_images

    vocabulary = _load_vocabulary(args)
    out = Path(args.out).expanduser()
    if not args.images and args.files_from is None:
        raise SclipError("give images, folders of images or --files-from LIST")
    # The dataset's own images are never input, even when it lies inside a folder given.
    images = find_images(args.images, recursive=args.recursive, exclude=out) if args.images else []
    for listing in args.files_from or ():
        images = list(dict.fromkeys([*images, *_listed_files(listing)]))
    if not images:
        raise SclipError(f"--files-from {' '.join(args.files_from)} lists no images")
    ratios = check_ratios(args.splits) if args.splits else None
    # An empty --scheduler (an unset variable in a job script) is an error, not a local run.
    client_wanted = args.workers is not None or args.scheduler is not None
    if args.workers is not None and args.scheduler is not None:
        raise SclipError("choose --workers (a cluster on this machine) or --scheduler (an existing one), not both")
    if args.devices and client_wanted:
        raise SclipError("--devices is for one machine; on a cluster each worker uses its own device (--device)")
    devices = _devices(args.devices) if args.devices else [args.device]
    if not args.devices and client_wanted is False and (args.device or config.default_device()) in ("auto", "cuda"):
        devices = _devices("all") if _gpu_count() > 1 else devices  # every GPU seen, one model each
    # Each image is seen once: caching its features would only hold memory.
    segmenters = [
        Segmenter(args.model, args.pretrained, device, quick_gelu=args.quick_gelu, batch_size=args.batch_size,
                  feature_cache=False)
        for device in devices
    ]
    options = {
        "method": args.method,
        "pamr": args.pamr,
        "short_side": args.short_side,
        "window": args.window,
        "stride": args.stride,
        "logit_scale": args.logit_scale,
        "prob_threshold": args.prob_threshold,
        "background_class": args.background_class,
        "area_threshold": args.area_threshold,
    }
    counts = {"written": 0, "skipped": 0, "kept": 0, "failed": 0}
    failures: list[str] = []
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(_progress_bar(args.quiet, total=len(images), unit="slice"))
        log = None
        if not args.quiet and not sys.stderr.isatty():
            log = stack.enter_context(_LogLines(args.log_every))
            log.update(0, len(images))
        client = None
        if client_wanted:
            from napari_sclip.dataset.cluster import open_client

            bar.set_postfix_str("starting Dask workers" if args.workers else "connecting to the Dask scheduler")
            client = stack.enter_context(open_client(args.workers, args.scheduler))
            bar.set_postfix_str("loading the model on the workers")
        run = label_images(
            images, vocabulary, out, segmenters, options=options, overwrite=args.overwrite,
            ratios=ratios, progress=_SliceProgress(bar, log), client=client,
        )
        for item in run:
            counts[item.status] += 1
            if item.status == "failed":
                failures.append(item.reason)
                if log is not None:
                    log.failed = len(failures)

    # Some images done: the others were skipped.  None done: the input itself is unusable.
    usable = len(failures) < len(images)
    for failure in failures:
        print(f"napari-sclip: {'skipped' if usable else 'error:'} {failure}", file=sys.stderr)
    if not args.quiet:
        notes = [f"{counts['written']} image(s) labelled into {out}"]
        if counts["skipped"]:
            notes.append(f"{counts['skipped']} already there (--overwrite labels them again)")
        if counts["kept"]:
            notes.append(f"{counts['kept']} kept: edited or reviewed by a person")
        if counts["failed"]:
            notes.append(f"{counts['failed']} failed")
        print("; ".join(notes), file=sys.stderr)
    if failures:
        return EXIT_SOME_FAILED if usable else EXIT_ERROR
    return 0


def _listed_files(source: str) -> list[Path]:
    """The paths of a ``--files-from`` list, as given: one per line (only ``\\n`` ends a line,
    spaces are kept, bytes that are not UTF-8 are kept as the file system gives them), ``#``
    starting a comment.  A listed path that cannot be read fails on its own in the run."""
    import stat

    from napari_sclip._files import describe_os_error

    try:
        if source == "-":
            data = sys.stdin.buffer.read()
        else:
            path = Path(source).expanduser()
            mode = os.stat(path).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):  # /dev/zero would fill the memory
                raise SclipError(f"--files-from {source}: not a text file")
            data = path.read_bytes()
    except FileNotFoundError:
        raise SclipError(f"--files-from {source}: no such file") from None
    except OSError as exc:
        raise SclipError(f"cannot read --files-from {source}: {describe_os_error(exc, Path(source))}") from None
    if b"\0" in data:
        raise SclipError(f"--files-from {source} holds a NUL byte: write one path per line")
    lines = (os.fsdecode(line.removesuffix(b"\r")) for line in data.removeprefix(b"\xef\xbb\xbf").split(b"\n"))
    return [Path(line).expanduser() for line in lines if line.strip() and not line.startswith("#")]


def _export(args: argparse.Namespace) -> int:
    with _progress_bar(args.quiet, unit="image") as bar:

        def show(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        if args.command == "export-coco":
            from napari_sclip.dataset.coco import export_coco

            counts = export_coco(args.dataset, args.out, overwrite=args.overwrite, progress=show)
            summary = f"{counts['images']} image(s), {counts['annotations']} annotation(s), {counts['categories']} categories"
        else:
            from napari_sclip.dataset.voc import export_voc

            per_split = export_voc(args.dataset, args.out, progress=show)
            summary = ", ".join(f"{n} {split}" for split, n in per_split.items()) or "no images"
    if not args.quiet:
        print(f"wrote {args.out}: {summary}", file=sys.stderr)
    return 0


def open_gui(images: Sequence[str] = ()):
    """A napari viewer with the SCLIP widget docked and ``images`` (or the astronaut sample) open."""
    import napari

    from napari_sclip.io.images import find_images

    paths = find_images(list(images)) if images else []
    viewer = napari.Viewer(title="napari-sclip")
    if paths:
        for path in paths:
            viewer.open(str(path))
    else:
        viewer.open_sample("napari-sclip", "astronaut")
    _, widget = viewer.window.add_plugin_dock_widget("napari-sclip", "SCLIP segmentation")
    return viewer, widget


def open_review_gui(dataset: str):
    """A napari viewer reviewing ``dataset``, with the SCLIP widget docked (to segment again)."""
    import napari

    from napari_sclip.plugin.review_panel import show_review

    viewer = napari.Viewer(title="napari-sclip review")
    try:
        panel = show_review(viewer, dataset)
    except BaseException:
        viewer.close()
        raise
    return viewer, panel


def _review(args: argparse.Namespace) -> int:
    from napari_sclip.plugin.review import dataset_root

    dataset_root(args.dataset)  # before napari starts: a wrong path is one line, at once
    _check_display("review")
    import napari

    open_review_gui(args.dataset)
    napari.run()
    return 0


def _check_display(command: str = "gui") -> None:
    """Qt aborts the process (several lines, exit 134) when Linux has no display: say it in one."""
    import os

    if not sys.platform.startswith("linux") or os.environ.get("QT_QPA_PLATFORM"):
        return
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise SclipError(
            "no display to open napari on (DISPLAY is not set): run it on a desktop, through "
            f"'ssh -X', or under a virtual display with 'xvfb-run -a napari-sclip {command} ...'; to label "
            "images without a window, use 'napari-sclip segment'"
        )


def _gui(args: argparse.Namespace) -> int:
    _check_display()
    import napari

    open_gui(args.images)
    napari.run()
    return 0


def _models(_: argparse.Namespace) -> int:
    from napari_sclip.engine.presets import DEFAULT_PRESET, PRESETS

    rows = [("KEY", "MODEL", "DOMAIN", "SIZE", "WEIGHTS")]
    for preset in PRESETS.values():
        size = f"{preset.size_mb / 1000:.1f} GB" if preset.size_mb >= 1000 else f"{preset.size_mb} MB"
        key = preset.key + (" *" if preset.key == DEFAULT_PRESET else "")
        rows.append((key, preset.title, preset.domain, size, preset.pretrained or preset.model))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print("\n* the default. Use one with --model KEY (segment, evaluate), Segmenter(model=\"KEY\") or the "
          "widget's model list.\nSizes are the fp32 weights, downloaded once into "
          f"{config.models_dir()}.")
    for preset in PRESETS.values():
        if preset.terms:
            print(f"{preset.key}: {preset.terms}")
    print("Offline: download the weights elsewhere and pass them as --pretrained FILE or --model "
          "local-dir:FOLDER (docs/models.md).")
    return 0


def _info(_: argparse.Namespace) -> int:
    import platform

    from napari_sclip.engine._torch import open_clip, torch
    from napari_sclip.engine.model import available_devices, resolve_device

    rows = [
        ("napari-sclip", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("open_clip", open_clip.__version__),
        ("cuda", f"{torch.version.cuda} ({torch.cuda.device_count()} GPU(s) visible)" if torch.version.cuda else "not built"),
        ("devices", ", ".join(available_devices())),
        ("auto device", str(resolve_device("auto"))),
        ("default model", config.default_model()),
        ("default weights", config.default_pretrained()),
        ("default device", config.default_device()),
        ("cache", str(config.cache_dir())),
        ("model downloads", str(config.models_dir())),
        ("text embeddings", str(config.text_cache_dir())),
        ("feature cache", f"{config.feature_cache_mb():g} MB in memory (NAPARI_SCLIP_FEATURE_CACHE_MB)"),
        ("methods", ", ".join(METHODS) + f" (default {DEFAULT_METHOD})"),
        ("dask distributed", _version_of("distributed") or "not installed (--workers and --scheduler need "
                                                              "it: pip install distributed)"),
        ("dask-jobqueue", _version_of("dask-jobqueue") or "not installed (for SLURM and other batch systems)"),
    ]
    if torch.cuda.is_available():
        rows += [(f"cuda:{i}", torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _version_of(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _evaluate(args: argparse.Namespace) -> int:
    from napari_sclip.engine.segmenter import Segmenter
    from napari_sclip.evaluate.run import Checkpoint, Tally, fingerprint, iter_evaluate, sweep

    truth = _evaluation_truth(args)
    methods = _list(args.methods, str, "--methods")
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        raise SclipError(f"unknown method {unknown[0]!r}: choose from {', '.join(METHODS)}")
    settings = sweep(
        truth, methods,
        _list(args.logit_scale, float, "--logit-scale") if args.logit_scale else None,
        _list(args.prob_threshold, float, "--prob-threshold") if args.prob_threshold else None,
        _list(args.area_threshold, float, "--area-threshold") if args.area_threshold else None,
    )
    if truth.background_class is None and any(setting.area_threshold is not None for setting in settings):
        raise SclipError("--area-threshold needs a background class (--background-class I)")
    if args.workers is not None and args.scheduler is not None:
        raise SclipError("choose --workers (a cluster on this machine) or --scheduler (an existing one), not both")
    predictions = _evaluation_outputs(args, truth)
    segmenter = Segmenter(args.model, args.pretrained, args.device, quick_gelu=args.quick_gelu,
                          batch_size=args.batch_size, feature_cache=False)
    options = {"short_side": args.short_side, "window": args.window, "stride": args.stride, "pamr": args.pamr,
               "predictions": str(predictions) if predictions else None}
    model = {"model": segmenter.model_name, "pretrained": segmenter.pretrained, "device": segmenter.device_name,
             "quick_gelu": segmenter.quick_gelu}  # the weights as resolved here: a new default is a new run
    # The same command goes on where an interrupted one stopped: its tally is kept in the cache.
    run_id = fingerprint(truth, settings, model, options)
    checkpoint = Checkpoint(config.cache_dir() / "evaluate" / f"{run_id[:32]}.json", run_id)
    total = len(truth.pairs) * len(methods)
    tally = checkpoint.load(settings, len(truth.vocabulary))
    if tally is not None and not args.quiet:
        done = sum(len(names) for names in tally.done.values())
        print(f"napari-sclip: going on from the interrupted run: {done} of {total} images already scored",
              file=sys.stderr)
    tally = tally if tally is not None else Tally.empty(settings, len(truth.vocabulary))
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(_progress_bar(args.quiet, total=total, unit="image"))
        client = None
        if args.workers is not None or args.scheduler is not None:
            from napari_sclip.dataset.cluster import open_client

            bar.set_postfix_str("starting Dask workers" if args.workers else "connecting to the Dask scheduler")
            client = stack.enter_context(open_client(args.workers, args.scheduler))
            bar.set_postfix_str("")
        steps = iter_evaluate(truth, segmenter, settings, short_side=args.short_side, window=args.window,
                              stride=args.stride, pamr=args.pamr, predictions=predictions, tally=tally, client=client)
        try:
            while True:
                try:
                    bar.n, _ = next(steps)
                except StopIteration as finished:
                    report = finished.value
                    break
                bar.refresh()
                checkpoint.save(tally)
        except KeyboardInterrupt:
            checkpoint.save(tally, now=True)
            raise
    _print_report(report, segmenter.load())
    try:
        _write_report(report, args)
    except BaseException:
        checkpoint.save(tally, now=True)  # fix the path and run again: nothing is scored twice
        raise
    checkpoint.remove()
    return 0


def _evaluation_truth(args: argparse.Namespace):
    """The ground truth the arguments name."""
    from dataclasses import replace

    from napari_sclip.engine.vocabulary import read_vocabulary_file
    from napari_sclip.evaluate.run import benchmark_truth, dataset_truth, folder_truth

    if args.data_root and not args.benchmark:
        raise SclipError("--data-root is for --benchmark")
    if (args.masks or args.classes_file) and not args.images:
        raise SclipError("--masks and --classes-file are for --images")
    if args.benchmark:
        if not args.data_root:
            raise SclipError("--benchmark needs --data-root, the folder that holds its images and labels")
        truth = benchmark_truth(args.benchmark, args.data_root)
        if args.background_class is not None:
            truth = replace(truth, background_class=args.background_class)
    elif args.images:
        if not (args.masks and args.classes_file):
            raise SclipError("--images needs --masks and --classes-file")
        truth = folder_truth(args.images, args.masks, read_vocabulary_file(args.classes_file), args.background_class)
    else:
        truth = dataset_truth(args.dataset, args.status, args.background_class)
    return replace(truth, pairs=truth.pairs[: args.limit]) if args.limit else truth


def _evaluation_outputs(args: argparse.Namespace, truth) -> Path | None:
    """Check the report files can be written, before hours of scoring; returns the predictions
    folder (never inside the images or masks: a later run would take them for input)."""
    import os

    for option, value in (("--json", args.json), ("--plot", args.plot)):
        if value is None:
            continue
        path = Path(value).expanduser()
        if option == "--plot" and path.suffix.lower() != ".png":
            raise SclipError(f"--plot writes a PNG: give a file name ending in .png, not {path.name!r}")
        if path.is_dir():
            raise SclipError(f"{option} {path} is a folder: give a file name")
        if not path.parent.is_dir():
            raise SclipError(f"{option} {path}: the folder {path.parent} does not exist")
        if not os.access(path.parent, os.W_OK):
            raise SclipError(f"{option} {path}: the folder {path.parent} cannot be written")
    if not args.save_predictions:
        return None
    predictions = Path(args.save_predictions).expanduser()
    inputs = {pair.image.parent.resolve() for pair in truth.pairs} | {pair.label.parent.resolve() for pair in truth.pairs}
    chosen = predictions.resolve()
    if any(chosen == folder or folder in chosen.parents for folder in inputs):
        raise SclipError(f"--save-predictions {predictions} overlaps the images or masks: choose a folder of its own")
    return predictions


def _print_report(report, model) -> None:
    best, best_scores = report.best
    if report.caveat:
        warnings.warn(report.caveat, stacklevel=1)
    print(f"{report.truth}: {report.images} image{'s' if report.images != 1 else ''}")
    print(f"model: {model.name} ({model.pretrained}), {'QuickGELU' if model.quick_gelu else 'GELU'}, "
          f"{model.patch_size} px patches")
    print(report.table())
    print(f"\nbest: {best.describe()}")
    print(best_scores.table())


def _write_report(report, args: argparse.Namespace) -> None:
    if args.json:
        import json

        from napari_sclip._files import atomic_write_bytes

        document = {**report.to_json(), "versions": _versions()}
        atomic_write_bytes(Path(args.json).expanduser(), (json.dumps(document, indent=2) + "\n").encode())
    if args.plot:
        from napari_sclip.evaluate.plot import plot_report

        plot_report(report, Path(args.plot).expanduser())


def _statuses(text: str) -> tuple[str, ...]:
    chosen = tuple(item.strip() for item in text.split(",") if item.strip())
    if not chosen or not set(chosen) <= {"reviewed", "edited"}:
        raise argparse.ArgumentTypeError(f"give reviewed, edited or reviewed,edited, not {text!r}")
    return chosen


def _list(text: str, convert, option: str) -> list:
    """``"0,0.1"`` -> ``[0.0, 0.1]``; ``none`` or ``default`` give ``None`` (the default)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        values = [None if item.lower() in ("none", "default") else convert(item) for item in items]
    except ValueError:
        raise SclipError(f"{option} takes a comma-separated list, got {text!r}") from None
    if not values:
        raise SclipError(f"{option} is empty")
    return values


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("napari-sclip", "torch", "open_clip_torch", "numpy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning as one stderr line, like an error: no source location or code line, and
    on a line of its own above a progress bar (``tqdm.write``)."""
    from tqdm.auto import tqdm

    tqdm.write(f"napari-sclip: warning: {_one_line(message)}", file=sys.stderr)


def _one_line(message) -> str:
    """Any message as one printable line: a path may hold a newline or a terminal escape."""
    return "".join(c if c.isprintable() else " " for c in " ".join(str(message).split()))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    command = {"segment": _segment, "export-coco": _export, "export-voc": _export, "gui": _gui, "review": _review,
               "evaluate": _evaluate, "info": _info, "models": _models}[args.command]
    try:
        with warnings.catch_warnings():  # restores showwarning
            warnings.showwarning = _show_warning
            return command(args)
    except SclipError as exc:
        print(f"napari-sclip: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        resume = {"segment": "; the dataset is valid: run the same command to go on",
                  "evaluate": "; run the same command to go on"}.get(args.command, "")
        print(f"napari-sclip: interrupted{resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:  # a file or folder the user can fix (full, read-only, vanished, ...)
        if args.debug:
            raise
        from napari_sclip._files import describe_os_error

        print(f"napari-sclip: error: {_one_line(describe_os_error(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:
        if args.debug:
            raise
        message = _one_line(exc)[:300]
        print(
            f"napari-sclip: error: {type(exc).__name__}: {message} (run with --debug for details)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
