"""Export a dataset in the Pascal VOC segmentation layout that CVAT ("Segmentation mask 1.1")
and Datumaro import:

```
OUT/
  labelmap.txt                          # background first, then the classes in training-id order
  ImageSets/Segmentation/<split>.txt    # sample ids per split, and default.txt with all of them
  JPEGImages/<id>.<ext>                 # the dataset's images, copied as they are
  SegmentationClass/<id>.png            # palette PNG: index 0 background, training id t -> t + 1
```

Unlabelled/ignore pixels become index 0 (background), as CVAT has no ignore label.  Palette
colours are the classes' napari colours, so masks look the same in CVAT as in napari.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from napari_sclip._files import atomic_copy, atomic_write_bytes, output_folder
from napari_sclip.colors import label_color
from napari_sclip.dataset import format as fmt
from napari_sclip.dataset.paths import DatasetError, reporting_os_errors
from napari_sclip.dataset.reader import stored_masks

#: The most classes a palette PNG holds beside background.
MAX_CLASSES = 254
_LAYOUT = ("labelmap.txt", "SegmentationClass")


def _check_out(out: Path) -> None:
    """``out`` must be new, empty, or an earlier export (which is updated)."""
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not all((out / name).exists() for name in _LAYOUT):
        raise DatasetError(f"{out} is not empty and not a VOC export; choose a new or empty folder")


def voc_palette_png(indices: np.ndarray, colors: list[tuple[int, int, int]]) -> bytes:
    """An 8-bit palette PNG of ``indices`` with ``colors[i]`` for index ``i``."""
    import io

    from PIL import Image

    image = Image.fromarray(indices.astype(np.uint8), mode="P")
    image.putpalette([channel for color in colors for channel in color])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


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
    background = "background" if "background" not in {n.casefold() for n in names} else "unlabelled"
    colors = [(0, 0, 0), *(label_color(uid) for uid in ordered)]

    # Training id t -> palette index t + 1; ignore (and anything unknown) -> 0.
    table = np.zeros(np.iinfo(np.uint16).max + 1, np.uint8)
    table[: len(ordered)] = np.arange(1, len(ordered) + 1)

    with reporting_os_errors(out), output_folder(out):
        for folder in ("ImageSets/Segmentation", "JPEGImages", "SegmentationClass"):
            (out / folder).mkdir(parents=True, exist_ok=True)
        labelmap = fmt.labelmap_text(zip([background, *names], colors))
        atomic_write_bytes(out / "labelmap.txt", labelmap.encode("utf-8"))

        samples = list(stored_masks(root))
        splits: dict[str, list[str]] = {}
        for number, sample in enumerate(samples, start=1):
            indices = table[sample.mask]
            atomic_write_bytes(out / "SegmentationClass" / f"{sample.id}.png", voc_palette_png(indices, colors))
            image_target = out / "JPEGImages" / f"{sample.id}{sample.image_path.suffix}"
            atomic_copy(sample.image_path, image_target)
            splits.setdefault(sample.split, []).append(sample.id)
            if progress:
                progress(number, len(samples))
        for split, ids in {**splits, "default": [i for ids in splits.values() for i in ids]}.items():
            text = "".join(f"{image_id}\n" for image_id in ids)
            atomic_write_bytes(out / "ImageSets" / "Segmentation" / f"{split}.txt", text.encode("utf-8"))
    return {split: len(ids) for split, ids in splits.items()}

