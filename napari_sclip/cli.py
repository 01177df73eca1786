"""The ``napari-sclip`` command line.

``napari-sclip segment IMAGE... --classes "cat; dog, puppy" --out DIR`` segments images or folders
of images and writes one indexed PNG label map per image plus ``classes.json``;
``napari-sclip info`` describes the installation.  Errors are one line on stderr and a non-zero
exit status; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from napari_sclip import __version__
from napari_sclip.engine import config
from napari_sclip.engine.errors import SclipError

EXIT_ERROR = 1
EXIT_SOME_FAILED = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-sclip",
        description="Open-vocabulary semantic segmentation with SCLIP (CLIP ViT-B/16, no training).",
    )
    parser.add_argument("--version", action="version", version=f"napari-sclip {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    seg = commands.add_parser(
        "segment",
        help="segment images and write label maps",
        description="Segment images (or folders of images) into the given classes and write one "
        "indexed PNG label map per image (0 = unlabelled, i = class i) and classes.json to --out.",
    )
    seg.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    vocab = seg.add_mutually_exclusive_group(required=True)
    vocab.add_argument(
        "--classes",
        metavar="TEXT",
        help='classes separated by ";", synonyms by ",": "cat; dog, puppy; grass"',
    )
    vocab.add_argument(
        "--classes-file", metavar="FILE", help="text file, one class per line, synonyms after commas"
    )
    seg.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    seg.add_argument("--model", default=None, help=f"open_clip model (default: {config.default_model()})")
    seg.add_argument(
        "--pretrained",
        default=None,
        help=f"open_clip tag or checkpoint path (default: {config.default_pretrained()})",
    )
    seg.add_argument("--device", default=None, help=f"auto, cpu, cuda, cuda:N, mps (default: {config.default_device()})")
    seg.add_argument("--short-side", type=int, default=config.DEFAULT_SHORT_SIDE, metavar="PX")
    seg.add_argument("--window", type=int, default=config.DEFAULT_WINDOW, metavar="PX")
    seg.add_argument("--stride", type=int, default=config.DEFAULT_STRIDE, metavar="PX")
    seg.add_argument("--logit-scale", type=float, default=config.DEFAULT_LOGIT_SCALE, metavar="S")
    seg.add_argument(
        "--prob-threshold",
        type=float,
        default=config.DEFAULT_PROB_THRESHOLD,
        metavar="P",
        help="label 0 where the winning probability is below P",
    )
    seg.add_argument("--batch-size", type=int, default=None, metavar="N", help="windows per forward pass")
    seg.add_argument("--overwrite", action="store_true", help="replace label maps that already exist")
    seg.add_argument("--quiet", action="store_true", help="no progress bar")

    gui = commands.add_parser(
        "gui",
        help="open napari with the SCLIP widget and an image",
        description="Open napari with the SCLIP segmentation widget docked, showing the given images "
        "(or the astronaut sample).",
    )
    gui.add_argument("images", nargs="*", metavar="IMAGE", help="image files or folders (default: a sample)")

    commands.add_parser("info", help="show versions, devices, defaults and cache folders")
    return parser


def _load_vocabulary(args: argparse.Namespace):
    from napari_sclip.engine.vocabulary import parse_vocabulary_text, read_vocabulary_file

    if args.classes_file:
        return read_vocabulary_file(args.classes_file)
    return parse_vocabulary_text(args.classes, separator=";")


def _output_names(images: list[Path]) -> list[str]:
    """``<stem>.png`` per image; repeated stems get ``-2``, ``-3``, ..."""
    names, used = [], set()
    for image in images:
        name, k = f"{image.stem}.png", 1
        while name.lower() in used:
            k += 1
            name = f"{image.stem}-{k}.png"
        used.add(name.lower())
        names.append(name)
    return names


def _check_out_dir(out: Path, vocabulary, overwrite: bool) -> None:
    import json

    from napari_sclip.engine.errors import ParameterError

    legend = out / "classes.json"
    if out.exists() and not out.is_dir():
        raise ParameterError(f"--out {out} exists and is not a folder")
    if legend.is_file() and not overwrite:
        try:
            previous = [[c["name"], *c["synonyms"]] for c in json.loads(legend.read_text())["classes"][1:]]
        except (ValueError, KeyError, TypeError, OSError):
            raise ParameterError(f"{legend} is not a napari-sclip legend; choose another --out") from None
        if previous != [list(names) for names in vocabulary.classes]:
            raise ParameterError(
                f"{out} holds label maps for another vocabulary; choose another --out, or pass "
                "--overwrite to replace them"
            )


def _progress_postfix(bar, name: str):
    """A progress callback that shows the current stage of one image in the bar's postfix."""
    labels = {"download": "downloading weights", "load": "loading model", "text": "encoding classes",
              "windows": "windows", "resize": "labelling"}

    def show(step) -> None:
        if step.stage == "download":
            size = f" {step.done / 2**20:.0f}/{step.total / 2**20:.0f} MB" if step.total else ""
            bar.set_postfix_str(labels["download"] + size)
        else:
            bar.set_postfix_str(f"{name}: {labels.get(step.stage, step.stage)} {step.done}/{step.total}")

    return show


