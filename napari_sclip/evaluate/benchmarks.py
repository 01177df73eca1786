"""The eight benchmarks of SCLIP's Table 1: the authors' class names and settings, and where each
dataset keeps its images and labels.

Pairing follows mmsegmentation's ``BaseSegDataset``, which the authors evaluated with: with a
split file, each listed name ``N`` is ``<images>/N<image suffix>`` with ``<labels>/N<label
suffix>``; without one, every file under the images folder ending in the image suffix is paired
with the file at the same relative path under the labels folder, suffix swapped.  Nothing here
decodes an image, so listing COCO's 5,000 validation pairs takes a few directory scans.

Every error is one line that says which path was expected and what ``--data-root`` must be.
"""

from __future__ import annotations

import functools
import os
import posixpath
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

import numpy as np

from napari_sclip._files import files_under
from napari_sclip.engine.errors import ImageError, ParameterError, SclipError


class LayoutError(SclipError, ValueError):
    """A benchmark's or a folder's files are not where its layout puts them."""


@dataclass(frozen=True)
class Pair:
    """One evaluation sample: an image and its ground-truth label map."""

    #: The image's path relative to the images folder, without the image suffix, with "/"
    #: separators ("2007_000033", "frankfurt/frankfurt_000000_000294"): reports and
    #: ``--save-predictions`` name the sample by it.
    name: str
    image: Path
    label: Path


#: A window (and stride) larger than any resized image: the whole image in one pass, as NACLIP's
#: configs run VOC (``slide_crop=0``); the long side is at most 2048 after the resize.
WHOLE = 2048


@dataclass(frozen=True)
class Preset:
    """How one method's authors ran it on one benchmark: the resize's short side, the slide
    windows, the logit scale, the thresholds, and their class-name file (in
    ``napari_sclip/evaluate/names``).  ``source`` says which configuration it comes from."""

    short_side: int
    window: int
    stride: int
    logit_scale: float
    prob_threshold: float
    area_threshold: float | None
    names_file: str
    source: str


