"""Reading samples back from a dataset folder (no napari)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_sclip.dataset import format as fmt
from napari_sclip.dataset.paths import DatasetError, resolve_inside
from napari_sclip.dataset.splits import SPLIT_NAMES
from napari_sclip.dataset.writer import IGNORED_BY_PERSON, PAINTED, read_meta


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
        document = json.loads(manifest.read_text(encoding="utf-8"))
        return root if document["format"]["name"] == fmt.FORMAT_NAME else None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.asarray(image)
    except FileNotFoundError:
        raise DatasetError(f"missing file {path}") from None
    except Exception as exc:
        raise DatasetError(f"cannot read {path}: {' '.join(str(exc).split())[:120]}") from None


def sample_ids(root: Path) -> list[tuple[str, str]]:
    """``(split, id)`` of every sample (those with a meta file), sorted."""
    found = []
    for split in SPLIT_NAMES:
        meta_dir = root / split / "meta"
        if meta_dir.is_dir():
            found += [(split, path.stem) for path in sorted(meta_dir.glob("*.json"))]
    return found


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
    if provenance.shape != labels.shape:
        raise DatasetError(f"{provenance_path} does not match the shape of its mask")
    return StoredSample(image_id, split, image, labels, confidence, edited, meta)


@dataclass
class StoredMask:
    """One sample's mask as stored (training ids), and where its image is."""

    id: str
    split: str
    image_path: Path
    mask: np.ndarray
    meta: dict[str, Any]


def stored_masks(root: Path) -> Iterator[StoredMask]:
    """Every sample's training-id mask, in (split, id) order, with checked paths."""
    for split, image_id in sample_ids(root):
        meta = read_meta(resolve_inside(root, f"{split}/meta/{image_id}.json"))
        image_path = resolve_inside(root, f"{split}/{meta['image']}")
        if not image_path.is_file():
            raise DatasetError(f"missing file {image_path}")
        mask = read_png(resolve_inside(root, f"{split}/{meta['mask']}"))
        if mask.ndim != 2:
            raise DatasetError(f"{root / split / meta['mask']} is not a single-channel mask")
        yield StoredMask(image_id, split, image_path, mask, meta)
