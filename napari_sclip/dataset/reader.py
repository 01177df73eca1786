"""Reading samples back from a dataset folder (no napari)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_sclip.dataset import format as fmt
from napari_sclip.dataset.paths import DatasetError, read_json, resolve_inside
from napari_sclip.dataset.splits import SPLIT_NAMES
from napari_sclip.dataset.writer import IGNORED_BY_PERSON, PAINTED, meta_ids, read_meta
from napari_sclip.io.images import orientation_of


@dataclass
class StoredSample:
    """One sample as stored: the image, napari label values (uids), and what else is known."""

    id: str
    split: str
    image: np.ndarray
    labels: np.ndarray
    confidence: np.ndarray | None
    edited: np.ndarray
    meta: dict[str, Any]


def find_dataset_root(path: str | Path) -> Path | None:
    """The dataset folder if ``path`` is one or is its manifest (``dataset.json`` naming this
    format); ``None`` otherwise.  Reads only the manifest's format name, so it is cheap enough for
    napari to call on every ``dataset.json`` a user opens."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    manifest = root / fmt.MANIFEST
    if path not in (root, manifest) or not manifest.is_file():
        return None
    try:
        return root if read_json(manifest)["format"]["name"] == fmt.FORMAT_NAME else None
    except (OSError, DatasetError, KeyError, TypeError):
        return None


def read_png(path: Path) -> np.ndarray:
    return _with_image(path, np.asarray)


def _with_image(path: Path, use):
    """``use(image)`` on the image file at ``path``; a missing or unreadable file is one
    :class:`DatasetError` naming it."""
    from PIL import Image

    from napari_sclip.io.images import pillow_formats

    try:
        with Image.open(path, formats=pillow_formats()) as image:
            return use(image)
    except FileNotFoundError:
        raise DatasetError(f"missing file {path}") from None
    except Exception as exc:
        raise DatasetError(f"cannot read {path}: {' '.join(str(exc).split())[:120]}") from None


def sample_ids(root: Path) -> list[tuple[str, str]]:
    """``(split, id)`` of every sample (those with a meta file), sorted."""
    return [(split, image_id) for split in SPLIT_NAMES for image_id in meta_ids(root, split)]


def read_sample(root: Path, split: str, image_id: str, train_ids: fmt.TrainIds) -> StoredSample:
    """Load one sample; masks come back as napari label values through the manifest's classes."""
    from napari_sclip.io.images import read_image

    meta_path = resolve_inside(root, f"{split}/meta/{image_id}.json")
    meta = read_meta(meta_path)
    image_name, mask_name = meta["image"], meta["mask"]
    image = read_image(resolve_inside(root, f"{split}/{image_name}"))
    mask = read_png(resolve_inside(root, f"{split}/{mask_name}"))
    labels = fmt.mask_to_labels(mask, train_ids)
    confidence_path = resolve_inside(root, f"{split}/confidence/{image_id}.png")
    confidence = read_png(confidence_path).astype(np.float32) / 255 if confidence_path.is_file() else None
    provenance_path = resolve_inside(root, f"{split}/provenance/{image_id}.png")
    provenance = read_png(provenance_path) if provenance_path.is_file() else np.zeros(labels.shape, np.uint8)
    edited = np.isin(provenance, (PAINTED, IGNORED_BY_PERSON))
    for path, shape in ((provenance_path, provenance.shape), (confidence_path, np.shape(confidence)),
                        (meta_path.parent.parent / image_name, image.shape[:2])):
        if shape and tuple(shape[:2]) != labels.shape:
            raise DatasetError(f"{path} does not match the shape of its mask")
    return StoredSample(image_id, split, image, labels, confidence, edited, meta)


@dataclass
class StoredMask:
    """One sample's mask as stored (training ids, checked), and where its image is."""

    id: str
    split: str
    image_path: Path
    mask: np.ndarray
    present: np.ndarray  # the training ids that occur in ``mask``, ascending (ignore excluded)
    meta: dict[str, Any]
    image_format: str  # Pillow's name for the image file's format: "PNG", "JPEG", ...
    orientation: int  # the image's EXIF orientation: 1 (or none) = shown as stored


def stored_mask(root: Path, split: str, image_id: str, train_ids: fmt.TrainIds) -> StoredMask:
    """One sample's training-id mask, for exporters: a mask that is not a single-channel 8- or
    16-bit image of its image's size, or that holds a value which is neither a training id nor
    its dtype's ignore value, is a :class:`DatasetError` naming the file, never exported wrong."""
    meta = read_meta(resolve_inside(root, f"{split}/meta/{image_id}.json"))
    image_path = resolve_inside(root, f"{split}/{meta['image']}")
    mask_path = resolve_inside(root, f"{split}/{meta['mask']}")
    mask = read_png(mask_path)
    if mask.ndim != 2 or mask.dtype not in (np.uint8, np.uint16):
        raise DatasetError(f"{mask_path} is not a single-channel 8- or 16-bit mask ({mask.dtype}, shape {mask.shape})")
    (height, width), image_format, orientation = _with_image(image_path, _header)
    if mask.shape != (height, width):
        raise DatasetError(f"{mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} is {width}x{height}")
    occurs = np.zeros(np.iinfo(mask.dtype).max + 1, bool)
    occurs[mask] = True  # which values occur, without a full-size temporary
    ignore = fmt.ignore_value(mask.dtype)
    occurs[ignore] = False
    undeclared = np.flatnonzero(occurs[len(train_ids) :]) + len(train_ids)
    if undeclared.size:
        listed = ", ".join(map(str, undeclared[:5])) + (", ..." if undeclared.size > 5 else "")
        raise DatasetError(
            f"{mask_path} holds mask value(s) {listed} that no class declares "
            f"(training ids 0-{len(train_ids) - 1}, {ignore} = ignore); fix them, e.g. open the dataset in napari "
            "(they show as unlabelled) and export it again"
        )
    return StoredMask(image_id, split, image_path, mask, np.flatnonzero(occurs), meta, image_format, orientation)


def _header(image) -> tuple[tuple[int, int], str, int]:
    """A Pillow image's ``(height, width)`` as shown, i.e. after its EXIF orientation (the frame
    Hugging Face, MMSegmentation and Detectron2 read images in, so masks must match it), its
    format and its orientation."""
    width, height = image.size
    orientation = orientation_of(image)
    shape = (width, height) if orientation in (5, 6, 7, 8) else (height, width)
    return shape, image.format, orientation