@dataclass(frozen=True)
class Benchmark:
    """One of SCLIP's Table 1 benchmarks: the authors' class names, settings and layout."""

    #: The CLI's name: "voc21", "voc20", "context60", "context59", "coco-object", "coco-stuff",
    #: "cityscapes" or "ade20k".
    name: str
    #: The name in reports, as in the paper's table ("VOC21", "COCO-Object", ...).
    title: str
    #: The authors' class-name file in ``napari_sclip/evaluate/names`` ("cls_voc21.txt").
    names_file: str
    #: The images and labels folders under the data root ("JPEGImages", "leftImg8bit/val").
    images: str
    labels: str
    #: The list of sample names, relative to the data root; ``None``: every image is a sample.
    split_file: str | None
    #: mmsegmentation's ``img_suffix`` and ``seg_map_suffix`` for the dataset class used.
    image_suffix: str
    label_suffix: str
    #: The resize's short side (``Resize(scale=(2048, short_side), keep_ratio=True)``).
    short_side: int
    logit_scale: float
    #: Below this winning probability a pixel becomes class 0 (0: never).
    prob_threshold: float
    #: The area threshold of VOC21's post-processing; ``None``: not applied.
    area_threshold: float | None
    #: Label 0 is "unlabelled" and the others move down by one (mmseg's ``reduce_zero_label``).
    reduce_zero_label: bool
    #: Classes scored; also the name file's line count.
    num_classes: int
    #: SCLIP's mIoU in Table 1 of the paper (ViT-B/16, no post-processing).
    paper_miou: float
    #: The mmsegmentation dataset class the authors' config names.
    mmseg_dataset: str = ""
    #: The folder ``--data-root`` usually is, in mmsegmentation's layout (for messages).
    root_example: str = ""
    #: How the label files are made when the download does not ship them (for messages).
    labels_from: str = ""

    def class_names(self, method: str = "sclip") -> list[str]:
        """The name file's lines (``method``'s authors' file), one class each with its synonyms
        after ", ", as the authors' code reads them: nothing stripped but the line break
        (Context60's last line is "wood ", whose space the tokenizer drops)."""
        return list(_name_lines(self.preset(method).names_file))

    def preset(self, method: str) -> Preset:
        """The settings ``method``'s authors ran it with on this benchmark (their repository's
        configs); SCLIP's for SCLIP and for MaskCLIP, whose authors give none."""
        found = _METHOD_PRESETS.get((method, self.name))
        if found is not None:
            return found
        return Preset(self.short_side, 224, 112, self.logit_scale, self.prob_threshold, self.area_threshold,
                      self.names_file, f"{_SCLIP_COMMIT} configs/{self.config}")

    @property
    def config(self) -> str:
        """The authors' config file of this benchmark ("cfg_voc21.py")."""
        return {"cityscapes": "cfg_city_scapes.py", "coco-stuff": "cfg_coco_stuff164k.py"}.get(
            self.name, f"cfg_{self.name.replace('-', '_')}.py")

    def pairs(self, data_root: str | Path) -> list[Pair]:
        """Every sample of the benchmark under ``data_root``, sorted by name.

        Raises :class:`LayoutError` (one line) if the data root, the images or labels folder or
        the split file is missing, no image is found, a split line leaves the images folder, or
        a listed image or any image's label is missing.
        """
        root = Path(data_root).expanduser()
        if not root.is_dir():
            what = "is not a folder" if root.exists() else "does not exist"
            raise LayoutError(
                f"{self.title}: the data root {_show(root)} {what}; {self._root_hint()}"
            )
        images = self._folder(root, self.images, "images")
        labels = self._folder(root, self.labels, "labels")
        listing = _Listing()
        if self.split_file is not None:
            names = sorted(self._split_names(root))
            missing = [n for n in names if not listing.has_file(images, n + self.image_suffix)]
            if missing:
                raise LayoutError(
                    f"{self.title}: {len(missing)} of the {len(names)} names in "
                    f"{self.split_file} have no image; the first is {_show(missing[0])}: expected "
                    f"{_show(images / (missing[0] + self.image_suffix))}"
                )
        else:
            names = sorted(_names_under(images, self.image_suffix))
            if not names:
                raise LayoutError(
                    f"{self.title}: no images ending in {self.image_suffix} under "
                    f"{_show(images)}; {self._root_hint()}"
                )
        missing = [n for n in names if not listing.has_file(labels, n + self.label_suffix)]
        if missing:
            expected = labels / (missing[0] + self.label_suffix)
            made = f" ({self.labels_from})" if self.labels_from else ""
            raise LayoutError(
                f"{self.title}: {len(missing)} of {len(names)} images have no label; the first is "
                f"{_show(missing[0])}: expected {_show(expected)}{made}"
            )
        return [
            Pair(n, images / (n + self.image_suffix), labels / (n + self.label_suffix))
            for n in names
        ]

    def _root_hint(self) -> str:
        holds = f"{self.images} and {self.labels}"
        example = f" (e.g. {self.root_example})" if self.root_example else ""
        return f"--data-root must be the folder holding {holds}{example}"

    def _folder(self, root: Path, relative: str, what: str) -> Path:
        folder = root / relative
        if not folder.is_dir():
            raise LayoutError(
                f"{self.title}: no {what} folder {_show(folder)}; {self._root_hint()}"
            )
        return folder

    def _split_names(self, root: Path) -> list[str]:
        """The split file's non-empty lines, stripped as mmseg strips them, each checked to stay
        inside the images folder: the file is data, and a line like "../../x" must not make us
        read (or, with --save-predictions, name files after) paths elsewhere."""
        assert self.split_file is not None
        path = root / self.split_file
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise LayoutError(
                f"{self.title}: no split file {_show(path)}; --data-root must be the folder "
                f"holding {self.split_file}"
                + (f" (e.g. {self.root_example})" if self.root_example else "")
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise LayoutError(
                f"{self.title}: cannot read split file {_show(path)}: {_reason(exc)}"
            ) from None
        names: list[str] = []
        seen: set[str] = set()
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line:
                continue
            problem = _unsafe(line)
            if problem:
                raise LayoutError(
                    f"{self.title}: line {number} of {_show(path)} is {ascii(line)}: {problem}; "
                    "a split file lists names relative to the images folder"
                )
            if line in seen:
                raise LayoutError(
                    f"{self.title}: {_show(path)} lists {ascii(line)} twice (line {number})"
                )
            seen.add(line)
            names.append(line)
        if not names:
            raise LayoutError(f"{self.title}: split file {_show(path)} lists no images")
        return names


#: SCLIP's Table 1, in the paper's column order.  Sources: the authors' configs/cfg_*.py and
#: custom_datasets.py (wangf3014/SCLIP), mmsegmentation's dataset classes for the suffixes of the
#: others, and /work/shared/benchmarks/README.md.
BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "voc21", "VOC21", "cls_voc21.txt", "JPEGImages", "SegmentationClass",
            "ImageSets/Segmentation/val.txt", ".jpg", ".png",
            336, 65.0, 0.1, 0.1, False, 21, 59.1,
            mmseg_dataset="PascalVOCDataset", root_example="VOCdevkit/VOC2012",
        ),
        Benchmark(
            "context60", "Context60", "cls_context60.txt", "JPEGImages", "SegmentationClassContext",
            "ImageSets/SegmentationContext/val.txt", ".jpg", ".png",
            336, 50.0, 0.1, None, False, 60, 30.4,
            mmseg_dataset="PascalContext60Dataset", root_example="VOCdevkit/VOC2010",
            labels_from="made by mmsegmentation's tools/dataset_converters/pascal_context.py",
        ),
        Benchmark(
            "coco-object", "COCO-Object", "cls_coco_object.txt",
            "images/val2017", "annotations/val2017",
            None, ".jpg", "_instanceTrainIds.png",
            336, 50.0, 0.1, None, False, 81, 30.5,
            mmseg_dataset="COCOObjectDataset", root_example="coco_stuff164k",
            labels_from="made from COCO-Stuff 164k by SCLIP's datasets/cvt_coco_object.py",
        ),
        Benchmark(
            "voc20", "VOC20", "cls_voc20.txt", "JPEGImages", "SegmentationClass",
            "ImageSets/Segmentation/val.txt", ".jpg", ".png",
            336, 40.0, 0.0, None, True, 20, 80.4,
            mmseg_dataset="PascalVOC20Dataset", root_example="VOCdevkit/VOC2012",
        ),
        Benchmark(
            "cityscapes", "Cityscapes", "cls_city_scapes.txt", "leftImg8bit/val", "gtFine/val",
            None, "_leftImg8bit.png", "_gtFine_labelTrainIds.png",
            560, 40.0, 0.0, None, False, 19, 32.2,
            mmseg_dataset="CityscapesDataset", root_example="cityscapes",
            labels_from="made by mmsegmentation's tools/dataset_converters/cityscapes.py",
        ),
        Benchmark(
            "context59", "Context59", "cls_context59.txt", "JPEGImages", "SegmentationClassContext",
            "ImageSets/SegmentationContext/val.txt", ".jpg", ".png",
            336, 40.0, 0.0, None, True, 59, 34.2,
            mmseg_dataset="PascalContext59Dataset", root_example="VOCdevkit/VOC2010",
            labels_from="made by mmsegmentation's tools/dataset_converters/pascal_context.py",
        ),
        Benchmark(
            "ade20k", "ADE20K", "cls_ade20k.txt", "images/validation", "annotations/validation",
            None, ".jpg", ".png",
            336, 40.0, 0.0, None, True, 150, 16.1,
            mmseg_dataset="ADE20KDataset", root_example="ade/ADEChallengeData2016",
        ),
        Benchmark(
            "coco-stuff", "COCO-Stuff", "cls_coco_stuff.txt",
            "images/val2017", "annotations/val2017",
            None, ".jpg", "_labelTrainIds.png",
            448, 40.0, 0.0, None, False, 171, 22.4,
            mmseg_dataset="COCOStuffDataset", root_example="coco_stuff164k",
            labels_from="made by mmsegmentation's tools/dataset_converters/coco_stuff164k.py",
        ),
    )
}


