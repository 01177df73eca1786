"""Export a dataset as COCO JSON: one annotation per class per connected component, each a
compressed RLE made by pycocotools.

Images keep their dataset paths (``train/images/<id>.png``): point a COCO loader's image root at
the dataset folder.  Category ids are training id + 1 (COCO reserves 0); each category also
carries its ``train_id``.  Components are 8-connected.  Ignore pixels (255, or 65535 in 16-bit
masks) get no annotation; any other value that no class declares stops the export.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from napari_sclip import __version__
from napari_sclip._files import atomic_write_bytes, output_folder
from napari_sclip.dataset import format as fmt
from napari_sclip.dataset.paths import DatasetError, reporting_os_errors
from napari_sclip.dataset.reader import sample_ids, stored_mask

_EIGHT_CONNECTED = np.ones((3, 3), bool)


def mask_annotations(mask: np.ndarray, train_ids: Iterable[int]) -> Iterator[dict[str, Any]]:
    """COCO annotation fields (``category_id``, ``segmentation``, ``area``, ``bbox``) for every
    connected component of each of ``train_ids`` in ``mask``."""
    from pycocotools import mask as rle_codec
    from scipy import ndimage

    # One Fortran-ordered buffer per image: pycocotools encodes column-major data.
    component = np.zeros(mask.shape, dtype=np.uint8, order="F")
    for train_id in map(int, train_ids):  # Python ints compare at the mask's own dtype
        regions, _ = ndimage.label(mask == train_id, structure=_EIGHT_CONNECTED)
        for index, box in enumerate(ndimage.find_objects(regions), start=1):
            inside = regions[box] == index
            component[box] = inside
            rle = rle_codec.encode(component)
            component[box] = 0
            rle["counts"] = rle["counts"].decode("ascii")
            yield {
                "category_id": train_id + 1,
                "segmentation": rle,
                "area": int(rle_codec.area(rle)),
                "bbox": [float(v) for v in rle_codec.toBbox(rle)],
                "iscrowd": 0,
            }


def export_coco(
    root: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """Write the dataset at ``root`` as COCO JSON to ``out`` (atomically); returns counts of
    images, categories and annotations."""
    root, out = Path(root).expanduser(), Path(out).expanduser()
    manifest, registry, train_ids = fmt.read_manifest(root)
    if out.exists() and not overwrite:
        raise DatasetError(f"{out} exists; choose another file or pass --overwrite")
    if out.is_dir():
        raise DatasetError(f"{out} is a folder; give a .json file name")
    categories = [
        {"id": train_id + 1, "name": registry.display_name(uid), "supercategory": "", "train_id": train_id}
        for train_id, uid in enumerate(fmt.by_train_id(train_ids))
    ]
    ids = sample_ids(root)
    images, annotations = [], []
    for number, (split, image_id) in enumerate(ids, start=1):
        sample = stored_mask(root, split, image_id, train_ids)
        height, width = sample.mask.shape
        images.append({
            "id": number,
            "file_name": f"{sample.split}/{sample.meta['image']}",
            "height": height,
            "width": width,
            "split": sample.split,
            "sample_id": sample.id,
        })
        for annotation in mask_annotations(sample.mask, sample.present):
            annotations.append({"id": len(annotations) + 1, "image_id": number, **annotation})
        if progress:
            progress(number, len(ids))
    document = {
        "info": {
            "description": f"napari-sclip pseudo-labels from {root.name}",
            "version": str(manifest.get("vocabulary_version", 1)),
            "contributor": f"napari-sclip {__version__}",
            "date_created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    with reporting_os_errors(out), output_folder(out.parent):
        atomic_write_bytes(out, json.dumps(document, ensure_ascii=False).encode("utf-8"))
    return {"images": len(images), "categories": len(categories), "annotations": len(annotations)}