def _segment(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from napari_sclip.engine.errors import ImageError
    from napari_sclip.engine.segmenter import Segmenter
    from napari_sclip.io.images import find_images, read_image
    from napari_sclip.io.label_maps import write_classes_json, write_label_png

    vocabulary = _load_vocabulary(args)
    images = find_images(args.images)
    out = Path(args.out).expanduser()
    _check_out_dir(out, vocabulary, args.overwrite)
    segmenter = Segmenter(args.model, args.pretrained, args.device, batch_size=args.batch_size)
    options = {
        "short_side": args.short_side,
        "window": args.window,
        "stride": args.stride,
        "logit_scale": args.logit_scale,
        "prob_threshold": args.prob_threshold,
    }
    jobs = [(image, out / name) for image, name in zip(images, _output_names(images))]
    todo = [(image, target) for image, target in jobs if args.overwrite or not target.exists()]
    skipped = len(jobs) - len(todo)
    failures: list[str] = []

    bar = tqdm(total=len(todo), unit="image", disable=args.quiet, dynamic_ncols=True)
    try:
        for image_path, target in todo:
            bar.set_postfix_str(image_path.name)
            try:
                image = read_image(image_path)
                # Image problems are checked before the model loads, and only skip this image.
                show = _progress_postfix(bar, image_path.name)
                result = segmenter.segment(image, vocabulary, progress=show, **options)
            except ImageError as exc:
                failures.append(f"{image_path}: {exc}")
                bar.update(1)
                continue
            out.mkdir(parents=True, exist_ok=True)
            write_label_png(target, result.labels, len(vocabulary))
            write_classes_json(out / "classes.json", vocabulary.classes, result.params)
            bar.update(1)
    finally:
        bar.close()

    for failure in failures:
        print(f"napari-sclip: skipped {failure}", file=sys.stderr)
    done = len(todo) - len(failures)
    note = f", {skipped} already there (use --overwrite to redo)" if skipped else ""
    if not args.quiet:
        print(f"wrote {done} label map(s) to {out}{note}", file=sys.stderr)
    return EXIT_SOME_FAILED if failures else 0


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


def _gui(args: argparse.Namespace) -> int:
    import napari

    open_gui(args.images)
    napari.run()
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
    ]
    if torch.cuda.is_available():
        rows += [(f"cuda:{i}", torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    command = {"segment": _segment, "gui": _gui, "info": _info}[args.command]
    try:
        return command(args)
    except SclipError as exc:
        print(f"napari-sclip: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("napari-sclip: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if args.debug:
            raise
        message = " ".join(str(exc).split())[:300]
        print(
            f"napari-sclip: error: {type(exc).__name__}: {message} (run with --debug for details)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
