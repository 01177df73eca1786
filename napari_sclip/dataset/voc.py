"""Export a dataset in the Pascal VOC segmentation layout that CVAT ("Segmentation mask 1.1"),
Datumaro (``voc_segmentation``) and torchvision's ``VOCSegmentation`` read:

```
OUT/
  labelmap.txt                          # background first, then the classes in training-id order
  ImageSets/Segmentation/<split>.txt    # the sample ids of each split, each id in one list only
  JPEGImages/<id>.jpg or <id>.png       # JPEGs copied as they are; other images stay PNG
  SegmentationClass/<id>.png            # palette PNG: index 0 background, training id t -> t + 1
```

* Datumaro and CVAT read every list in ``ImageSets/Segmentation`` as a subset, so there is no
  ``default.txt`` or ``trainval.txt`` that would list images a second time.
* Unlabelled/ignore pixels become index 0 (background), as CVAT has no ignore label; a mask value
  that no class declares stops the export (see :func:`napari_sclip.dataset.reader.stored_mask`).
* Palette colours are the classes' napari colours, so masks look the same in CVAT as in napari;
  CVAT and Datumaro tell classes apart by colour, so a colour two classes share is nudged.
* Images: JPEGs keep their bytes and are named ``<id>.jpg``, the name torchvision opens.  Others
  stay PNG (re-encoding as JPEG would lose detail and every 16-bit value).  An image whose EXIF
  orientation turns it is stored as a PNG of the turned pixels, the frame its mask is in, since
  Datumaro and torchvision ignore EXIF.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from napari_sclip._files import atomic_copy, atomic_write, atomic_write_bytes, output_folder
from napari_sclip.colors import label_color
from napari_sclip.dataset import format as fmt
from napari_sclip.dataset.paths import DatasetError, reporting_os_errors, resolve_inside
from napari_sclip.dataset.reader import StoredMask, sample_ids, stored_mask
from napari_sclip.dataset.splits import SPLIT_NAMES

#: The most classes a palette PNG holds beside background.
MAX_CLASSES = 254
_LAYOUT = ("labelmap.txt", "SegmentationClass")
#: Image names an export may have written for a sample (this version, or an earlier one).
_IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")


def _check_out(out: Path) -> None:
    """``out`` must be new, empty, or an earlier export (which is updated)."""
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not all((out / name).exists() for name in _LAYOUT):
        raise DatasetError(f"{out} is not empty and not a VOC export; choose a new or empty folder")
    # An export is written, and its stale files deleted, only in real folders of its own.
    for relative in ("labelmap.txt", "SegmentationClass", "JPEGImages", "ImageSets", "ImageSets/Segmentation"):
        resolve_inside(out, relative)


def voc_palette_png(indices: np.ndarray, colors: list[tuple[int, int, int]]) -> bytes:
    """An 8-bit palette PNG of ``indices`` with ``colors[i]`` for index ``i``."""
    from PIL import Image

    image = Image.fromarray(indices.astype(np.uint8), mode="P")
    image.putpalette([channel for color in colors for channel in color])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def distinct_colors(colors: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """``colors`` with each repeat moved (blue + 1, + 2, ...) to a colour not used before it."""
    used: set[tuple[int, int, int]] = set()
    result = []
    for r, g, b in colors:
        color, step = (r, g, b), 0
        while color in used:
            step += 1
            color = (r, g, (b + step) % 256)
        used.add(color)
        result.append(color)
    return result


def _free_name(wanted: str, taken: list[str]) -> str:
    """``wanted``, or it with leading underscores until no name in ``taken`` equals it (any case)."""
    folded = {name.casefold() for name in taken}
    while wanted.casefold() in folded:
        wanted = f"_{wanted}"
    return wanted


def _write_image(sample: StoredMask, folder: Path) -> None:
    """The sample's image as ``folder/<id>.jpg`` (a JPEG's own bytes) or ``<id>.png``; the file
    an earlier export wrote under another name goes."""
    turned = sample.orientation != 1
    suffix = ".jpg" if sample.image_format == "JPEG" and not turned else ".png"
    target = folder / f"{sample.id}{suffix}"
    if turned:  # the pixels as shown, which is what read_image gives and masks are made on
        from napari_sclip.dataset.writer import _encode_png, storable_image
        from napari_sclip.io.images import read_image

        atomic_write(target, partial(_encode_png, storable_image(read_image(sample.image_path))))
    else:
        atomic_copy(sample.image_path, target)
    for other in _IMAGE_SUFFIXES:
        if other != suffix:
            (folder / f"{sample.id}{other}").unlink(missing_ok=True)


def export_voc(
    root: str | Path, out: str | Path, *, progress: Callable[[int, int], None] | None = None
) -> dict[str, int]:
    """Write the dataset at ``root`` in VOC/CVAT layout into ``out``; returns images per split."""
    root, out = Path(root).expanduser(), Path(out).expanduser()
    _, registry, train_ids = fmt.read_manifest(root)
    if len(train_ids) > MAX_CLASSES:
        raise DatasetError(f"VOC palette masks hold at most {MAX_CLASSES} classes; this dataset has {len(train_ids)}")
    _check_out(out)
    ordered = fmt.by_train_id(train_ids)
    names = [registry.display_name(uid) for uid in ordered]
    colors = distinct_colors([(0, 0, 0), *(label_color(uid) for uid in ordered)])

    # Training id t -> palette index t + 1; ignore (255, or 65535 in 16-bit masks) -> 0.
    table = np.zeros(np.iinfo(np.uint16).max + 1, np.uint8)
    table[: len(ordered)] = np.arange(1, len(ordered) + 1)

    lists = out / "ImageSets" / "Segmentation"
    with reporting_os_errors(out), output_folder(out):
        for folder in (lists, out / "JPEGImages", out / "SegmentationClass"):
            folder.mkdir(parents=True, exist_ok=True)
        labelmap = fmt.labelmap_text(zip([_free_name("background", names), *names], colors))
        atomic_write_bytes(out / "labelmap.txt", labelmap.encode("utf-8"))

        ids = sample_ids(root)
        splits: dict[str, list[str]] = {}
        for number, (split, image_id) in enumerate(ids, start=1):
            sample = stored_mask(root, split, image_id, train_ids)
            indices = table[sample.mask]
            atomic_write_bytes(out / "SegmentationClass" / f"{sample.id}.png", voc_palette_png(indices, colors))
            _write_image(sample, out / "JPEGImages")
            splits.setdefault(sample.split, []).append(sample.id)
            if progress:
                progress(number, len(ids))
        for split in (*SPLIT_NAMES, "default"):  # "default": the list of all that older exports wrote
            if split in splits:
                text = "".join(f"{image_id}\n" for image_id in splits[split])
                atomic_write_bytes(lists / f"{split}.txt", text.encode("utf-8"))
            else:
                (lists / f"{split}.txt").unlink(missing_ok=True)
    return {split: len(ids) for split, ids in splits.items()}
