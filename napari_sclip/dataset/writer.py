"""Writing samples into a dataset folder, one image at a time, so that a kill at any moment
leaves a valid dataset.

A new dataset's manifest is written first.  Each sample's files are written to temporary names and
renamed into place, its ``meta/<id>.json`` last: a sample exists once its meta file does.  The per-split
``metadata.jsonl`` index (what Hugging Face's imagefolder reads) is rebuilt from the meta files,
atomically, by :meth:`DatasetWriter.rebuild_index`; after a kill it may lag behind by the samples
written since, and the next run rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from napari_sclip._files import atomic_copy, atomic_write_bytes
from napari_sclip.classes import ClassRegistry
from napari_sclip.dataset import format as fmt
from napari_sclip.dataset.paths import DatasetError, resolve_inside
from napari_sclip.dataset.splits import DEFAULT_RATIOS, SPLIT_NAMES, assign_split, check_ratios

#: Provenance mask values.
MODEL, PAINTED, IGNORED_BY_PERSON = 0, 1, 2
_FOLDERS = ("images", "masks", "confidence", "provenance", "meta")
#: Source files in these formats are copied byte for byte; others are stored as PNG.
COPIED_SUFFIXES = (".png", ".jpg", ".jpeg")
#: Per-image facts that say how labels were made (their distinct combinations are the manifest's
#: ``models``): the model and weights, the method and its parameters.
_MODEL_KEYS = (
    "model", "pretrained", "method", "short_side", "window", "stride", "logit_scale", "prob_threshold",
    "pamr", "pamr_iterations", "pamr_dilations",
)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def storable_image(image: np.ndarray) -> np.ndarray:
    """The image as Pillow writes it to PNG and trainers read it back: 8-bit grayscale, RGB and
    RGBA and 16-bit grayscale as they are; anything else (float, 16-bit colour, 2 channels, ...)
    through the engine's 8-bit rule."""
    image = np.asarray(image)
    if image.dtype == np.uint8 and (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
        return image
    if image.dtype == np.uint16 and image.ndim == 2:
        return image
    from napari_sclip.engine.image import to_rgb_uint8

    return to_rgb_uint8(image)


def read_meta(path: Path) -> dict[str, Any]:
    """A sample's ``meta/<id>.json``, checked for the keys every sample has."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if not all(isinstance(meta.get(key), str) for key in ("id", "image", "mask")):
            raise KeyError("id, image and mask")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None
    except KeyError as exc:
        raise DatasetError(f"{path} lacks {exc.args[0]}") from None
    return meta


def is_edited(meta: dict[str, Any]) -> bool:
    """Whether a person touched a stored sample (painted, set pixels to ignore, or reviewed it)."""
    edits = meta.get("edits") or {}
    return bool(edits.get("painted_pixels") or edits.get("ignored_pixels")) or meta.get(
        "review_status", "unreviewed"
    ) != "unreviewed"


def _png_bytes(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Sample:
    """One image and its labels, ready to be written.

    Attributes
    ----------
    stem
        The wanted id (usually the source file's stem); made unique by the writer.
    labels
        (H, W) napari label values (class uids; 0 = unlabelled).
    image
        The image as an array; written as PNG (see :func:`storable_image`) unless ``source`` is a
        PNG or JPEG file.
    source
        The original image file: recorded with its SHA-256, and copied as is (same bytes) when it
        is a PNG or JPEG.
    source_sha256
        The source file's SHA-256, if already known (saves reading it again).
    confidence
        (H, W) winning probabilities in [0, 1], stored as ``round(255 p)``.
    edited
        (H, W) bool: pixels a person changed (provenance 1, or 2 where they set 0).
    meta
        Per-image facts carried into ``meta/<id>.json``: model, weights, method and parameters,
        and for a sample read back from a dataset its stored ``source``, ``created``,
        ``review_status`` and ``vocabulary_version`` (kept as they are).
    """

    stem: str
    labels: np.ndarray
    image: np.ndarray | None = None
    source: Path | None = None
    source_sha256: str | None = None
    confidence: np.ndarray | None = None
    edited: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class DatasetWriter:
    """Creates or updates a dataset folder.

    Parameters
    ----------
    root
        The dataset folder.  It is created if missing; an existing folder must be empty or hold a
        napari-sclip dataset (anything else is refused, never written into).
    registry
        The classes; merged into an existing dataset's (uids are never reused, and classes keep
        their training ids: those of new classes come after the existing ones).
    ratios
        Split ratios for new datasets; an existing dataset keeps its own.

    One writer at a time per dataset: opening one removes the temporary files that a killed
    writer left behind.

    The vocabulary version (recorded in the manifest and with every sample written) is 1 for a new
    dataset, and goes up by one when ``registry``'s current vocabulary differs from the dataset's.
    """

    def __init__(self, root: str | Path, registry: ClassRegistry, ratios: dict[str, float] | None = None):
        self.root = Path(root).expanduser()
        self.previous: dict[str, Any] | None = None
        train_ids: fmt.TrainIds = {}
        existing_active: list[tuple[str, ...]] = []
        if self.root.exists() and not self.root.is_dir():
            raise DatasetError(f"{self.root} exists and is not a folder")
        if (self.root / fmt.MANIFEST).exists():
            self.previous, existing, train_ids = fmt.read_manifest(self.root)
            ratios = self.previous["splits"]["ratios"]
            existing_active = [existing.names[uid] for uid in existing.active]
            for uid, names in existing.names.items():
                if uid in registry.names and registry.names[uid][0].casefold() != names[0].casefold():
                    raise DatasetError(
                        f"class {uid} is {names[0]!r} in {self.root / fmt.MANIFEST} but {registry.names[uid][0]!r} here"
                    )
                registry.names.setdefault(uid, names)
        elif self.root.exists() and any(self.root.iterdir()):
            raise DatasetError(f"{self.root} is not empty and not a napari-sclip dataset; choose a new or empty folder")
        self.vocabulary_version = _vocabulary_version(self.previous, existing_active, registry)
        self.registry = registry
        self.train_ids = fmt.extend_train_ids(train_ids, registry)
        self.ratios = check_ratios(ratios or DEFAULT_RATIOS)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatasetError(f"cannot create dataset folder {self.root}: {exc.strerror or exc}") from None
        if self.previous is None:
            # The manifest comes first: from now on the folder is a dataset, whatever stops us.
            self.previous = fmt.build_manifest(registry, self.train_ids, self.ratios, [], self.vocabulary_version)
            fmt.write_manifest(self.root, self.previous)
        self._remove_stale_temporaries()

    def _remove_stale_temporaries(self) -> None:
        """Delete the hidden temporary files a killed writer left (``.<name>.<random>.tmp``)."""
        for folder in [self.root] + [self.root / split / sub for split in SPLIT_NAMES for sub in ("", *_FOLDERS)]:
            for leftover in folder.glob(".*.tmp") if folder.is_dir() else ():
                leftover.unlink(missing_ok=True)

    # -- ids ---------------------------------------------------------------------------------------

    def existing_meta(self, image_id: str) -> tuple[str, dict] | None:
        """``(split, meta)`` of a sample already in the dataset, if any."""
        for split in SPLIT_NAMES:
            path = self.root / split / "meta" / f"{image_id}.json"
            if path.is_file():
                return split, read_meta(path)
        return None

    def samples_by_source(self) -> dict[str, dict[tuple[int, ...] | None, dict]]:
        """``sha256 -> {slice index or None: meta}`` of every stored sample that came from a
        file (a 2D image has one entry, ``None``; a stack one per 2D slice)."""
        found: dict[str, dict[tuple[int, ...] | None, dict]] = {}
        for split in SPLIT_NAMES:
            for path in sorted((self.root / split / "meta").glob("*.json")):
                meta = read_meta(path)
                sha = (meta.get("source") or {}).get("sha256")
                if sha:
                    index = tuple(meta["slice"]) if meta.get("slice") is not None else None
                    found.setdefault(sha, {})[index] = meta
        return found

    def image_id(self, stem: str, source_sha256: str | None) -> str:
        """A unique id for ``stem``: the stem itself, unless another image already has it; then
        the stem plus the start of the image's SHA-256."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem).strip(".") or "image"
        found = self.existing_meta(safe)
        if found is None or source_sha256 is None or found[1].get("source", {}).get("sha256") == source_sha256:
            return safe
        return f"{safe}-{source_sha256[:8]}"

    # -- writing -----------------------------------------------------------------------------------

    def write(self, sample: Sample) -> str:
        """Write one sample (atomically, file by file); returns its id."""
        labels = np.asarray(sample.labels)
        if labels.ndim != 2:
            raise DatasetError(f"labels of {sample.stem!r} must be 2D, got shape {labels.shape}")
        carried = dict(sample.meta)
        source_sha = sample.source_sha256 or (sha256_of(sample.source) if sample.source is not None else None)
        source = carried.pop("source", None) or {
            "path": str(sample.source) if sample.source is not None else None,
            "sha256": source_sha,
            "shape": list(np.shape(sample.image) if sample.image is not None else labels.shape),
            "dtype": str(np.asarray(sample.image).dtype) if sample.image is not None else "file",
        }
        image_id = self.image_id(sample.stem, source.get("sha256"))
        previous = self.existing_meta(image_id)
        split = previous[0] if previous else assign_split(image_id, self.ratios)
        for folder in _FOLDERS:
            resolve_inside(self.root, f"{split}/{folder}").mkdir(parents=True, exist_ok=True)

        if sample.source is not None and sample.source.suffix.lower() in COPIED_SUFFIXES:
            image_name = f"images/{image_id}{sample.source.suffix.lower()}"
            atomic_copy(sample.source, resolve_inside(self.root, f"{split}/{image_name}"))
        elif sample.image is not None:
            image_name = f"images/{image_id}.png"
            self._write_png(f"{split}/{image_name}", storable_image(sample.image))
        else:
            raise DatasetError(f"sample {sample.stem!r} needs its image as an array, or a PNG or JPEG file")

        mask = fmt.labels_to_mask(labels, self.train_ids)
        self._write_png(f"{split}/masks/{image_id}.png", mask)
        if sample.confidence is not None:
            levels = np.rint(np.clip(np.asarray(sample.confidence, np.float32), 0, 1) * 255).astype(np.uint8)
            self._write_png(f"{split}/confidence/{image_id}.png", levels)
        edited = np.zeros(labels.shape, bool) if sample.edited is None else np.asarray(sample.edited, bool)
        provenance = np.where(edited, np.where(labels == 0, IGNORED_BY_PERSON, PAINTED), MODEL).astype(np.uint8)
        self._write_png(f"{split}/provenance/{image_id}.png", provenance)

        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        meta = {
            "id": image_id,
            "split": split,
            "image": image_name,
            "mask": f"masks/{image_id}.png",
            "source": source,
            "created": carried.pop("created", now),
            "updated": now,
            "edits": {
                "painted_pixels": int((provenance == PAINTED).sum()),
                "ignored_pixels": int((provenance == IGNORED_BY_PERSON).sum()),
            },
            "review_status": _review_status(carried.get("review_status"), bool(edited.any())),
            "vocabulary_version": carried.get("vocabulary_version", self.vocabulary_version),
        }
        meta.update((key, value) for key, value in carried.items() if key not in meta)
        text = json.dumps(meta, indent=2, ensure_ascii=False, default=str) + "\n"
        atomic_write_bytes(resolve_inside(self.root, f"{split}/meta/{image_id}.json"), text.encode("utf-8"))
        if previous and previous[1].get("image") != image_name:  # e.g. .jpg before, .png now
            resolve_inside(self.root, f"{split}/{previous[1]['image']}").unlink(missing_ok=True)
        return image_id

    def _write_png(self, relative: str, array: np.ndarray) -> None:
        encoded = _png_bytes(array)  # encode first: a failure leaves nothing behind
        atomic_write_bytes(resolve_inside(self.root, relative), encoded)

    def rebuild_index(self) -> dict[str, int]:
        """Rewrite the class files, every split's ``metadata.jsonl`` and ``dataset.json`` from the
        samples on disk; returns the number of samples per split."""
        counts, models = {}, []
        for split in SPLIT_NAMES:
            meta_dir = self.root / split / "meta"
            if not meta_dir.is_dir():
                continue
            rows = []
            for path in sorted(meta_dir.glob("*.json")):
                meta = read_meta(path)
                row = {"file_name": meta["image"], "label_file_name": meta["mask"], "id": meta["id"]}
                for name in (row["file_name"], row["label_file_name"]):
                    if not resolve_inside(self.root / split, name).is_file():
                        raise DatasetError(f"{path} names {name}, which is missing")
                row["review_status"] = meta.get("review_status", "unreviewed")
                rows.append(row)
                model = {key: meta[key] for key in _MODEL_KEYS if key in meta}
                if model and model not in models:
                    models.append(model)
            text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            atomic_write_bytes(self.root / split / "metadata.jsonl", text.encode("utf-8"))
            counts[split] = len(rows)
        fmt.write_class_files(self.root, self.registry, self.train_ids)
        manifest = fmt.build_manifest(
            self.registry, self.train_ids, self.ratios, models, self.vocabulary_version, self.previous
        )
        manifest["splits"]["counts"] = counts
        fmt.write_manifest(self.root, manifest)
        self.previous = manifest
        return counts



def _review_status(carried: str | None, edited: bool) -> str:
    """``reviewed`` (a person checked the whole image) stays; otherwise ``edited`` when a person
    changed pixels, else ``unreviewed``."""
    if carried == "reviewed":
        return "reviewed"
    return "edited" if edited else "unreviewed"


def _vocabulary_version(
    previous: dict[str, Any] | None, previous_active: list[tuple[str, ...]], registry: ClassRegistry
) -> int:
    if previous is None:
        return 1
    version = int(previous.get("vocabulary_version", 1))
    current = [registry.names[uid] for uid in registry.active]
    return version if current == previous_active else version + 1