_SCLIP_COMMIT = "wangf3014/SCLIP@b56bd30"
_AUTHORS = {"naclip": "sinahmr/NACLIP@0cac3a6", "sc-clip": "SuleBai/SC-CLIP@0417ba9",
            "clearclip": "mc-lan/ClearCLIP@ad68a40"}
# method, benchmark: short side, window, stride, logit scale, prob. threshold, area threshold, name
# file, from the authors' configs/cfg_*.py at the commits above.  NACLIP runs VOC on the whole
# image; ClearCLIP uses its own VOC and COCO-Object name files ("background", "person",
# "tvmonitor") and, on Cityscapes, 224 px windows that do not overlap.
_TABLE = """
naclip     voc21        336 WHOLE WHOLE 40 0.1  -   cls_voc21.txt
naclip     context60    336 224   112   40 0.1  -   cls_context60.txt
naclip     coco-object  336 224   112   40 0.1  -   cls_coco_object.txt
naclip     voc20        336 WHOLE WHOLE 40 0    -   cls_voc20.txt
naclip     cityscapes   560 224   112   40 0    -   cls_city_scapes.txt
naclip     context59    336 224   112   40 0    -   cls_context59.txt
naclip     ade20k       336 224   112   40 0    -   cls_ade20k.txt
naclip     coco-stuff   336 224   112   40 0    -   cls_coco_stuff.txt
sc-clip    voc21        336 224   112   50 0.15 0.1 cls_voc21.txt
sc-clip    context60    336 224   112   40 0.15 -   cls_context60.txt
sc-clip    coco-object  336 224   112   55 0.35 -   cls_coco_object.txt
sc-clip    voc20        336 224   112   40 0    -   cls_voc20.txt
sc-clip    cityscapes   560 224   112   40 0    -   cls_city_scapes.txt
sc-clip    context59    336 224   112   40 0    -   cls_context59.txt
sc-clip    ade20k       336 224   112   40 0    -   cls_ade20k.txt
sc-clip    coco-stuff   336 224   112   40 0    -   cls_coco_stuff.txt
clearclip  voc21        448 448   224   50 0.5  -   clearclip/cls_voc21.txt
clearclip  context60    448 448   224   50 0.15 -   cls_context60.txt
clearclip  coco-object  448 448   224   50 0.4  -   clearclip/cls_coco_object.txt
clearclip  voc20        448 448   224   50 0    -   clearclip/cls_voc20.txt
clearclip  cityscapes   448 224   224   50 0    -   cls_city_scapes.txt
clearclip  context59    448 448   224   50 0    -   cls_context59.txt
clearclip  ade20k       448 448   224   50 0    -   cls_ade20k.txt
clearclip  coco-stuff   448 448   224   50 0    -   cls_coco_stuff.txt
"""


def _method_presets() -> dict[tuple[str, str], Preset]:
    presets = {}
    for line in _TABLE.strip().splitlines():
        method, name, short, window, stride, scale, prob, area, names = line.split()
        size = {"WHOLE": WHOLE}
        config = BENCHMARKS[name].config
        presets[method, name] = Preset(int(short), size.get(window) or int(window), size.get(stride) or int(stride),
                                       float(scale), float(prob), None if area == "-" else float(area), names,
                                       f"{_AUTHORS[method]} configs/{config}")
    return presets


_METHOD_PRESETS = _method_presets()


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called ``name`` (any case; "_" for "-" too); :class:`ParameterError` if
    there is none."""
    key = str(name).strip().lower().replace("_", "-")
    try:
        return BENCHMARKS[key]
    except KeyError:
        raise ParameterError(
            f"unknown benchmark {ascii(str(name))}; choose one of {', '.join(BENCHMARKS)}"
        ) from None


#: Extensions :func:`folder_pairs` takes as images (compared in lower case).
FOLDER_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


def folder_pairs(images: Path, masks: Path) -> list[Pair]:
    """Pairs for any folder of images with index-PNG masks: every image under ``images``
    (subfolders too) with ``masks/<its relative path without extension>.png``, sorted by name.

    Raises :class:`LayoutError` (one line) if a folder is missing, holds no image, two images
    would share a mask (``a.jpg`` and ``a.png``), or masks are missing.
    """
    images, masks = Path(images).expanduser(), Path(masks).expanduser()
    for folder, what in ((images, "images"), (masks, "masks")):
        if not folder.is_dir():
            state = "is not a folder" if folder.exists() else "does not exist"
            raise LayoutError(f"the {what} folder {_show(folder)} {state}")
    masks_real = os.path.realpath(masks)
    if os.path.realpath(images) == masks_real:
        raise LayoutError(
            f"{_show(images)} is both the images and the masks folder; keep masks apart"
        )
    by_name: dict[str, str] = {}
    for relative in files_under(images, masks_real, onerror=_walk_error):
        stem, extension = posixpath.splitext(relative)
        if extension.lower() not in FOLDER_IMAGE_SUFFIXES:
            continue
        if stem in by_name:
            first, second = sorted((by_name[stem], relative))
            raise LayoutError(
                f"{_show(images / first)} and {_show(images / second)} would share the mask "
                f"{_show(masks / (stem + '.png'))}; rename or remove one"
            )
        by_name[stem] = relative
    if not by_name:
        raise LayoutError(
            f"no images ({', '.join(FOLDER_IMAGE_SUFFIXES)}) under {_show(images)}"
        )
    listing = _Listing()
    missing = [n for n in sorted(by_name) if not listing.has_file(masks, n + ".png")]
    if missing:
        raise LayoutError(
            f"{len(missing)} of {len(by_name)} images have no mask; the first is "
            f"{_show(images / by_name[missing[0]])}: expected "
            f"{_show(masks / (missing[0] + '.png'))}"
        )
    return [Pair(n, images / by_name[n], masks / (n + ".png")) for n in sorted(by_name)]


#: Pillow modes whose pixels are class indices as stored.
_INDEX_MODES = ("P", "L", "1", "I", "I;16", "I;16L", "I;16B", "I;16N")


def read_label(path: Path) -> np.ndarray:
    """A label PNG's index values as a 2D ``uint8`` (palette, 8-bit grey, bilevel) or
    ``uint16`` (16-bit grey) array: a palette image gives its palette indices, not colours,
    which is how VOC's SegmentationClass files hold classes.

    Raises :class:`ImageError` (one line) for a missing or unreadable file and for a PNG that is
    not an index image (RGB, grey with alpha, ...).
    """
    from PIL import Image

    path = Path(path)
    try:
        # PNG only: Pillow picks a decoder from the content, and a label is never anything else.
        with Image.open(path, formats=("PNG",)) as image:
            mode = image.mode
            data = np.array(image) if mode in _INDEX_MODES else None
    except FileNotFoundError:
        raise ImageError(f"label not found: {_show(path)}") from None
    except Image.UnidentifiedImageError:
        raise ImageError(
            f"cannot read label {_show(path)}: not a PNG, or damaged; a label must be an index PNG"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot read label {_show(path)}: {_reason(exc)}") from None
    if data is None:
        raise ImageError(
            f"label {_show(path)} is a {mode} image; a label must be an index PNG "
            "(palette or 8/16-bit greyscale, one class index per pixel)"
        )
    if mode == "1":
        return data.astype(np.uint8)
    if mode == "I":  # 16-bit grey from older Pillows, held in int32
        if data.size and (data.min() < 0 or data.max() > 65535):
            raise ImageError(f"label {_show(path)} holds values outside 0-65535; not an index PNG")
        return data.astype(np.uint16)
    if mode.startswith("I;16"):
        return data.astype(np.uint16)  # also makes big-endian data native
    return data


# -- helpers ---------------------------------------------------------------------------------


@functools.cache
def _name_lines(names_file: str) -> tuple[str, ...]:
    text = resources.files(__package__).joinpath("names", names_file).read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":  # a final newline ends the last line, it does not add one
        lines.pop()
    return tuple(lines)


def _show(path: str | Path) -> str:
    """A path for a one-line message: as is, or escaped if it holds a line break or the like."""
    text = os.fspath(path)
    return text if text.isprintable() else ascii(text)


def _reason(exc: BaseException) -> str:
    """What went wrong, in one line: an OS error's description (lower case, as it follows a
    colon), else the first line of the exception's message."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _unsafe(line: str) -> str:
    """Why a split-file line is not a plain relative name ("" if it is)."""
    if not line.isprintable() or "\\" in line:
        return "control characters and backslashes are not allowed"
    if PurePosixPath(line).is_absolute() or (len(line) > 1 and line[1] == ":"):
        return "an absolute path"
    parts = line.split("/")
    if ".." in parts:
        return "'..' leads outside the images folder"
    if any(part in ("", ".") for part in parts):
        return "'.' and empty parts are not allowed"
    return ""


def _walk_error(exc: OSError) -> None:
    raise LayoutError(f"cannot list {_show(exc.filename or '?')}: {_reason(exc)}")


def _names_under(folder: Path, suffix: str) -> list[str]:
    """Sample names of the files under ``folder`` ending in ``suffix`` (suffix removed)."""
    names = []
    for relative in files_under(folder, onerror=_walk_error):
        if relative.endswith(suffix):
            name = relative[: -len(suffix)]
            if name and not name.endswith("/"):
                names.append(name)
    return names


class _Listing:
    """Which files each folder holds, one directory scan per folder: a stat per label would be
    thousands of round trips on a network file system."""

    def __init__(self) -> None:
        self._files: dict[str, frozenset[str]] = {}

    def has_file(self, base: Path, relative: str) -> bool:
        """Whether ``base/relative`` ("/"-separated) is a file, or a link to one."""
        folder, _, name = relative.rpartition("/")
        key = os.path.join(base, folder) if folder else os.fspath(base)
        files = self._files.get(key)
        if files is None:
            try:
                with os.scandir(key) as entries:
                    files = frozenset(e.name for e in entries if e.is_file())
            except (FileNotFoundError, NotADirectoryError):
                files = frozenset()
            except OSError as exc:
                raise LayoutError(f"cannot list {_show(key)}: {_reason(exc)}") from None
            self._files[key] = files
        return name in files
