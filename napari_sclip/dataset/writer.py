"""Writing samples into a dataset folder: a kill at any moment leaves a valid dataset, and two
processes never corrupt one.

* **One owner.**  A :class:`DatasetWriter` holds the dataset
  (:class:`~napari_sclip.dataset.lock.DatasetLock`) from opening to :meth:`~DatasetWriter.close`.
  Only the owner writes the manifest, the class files and the indexes, and it records its classes
  in the manifest before it writes any mask, so no mask ever holds a training id that no class
  declares.  Another process (here or on another machine) is refused in one line naming the owner.
* **Atomic samples.**  A sample's files are written under temporary names that name this host and
  process, then renamed into place, its ``meta/<id>.json`` last: a sample exists once its meta
  file does.  The first sample of a split is made in a hidden folder together with the split's
  ``metadata.jsonl``, and that folder is renamed into place, so every split folder has its index
  from the moment it exists (Hugging Face's imagefolder never reads masks as images).  Later
  samples join the indexes when the writer closes; loaders ignore files that their split's index
  does not list yet.
* **An index that costs O(1) per sample.**  The owner keeps a small :class:`Entry` per sample in
  memory (resume checks and ids come from it) and appends each new sample's entry to a journal,
  ``.napari-sclip-journal.jsonl``.  Consolidation (every split's ``metadata.jsonl``, the manifest,
  the class files and a compacted journal) happens on open and on close, never every few samples.
  On open, a journal entry stands for its meta file while the file's size and time stamp still
  match; other meta files are read.
* **Files from other processes.**  :func:`write_sample_files` writes one sample's files for an
  owner that planned its id and split (:meth:`DatasetWriter.plan`), in another thread or on
  another machine (a Dask worker); the owner then records it (:meth:`DatasetWriter.record`).
* **A new dataset** gets its manifest before anything else; if the writer fails before its first
  sample (disk full, read-only, interrupted), it removes what it made: a failed run leaves no
  skeleton behind.
* **Leftovers.**  Opening a dataset removes the temporary files and folders that killed writers
  left, and only those whose writer is gone (:func:`~napari_sclip.dataset.lock.is_gone`).
* **Bands.**  Masks, confidence and provenance are computed in bands of rows, in the smallest
  dtypes, and PNGs are encoded straight into their files: a 12000 x 12000 image costs little more
  than its own 8-bit planes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO

import numpy as np

from napari_sclip._files import (
    atomic_write_bytes,
    describe_os_error,
    make_folders,
    remove_folders,
    temporary_path,
    temporary_writer,
    write_temporary,
)
from napari_sclip.classes import ClassConflict, ClassRegistry
from napari_sclip.dataset import format as fmt
from napari_sclip.dataset.lock import LOCK_NAME, DatasetLock, is_gone, read_lock
from napari_sclip.dataset.paths import (
    DatasetError,
    is_int,
    read_json,
    reporting_os_errors,
    resolve_inside,
)
from napari_sclip.dataset.splits import DEFAULT_RATIOS, SPLIT_NAMES, assign_split, check_ratios
from napari_sclip.io.images import exif_orientation

#: Provenance mask values.
MODEL, PAINTED, IGNORED_BY_PERSON = 0, 1, 2
_FOLDERS = ("images", "masks", "confidence", "provenance", "meta")
#: Source files in these formats are copied byte for byte (unless EXIF turns them); others are PNG.
COPIED_SUFFIXES = (".png", ".jpg", ".jpeg")
#: Per-image facts that say how labels were made (their distinct combinations are the manifest's
#: ``models``): the model, its weights and activation, the method and its parameters.
_MODEL_KEYS = (
    "model", "pretrained", "quick_gelu", "patch_size", "method", "sc_clip_layers", "short_side", "window", "stride",
    "logit_scale", "prob_threshold", "background_class", "area_threshold", "pamr", "pamr_iterations",
    "pamr_dilations",
)
#: Each split's index: the rows Hugging Face's imagefolder (and the loaders in docs/dataset.md) read.
INDEX = "metadata.jsonl"
#: The owner's journal of samples (a cache of their meta files; hidden from loaders).
JOURNAL = ".napari-sclip-journal.jsonl"
#: The files at the dataset's root, besides the lock.
_ROOT_FILES = (fmt.MANIFEST, "classes.txt", "id2label.json", "labelmap.txt", JOURNAL)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pixels_sha256(image: np.ndarray) -> str:
    """The SHA-256 of an image that came from no file: its dtype, shape and values."""
    array = np.ascontiguousarray(image)
    digest = hashlib.sha256(f"{array.dtype.str} {array.shape}\n".encode())
    digest.update(array.reshape(-1).view(np.uint8))
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
    """A sample's ``meta/<id>.json``, checked (:func:`check_meta`)."""
    try:
        meta = read_json(path)
    except OSError as exc:
        raise DatasetError(describe_os_error(exc, path)) from None
    return check_meta(meta, path)


def check_meta(meta: Any, path: Path) -> dict[str, Any]:
    """``meta`` if it is a valid ``meta/<id>.json`` for the file ``path``: its id is the file's
    name, its image and mask are that id's files (``images/<id>.<ext>``, ``masks/<id>.png``: a
    hand-edited meta file never makes a writer replace or delete another sample's files), and the
    fields a writer uses have their types."""
    image_id = path.name[: -len(".json")]
    source = meta.get("source") if isinstance(meta, dict) else None
    index = meta.get("slice") if isinstance(meta, dict) else None
    image = meta.get("image") if isinstance(meta, dict) else None
    problem = (
        "it is not a JSON object" if not isinstance(meta, dict)
        else f"its id must be {image_id!r}, the file's name" if meta.get("id") != image_id
        else f"its image must be images/{image_id}.<ext>" if not (isinstance(image, str) and _names_own_image(image, image_id))
        else f"its mask must be masks/{image_id}.png" if meta.get("mask") != f"masks/{image_id}.png"
        else "its source must be an object with text sha256 and path" if source is not None and not (
            isinstance(source, dict) and all(isinstance(source.get(key), (str, type(None))) for key in ("sha256", "path"))
        )
        else "its slice must be a list of whole numbers" if index is not None and not (
            isinstance(index, list) and all(is_int(i, 0, 2**31) for i in index)
        )
        else "its edits must be an object" if not isinstance(meta.get("edits", {}), (dict, type(None)))
        else "its review_status must be text" if not isinstance(meta.get("review_status", ""), str)
        else None
    )
    if problem:
        raise DatasetError(f"{path} is malformed: {problem}; fix or remove it")
    return meta


def meta_ids(root: Path, split: str) -> list[str]:
    """The ids of a split's samples (those with a ``meta/<id>.json``), in file-name order.
    Hidden names (temporary files, a system's ``._`` files) are no samples, for every reader."""
    folder = resolve_inside(root, f"{split}/meta")
    if not folder.is_dir():
        return []
    names = sorted(name for name in os.listdir(folder) if name.endswith(".json") and not name.startswith("."))
    return [name[: -len(".json")] for name in names]


def pixels_edited(meta: dict[str, Any]) -> bool:
    """Whether a person changed a stored sample's pixels (painted, or set some to ignore)."""
    edits = meta.get("edits") or {}
    return bool(edits.get("painted_pixels") or edits.get("ignored_pixels"))


def is_edited(meta: dict[str, Any]) -> bool:
    """Whether a person touched a stored sample (changed its pixels, or reviewed it)."""
    return pixels_edited(meta) or meta.get("review_status", "unreviewed") != "unreviewed"


Identity = tuple[str | None, tuple[int, ...] | None]  # (source SHA-256, slice index)

#: The confidence thresholds of :attr:`Summary.confidence_below`.
CONFIDENCE_STEPS = tuple(k / 10 for k in range(1, 10))


@dataclass(frozen=True)
class Summary:
    """What a reviewer sorts and filters samples by, recorded in each meta file's ``summary`` so
    that a dataset of any size is ordered without reading its masks.

    Attributes
    ----------
    classes
        The training ids present in the mask, ascending (ignore excluded).
    mean_confidence
        The mean stored confidence over all pixels, or ``None`` without a confidence map.
    confidence_below
        For each threshold of :data:`CONFIDENCE_STEPS` (0.1 ... 0.9), the fraction of pixels whose
        stored confidence is below it; ``None`` without a confidence map.
    """

    classes: tuple[int, ...]
    mean_confidence: float | None = None
    confidence_below: tuple[float, ...] | None = None

    @classmethod
    def of(cls, mask: np.ndarray, levels: np.ndarray | None) -> Summary:
        """The summary of a training-id mask and its confidence levels (``round(255 p)``)."""
        counts = fmt.value_counts(mask, fmt.ignore_value(mask.dtype) + 1)
        counts[fmt.ignore_value(mask.dtype):] = 0
        classes = tuple(int(v) for v in np.flatnonzero(counts))
        if levels is None or not levels.size:
            return cls(classes)
        histogram = fmt.value_counts(levels, 256)
        below = np.cumsum(histogram) / levels.size
        # level / 255 < k / 10  <=>  level <= ceil(255 k / 10) - 1, in integers
        steps = tuple(round(float(below[-(-255 * k // 10) - 1]), 4) for k in range(1, 10))
        mean = float(np.dot(histogram, np.arange(256))) / (255 * levels.size)
        return cls(classes, round(mean, 4), steps)

    def to_json(self) -> dict[str, Any]:
        return {"classes": list(self.classes), "mean_confidence": self.mean_confidence,
                "confidence_below": list(self.confidence_below) if self.confidence_below is not None else None}

    @classmethod
    def from_json(cls, value: Any) -> Summary | None:
        """The summary a meta file or journal row holds; ``None`` when it has none or a malformed one
        (then a reader works it out from the files)."""
        try:
            classes = tuple(int(v) for v in value["classes"] if is_int(v, 0, fmt.MAX_UID))
            mean = value["mean_confidence"]
            below = value["confidence_below"]
            if mean is not None:
                mean = float(mean)
                below = tuple(float(v) for v in below)
                if len(below) != len(CONFIDENCE_STEPS) or not 0 <= mean <= 1:
                    return None
            return cls(classes, mean, None if mean is None else below)
        except (KeyError, TypeError, ValueError):
            return None


def identity_of(meta: dict[str, Any]) -> Identity:
    """What makes two samples the same image: the source's SHA-256 and the slice of it."""
    index = meta.get("slice")
    return (meta.get("source") or {}).get("sha256"), tuple(index) if index is not None else None


@dataclass(frozen=True)
class Entry:
    """What the owner keeps of one stored sample: enough for resume checks, ids, the indexes and
    the manifest, and small whatever its meta file holds (a million samples fit in memory).

    Attributes
    ----------
    split, image
        Where it is: ``<split>/<image>`` (``images/<id>.<ext>``); its mask is ``masks/<id>.png``.
    review_status
        ``unreviewed``, ``edited`` or ``reviewed``.
    edited
        A person touched it (:func:`is_edited`): never labelled again.
    identity
        The source's SHA-256 and slice (:func:`identity_of`).
    from_file
        It came from an image file, which keeps its id under any name.
    model
        How it was labelled (the meta's model keys, as sorted pairs), or ``()``.
    summary
        Its classes and confidence (:class:`Summary`); ``None`` for samples written before
        summaries were recorded.
    """

    split: str
    image: str
    review_status: str
    edited: bool
    identity: Identity
    from_file: bool
    model: tuple[tuple[str, Any], ...] = ()
    summary: Summary | None = None

    @classmethod
    def of(cls, split: str, meta: dict[str, Any]) -> Entry:
        model = tuple((key, _frozen(meta[key])) for key in _MODEL_KEYS if key in meta)
        return cls(split, meta["image"], meta.get("review_status", "unreviewed"), is_edited(meta),
                   identity_of(meta), bool((meta.get("source") or {}).get("path")), model,
                   Summary.from_json(meta.get("summary")))

    def to_json(self, image_id: str, meta_stat: tuple[int, ...]) -> dict[str, Any]:
        """A journal row: this entry and the stat key of the meta file it stands for
        (:func:`stat_key`)."""
        return {"id": image_id, "split": self.split, "image": self.image, "review_status": self.review_status,
                "edited": self.edited, "sha256": self.identity[0],
                "slice": list(self.identity[1]) if self.identity[1] is not None else None,
                "from_file": self.from_file, "model": [[key, _thawed(value)] for key, value in self.model],
                "summary": self.summary.to_json() if self.summary is not None else None,
                "stat": list(meta_stat)}

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> Entry:
        """The entry of a journal row (``ValueError``/``TypeError``/``KeyError`` if malformed)."""
        index = row["slice"]
        if not (isinstance(row["split"], str) and isinstance(row["image"], str) and isinstance(row["review_status"], str)
                and isinstance(row["sha256"], (str, type(None))) and isinstance(row["edited"], bool)
                and (index is None or all(is_int(i, 0, 2**31) for i in index))):
            raise ValueError("malformed journal row")
        model = tuple((str(key), _frozen(value)) for key, value in row["model"])
        return cls(row["split"], row["image"], row["review_status"], row["edited"],
                   (row["sha256"], tuple(index) if index is not None else None), bool(row["from_file"]), model,
                   Summary.from_json(row.get("summary")))


def _journal_row(line: bytes) -> tuple[str, Entry, tuple[int, ...]] | None:
    """``(id, entry, its meta file's stat key)`` of one journal line; ``None`` for a damaged one
    (a killed append, a hand edit)."""
    try:
        row = json.loads(line)
        image_id, split = row["id"], row["split"]
        entry = Entry.from_json(row)
        key = tuple(row["stat"])
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None
    if not (isinstance(image_id, str) and _is_plain_id(image_id) and split in SPLIT_NAMES and entry.split == split
            and len(key) == 4 and all(is_int(value, 0, 2**64) for value in key)
            and _names_own_image(entry.image, image_id)):
        return None
    return image_id, entry, key


# A row's review status, found without parsing the row (JSON escapes the quotes of any string
# value, so only the key itself matches).
_STATUS_IN_ROW = re.compile(rb'"review_status": "([a-z]*)"')


def journal_firsts(root: Path, wanted: str) -> dict[str, tuple[str, Entry]]:
    """The first journal row of each review status, as ``status -> (id, entry)``, read up to the
    first row of status ``wanted``.  The rows of a status already found are skipped unparsed, so
    this takes milliseconds whatever the dataset's size.  The consolidated journal is sorted by
    split, then id; rows appended since (by a writer that was killed) and rows whose meta file
    changed make this a guess: only the owner's scan knows the dataset."""
    firsts: dict[str, tuple[str, Entry]] = {}
    try:
        with open(resolve_inside(root, JOURNAL), "rb") as handle:
            for line in handle:
                found = _STATUS_IN_ROW.search(line)
                if found is not None and found[1].decode() in firsts:
                    continue
                row = _journal_row(line)
                if row is not None and row[1].review_status not in firsts:
                    firsts[row[1].review_status] = row[:2]
                    if row[1].review_status == wanted:
                        break
    except (OSError, DatasetError):
        pass
    return firsts


def stat_key(status: os.stat_result) -> tuple[int, int, int, int]:
    """What says a meta file is the one a journal row was written for: its modification time,
    size, status-change time and inode.  The status-change time cannot be set back (``touch``
    and ``utime`` set it to now), so an edit that keeps the size and restores the modification
    time is still seen; a copied dataset is read afresh once."""
    return status.st_mtime_ns, status.st_size, status.st_ctime_ns, status.st_ino


def _is_plain_id(image_id: str) -> bool:
    """Whether ``image_id`` can name a meta file: no path, however the row was made."""
    return image_id not in ("", ".", "..") and not any(c in image_id for c in "/\\\0")


def _names_own_image(image: str, image_id: str) -> bool:
    """Whether ``image`` is ``images/<image_id>.<ext>`` (letters and digits), as meta files must say."""
    prefix = f"images/{image_id}."
    return image.startswith(prefix) and image[len(prefix):].isalnum()


def _files_of(entry: Entry, image_id: str) -> list[tuple[str, str]]:
    """``(folder, name)`` of a sample's image and mask."""
    return [tuple(entry.image.split("/", 1)), ("masks", f"{image_id}.png")]


class _FrozenObject(tuple):
    """A JSON object's ``(key, value)`` pairs, hashable, told apart from a frozen list."""


def _frozen(value: Any) -> Any:
    """A JSON value as a hashable one (lists become tuples, objects :class:`_FrozenObject`)."""
    if isinstance(value, dict):
        return _FrozenObject((str(key), _frozen(item)) for key, item in value.items())
    return tuple(_frozen(item) for item in value) if isinstance(value, (list, tuple)) else value


def _thawed(value: Any) -> Any:
    if isinstance(value, _FrozenObject):
        return {key: _thawed(item) for key, item in value}
    return [_thawed(item) for item in value] if isinstance(value, tuple) else value


def _encode_png(array: np.ndarray, handle: BinaryIO) -> None:
    """At zlib's fastest level: at Pillow's default (6) a 512 x 512 confidence map took 22 ms
    to encode instead of 5 ms, a quarter of a sample's CPU, to save a fifth of its bytes
    (docs/benchmarks.md, "The dataset side's CPU per image")."""
    from PIL import Image

    Image.fromarray(array).save(handle, format="PNG", compress_level=1)


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
        The source file's SHA-256, if already known (saves reading it again).  An image from no
        file is known by the SHA-256 of its pixels (:func:`pixels_sha256`).
    confidence
        (H, W) winning probabilities in [0, 1], stored as ``round(255 p)``.
    edited
        (H, W) bool: pixels a person changed (provenance 1, or 2 where they set 0).
    meta
        Per-image facts carried into ``meta/<id>.json``: model, weights, activation, device,
        precision, method and parameters, and for a sample read back from a dataset its stored
        ``source``, ``created``, ``review_status`` and ``vocabulary_version`` (kept as they are).
    """

    stem: str
    labels: np.ndarray
    image: np.ndarray | None = None
    source: Path | None = None
    source_sha256: str | None = None
    confidence: np.ndarray | None = None
    edited: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)



@dataclass(frozen=True)
class Target:
    """Where a planned sample goes: what an owner tells whoever writes its files
    (:func:`write_sample_files`), in this process or on another machine.

    Attributes
    ----------
    image_id, split
        The sample's id and split (the owner's :meth:`DatasetWriter.plan`).
    train_ids
        napari label value -> training id, for the mask.
    vocabulary_version
        Recorded with the sample.
    owner_token
        The owner's lock token: files are placed only while that owner holds the dataset.
    """

    image_id: str
    split: str
    train_ids: fmt.TrainIds
    vocabulary_version: int
    owner_token: str


def write_sample_files(root: Path, target: Target, sample: Sample) -> dict[str, Any]:
    """Write one sample's files into the dataset at ``root`` (all of them, or none; its meta file
    last) where its owner planned them, and return its meta as a reader sees it.

    Safe to call from several threads and processes at once for different ids, and again for the
    same id (a retried task): the files are renamed into place, each replacing the last.  Files
    are placed only while the owner named by ``target.owner_token`` still holds the dataset.
    """
    root = Path(root)
    with reporting_os_errors(root):
        return _write_files(root, target, sample)


def _write_files(root: Path, target: Target, sample: Sample) -> dict[str, Any]:
    labels = np.asarray(sample.labels)
    if labels.ndim != 2:
        raise DatasetError(f"labels of {sample.stem!r} must be 2D, got shape {labels.shape}")
    if sample.source is None and sample.image is None:
        raise DatasetError(f"sample {sample.stem!r} needs its image as an array, or a PNG or JPEG file")
    for name, plane in (("confidence", sample.confidence), ("edited", sample.edited)):
        if plane is not None and np.shape(plane) != labels.shape:
            raise DatasetError(f"{name} of {sample.stem!r} has shape {np.shape(plane)}, its labels {labels.shape}")
    image_id, split = target.image_id, target.split
    carried = dict(sample.meta)
    source = carried.pop("source", None) or _source(sample, labels)
    copied = (
        sample.source is not None
        and sample.source.suffix.lower() in COPIED_SUFFIXES
        # A turned photo is stored as the pixels its labels were made on: loaders that apply
        # EXIF (Hugging Face, MMSegmentation, Detectron2) and those that do not (torchvision,
        # Datumaro) must all see the mask's frame.
        and (sample.image is None or exif_orientation(sample.source) == 1)
    )
    image_name = f"images/{image_id}{sample.source.suffix.lower() if copied else '.png'}"

    folder = resolve_inside(root, split)
    staging = None if folder.is_dir() else temporary_path(folder)  # a split's first sample
    staged: list[tuple[Path, str]] = []  # (temporary, path relative to the split)

    def place(relative: str) -> Path:
        return staging / relative if staging else resolve_inside(root, f"{split}/{relative}")

    def stage(relative: str, write) -> None:
        staged.append((write_temporary(place(relative), write), relative))

    try:
        if staging:
            staging.mkdir()
        for sub in _FOLDERS:
            place(sub).mkdir(exist_ok=True)
        # One full-size plane at a time: each is encoded as soon as it is made.
        if copied:
            # The bytes the labels were made from, when the source record is this very file's
            # (a sample read back from a dataset is copied from the dataset's own image).
            made_from = source.get("sha256") if source.get("path") == str(sample.source) else None
            stage(image_name, partial(_copy, sample.source, made_from))
        else:
            stage(image_name, partial(_encode_png, storable_image(sample.image)))
        mask = fmt.labels_to_mask(labels, target.train_ids)
        stage(f"masks/{image_id}.png", partial(_encode_png, mask))
        levels = _confidence_levels(sample.confidence) if sample.confidence is not None else None
        if levels is not None:
            stage(f"confidence/{image_id}.png", partial(_encode_png, levels))
        summary = Summary.of(mask, levels)
        del mask, levels
        provenance, painted, ignored = _provenance(labels, sample.edited)
        stage(f"provenance/{image_id}.png", partial(_encode_png, provenance))
        del provenance

        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        meta = {
            "id": image_id,
            "split": split,
            "image": image_name,
            "mask": f"masks/{image_id}.png",
            "source": source,
            "created": carried.pop("created", now),
            "updated": now,
            "edits": {"painted_pixels": painted, "ignored_pixels": ignored},
            "review_status": _review_status(carried.get("review_status"), bool(painted or ignored)),
            "vocabulary_version": carried.get("vocabulary_version", target.vocabulary_version),
            "summary": summary.to_json(),
        }
        meta.update((key, value) for key, value in carried.items() if key not in meta)
        text = _meta_text(meta)
        meta = json.loads(text)  # as a reader will see it (tuples as lists, ...)
        stage(f"meta/{image_id}.json", partial(_write_bytes, text.encode("utf-8")))
        check_owner(root, target.owner_token)
        if staging:
            for temporary, relative in staged:
                os.replace(temporary, staging / relative)
            atomic_write_bytes(staging / INDEX, _index_rows([(image_id, Entry.of(split, meta))]).encode("utf-8"))
            try:
                os.rename(staging, folder)
                staged.clear()
            except OSError:
                if not folder.is_dir():
                    raise
                # Another writer made the split first: join it, file by file (the index says
                # nothing of this sample until the owner consolidates it).
                staged = [(staging / relative, relative) for _, relative in staged]
            else:
                staging = None
        for temporary, relative in staged:  # the meta file last
            os.replace(temporary, resolve_inside(root, f"{split}/{relative}"))
        staged.clear()
    except BaseException:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
        raise
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
    return meta


class SourceChanged(DatasetError):
    """A source file's bytes are no longer those its labels were made from."""


def check_owner(root: Path, token: str) -> None:
    """Raise :class:`DatasetError` unless the owner whose lock token is ``token`` still holds the
    dataset at ``root``."""
    found = read_lock(root / LOCK_NAME)
    holder = found[0] if found else None
    if holder is None or holder.token != token:
        who = holder.describe() if holder else "nobody"
        raise DatasetError(f"{root} is no longer held by the run that planned this sample (now: {who}); run it again")


class DatasetWriter:
    """Holds a dataset folder and writes samples into it; use it as a context manager (or call
    :meth:`close`), which brings the index up to date and gives the folder up.

    Parameters
    ----------
    root
        The dataset folder.  It is created if missing; an existing folder must be empty or hold a
        napari-sclip dataset (anything else is refused, never written into).
    registry
        The classes by napari label value (a labels layer's uids), merged into an existing
        dataset's: a uid that names another class there is an error.
    ratios
        Split ratios for new datasets; an existing dataset keeps its own.
    vocabulary
        Instead of ``registry``: classes by name (one tuple of names per class), adopted into the
        dataset's classes (known names keep their uid, new ones get new uids) as the current
        vocabulary.  The result is :attr:`registry`.
    activity
        What this owner does, for the message others get (e.g. ``"review"``: it does not end by
        itself).

    Classes keep their training ids; those of new classes come after the existing ones.  The
    vocabulary version (recorded in the manifest and with every sample written) is 1 for a new
    dataset, and goes up by one when the current vocabulary differs from the dataset's.

    Samples are written with :meth:`write`, or in three steps when others write their files:
    :meth:`plan` (id and split), :func:`write_sample_files` (anywhere), :meth:`record`.  Planning
    and recording are for one thread at a time.

    Raises :class:`DatasetError` (one line) when the folder is held by another process, is not a
    dataset, holds symbolic links, or cannot be written (read-only, full, vanished).
    """

    def __init__(
        self,
        root: str | Path,
        registry: ClassRegistry | None = None,
        ratios: dict[str, float] | None = None,
        *,
        vocabulary: Sequence[tuple[str, ...]] | None = None,
        activity: str | None = None,
    ):
        self.root = Path(os.path.abspath(Path(root).expanduser()))  # as workers elsewhere see it
        self.previous: dict[str, Any] | None = None  # the manifest as last written or read
        self._lock: DatasetLock | None = None
        self._created = False  # this writer made the dataset (and removes it if it fails empty)
        self._made: list[Path] = []
        self._samples: dict[str, Entry] = {}
        self._ids: dict[Identity, str] = {}  # image files' ids, and planned ones
        self._planned: dict[str, Identity] = {}  # ids planned and not recorded yet
        self._journal: int | None = None  # descriptor, appending
        self._unindexed = 0
        with reporting_os_errors(self.root):
            self._refuse_foreign_folder()
            self._made = make_folders(self.root)
            try:
                self._lock = DatasetLock(self.root, activity)
                self._release = weakref.finalize(self, self._lock.release)
                self._open(registry, vocabulary, ratios)
            except BaseException:
                self._abandon()
                raise

    def _refuse_foreign_folder(self) -> None:
        """Refuse a file, or a folder that is neither empty nor a dataset, before touching it."""
        if not self.root.exists():
            return
        if not self.root.is_dir():
            raise DatasetError(f"{self.root} exists and is not a folder")
        if not os.path.lexists(self.root / fmt.MANIFEST) and not _holds_only_leftovers(self.root):
            raise DatasetError(f"{self.root} is not empty and not a napari-sclip dataset; choose a new or empty folder")

    def _open(self, registry, vocabulary, ratios) -> None:
        self._check_layout()
        self._refuse_foreign_folder()  # again: another writer may have been first
        if resolve_inside(self.root, fmt.MANIFEST).exists():
            self.previous, stored, train_ids = fmt.read_manifest(self.root)
            ratios = self.previous["splits"]["ratios"]
        else:
            stored, train_ids, self._created = ClassRegistry(), {}, True
        before = (stored.to_json(), [stored.names[uid] for uid in stored.active])
        self.registry = _merge_classes(stored, registry, vocabulary, self.root / fmt.MANIFEST)
        self.vocabulary_version = _vocabulary_version(self.previous, before[1], self.registry)
        self.train_ids = fmt.extend_train_ids(train_ids, self.registry)
        self.ratios = check_ratios(ratios or DEFAULT_RATIOS)
        self._remove_stale_temporaries()
        journal_current = self._scan()
        changed = (
            self._created
            or self.train_ids != train_ids
            or self.registry.to_json() != before[0]
            or self.vocabulary_version != self.previous.get("vocabulary_version", 1)
        )
        # New classes reach the manifest before any mask uses them; indexes and a journal that an
        # interrupted run left behind catch up with its samples.
        if changed or not journal_current or not all(self._index_is_current(split) for split in self._splits()):
            self.rebuild_index()

    def _check_layout(self) -> None:
        """Refuse symbolic links where the dataset's own files and folders belong."""
        for name in (*_ROOT_FILES, LOCK_NAME):
            resolve_inside(self.root, name)
        for split in SPLIT_NAMES:
            if resolve_inside(self.root, split).is_dir():
                for name in (*_FOLDERS, INDEX):
                    resolve_inside(self.root, f"{split}/{name}")

    def _folders(self) -> list[Path]:
        """The dataset's folders that exist: the root, the splits and theirs (no links: checked)."""
        folders = [self.root]
        for split in SPLIT_NAMES:
            if (self.root / split).is_dir():
                folders.append(self.root / split)
                folders += [self.root / split / sub for sub in _FOLDERS if (self.root / split / sub).is_dir()]
        return folders

    def _remove_stale_temporaries(self) -> None:
        """Delete the temporary files and folders of writers that are gone, never a live one's."""
        now = self._lock.file_system_now()
        for folder in self._folders():
            with os.scandir(folder) as entries:
                leftovers = [entry for entry in entries if temporary_writer(entry.name) and not entry.is_symlink()]
            for entry in leftovers:
                try:
                    if not is_gone(*temporary_writer(entry.name), now - entry.stat(follow_symlinks=False).st_mtime):
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path)
                    else:
                        os.unlink(entry.path)
                except FileNotFoundError:
                    pass

    def _scan(self) -> bool:
        """Know every sample (the owner's view of the dataset from now on): from the journal where
        its row still matches the meta file's size and time stamp, else from the meta file.
        Returns whether the journal was exactly the samples (else it is rewritten)."""
        journal = self._read_journal()
        exact = True
        for split in SPLIT_NAMES:
            if not resolve_inside(self.root, split).is_dir():
                continue
            present = {sub: _plain_files(resolve_inside(self.root, f"{split}/{sub}")) for sub in ("images", "masks")}
            meta_folder = resolve_inside(self.root, f"{split}/meta")
            entries = sorted(os.scandir(meta_folder), key=lambda e: e.name) if meta_folder.is_dir() else []
            for found in entries:
                if not found.name.endswith(".json") or found.name.startswith("."):
                    continue
                image_id, path = found.name[: -len(".json")], Path(found.path)
                if found.is_symlink() or not found.is_file(follow_symlinks=False):
                    resolve_inside(self.root, f"{split}/meta/{found.name}")  # names the problem
                    raise DatasetError(f"{path} is not a plain file; remove it")
                row = journal.pop((split, image_id), None)
                entry = row[0] if row is not None and row[1] == stat_key(found.stat(follow_symlinks=False)) else None
                if entry is None or not all(present[sub].get(name) for sub, name in _files_of(entry, image_id)):
                    exact = False  # the meta file decides, and says what is wrong
                    entry = Entry.of(split, read_meta(path))
                for sub, name in _files_of(entry, image_id):
                    if not present[sub].get(name):
                        resolve_inside(self.root, f"{split}/{sub}/{name}")  # a link or a FIFO: says so
                        raise DatasetError(f"{path} names {sub}/{name}, which is missing")
                self._remember(image_id, entry)
        return exact and not journal

    def _read_journal(self) -> dict[tuple[str, str], tuple[Entry, tuple[int, ...]]]:
        """``(split, id) -> (entry, its meta file's stat key)`` from the journal; the last row of an
        id wins.  Damaged rows (a killed append, a hand edit) are ignored: the meta files are the
        truth, the journal only saves reading them."""
        rows: dict[tuple[str, str], tuple[Entry, tuple[int, ...]]] = {}
        path = resolve_inside(self.root, JOURNAL)
        try:
            with open(path, "rb") as handle:
                for line in handle:
                    row = _journal_row(line)
                    if row is not None:
                        rows[row[1].split, row[0]] = row[1:]
        except FileNotFoundError:
            pass
        return rows

    def _remember(self, image_id: str, entry: Entry) -> None:
        self._samples[image_id] = entry
        if entry.identity[0] is not None and entry.from_file:  # a file keeps its id under any name
            self._ids[entry.identity] = image_id

    def _splits_on_disk(self) -> bool:
        """Whether any split folder exists (samples that others wrote, not recorded here)."""
        return any(os.path.lexists(self.root / split) for split in SPLIT_NAMES)

    def _splits(self) -> list[str]:
        return sorted({entry.split for entry in self._samples.values()}, key=SPLIT_NAMES.index)

    # -- ids ---------------------------------------------------------------------------------------

    def entries(self) -> Mapping[str, Entry]:
        """Every sample's entry, by id (a read-only view that follows later writes)."""
        return MappingProxyType(self._samples)

    def stored(self, image_id: str) -> Entry | None:
        """The entry of a sample already in the dataset, if any."""
        return self._samples.get(image_id)

    def stored_identity(self, identity: Identity) -> tuple[str, Entry] | None:
        """``(id, entry)`` of the stored sample of an image file's slice (or 2D image), if any."""
        image_id = self._ids.get(identity)
        entry = self._samples.get(image_id) if image_id is not None else None
        return (image_id, entry) if entry is not None else None

    def image_id(self, stem: str, identity: Identity) -> str:
        """The id of the image ``identity``: the one an image file already has in the dataset (or
        was planned in this run), else ``stem`` (made safe), unless another image has that; then
        the stem plus the start of the image's SHA-256 (longer starts if needed).  Images from no
        file are known by name and pixels: the same name with other pixels is another sample,
        never written over."""
        if identity in self._ids:
            return self._ids[identity]
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem).strip(".") or "image"
        sha = identity[0]
        for candidate in (safe, *(f"{safe}-{sha[:n]}" for n in (8, 16, 64) if sha)):
            found = self._samples.get(candidate)
            planned = self._planned.get(candidate)
            if (found is None or found.identity == identity) and planned in (None, identity):
                return candidate
        raise DatasetError(f"no free id for {stem!r} in {self.root}: rename the image")

    def adopt_classes(self, registry: ClassRegistry) -> None:
        """Take the classes of labels that changed while the dataset is held (a re-run with new
        names, a value painted that no class has), merged by uid as on opening with a registry:
        new classes get training ids, its active classes become the current vocabulary, and the
        manifest and class files name them before any mask uses them.  Nothing is written when
        nothing changes."""
        with reporting_os_errors(self.root):
            self._lock.check()
            stored = ClassRegistry.from_json(self.registry.to_json())
            merged = _merge_classes(stored, ClassRegistry.from_json(registry.to_json()), None,
                                    self.root / fmt.MANIFEST)
            train_ids = fmt.extend_train_ids(self.train_ids, merged)
            if merged.to_json() == self.registry.to_json() and train_ids == self.train_ids:
                return
            before = [self.registry.names[uid] for uid in self.registry.active]
            self.vocabulary_version = _vocabulary_version(self.previous, before, merged)
            self.registry, self.train_ids = merged, train_ids
            self.rebuild_index()

    # -- writing -----------------------------------------------------------------------------------

    @property
    def owner_token(self) -> str:
        return self._lock.owner.token

    def plan(self, stem: str, identity: Identity, *, from_file: bool = True) -> Target:
        """Choose the id and split of a sample about to be written, and keep the id for it until
        :meth:`record` (two images of one stem planned at once get distinct ids)."""
        image_id = self.image_id(stem, identity)
        previous = self._samples.get(image_id)
        split = previous.split if previous else assign_split(image_id, self.ratios)
        self._planned[image_id] = identity
        if identity[0] is not None and from_file:
            self._ids[identity] = image_id
        return Target(image_id, split, dict(self.train_ids), self.vocabulary_version, self.owner_token)

    def write(self, sample: Sample) -> str:
        """Write one sample (all its files, or none); returns its id."""
        with reporting_os_errors(self.root):
            self._lock.check()
            if not sample.meta.get("source"):  # the SHA-256 is needed for the id: read the file once
                sample = replace(sample, meta={**sample.meta, "source": _source(sample, np.asarray(sample.labels))})
            identity = identity_of({"source": sample.meta["source"], "slice": sample.meta.get("slice")})
            target = self.plan(sample.stem, identity, from_file=sample.source is not None)
            try:
                meta = _write_files(self.root, target, sample)
            except BaseException:
                self.forget(target)
                raise
            self.record(target, meta)
            return target.image_id

    def rewrite(self, image_id: str, sample: Sample) -> None:
        """Write the stored sample ``image_id`` again (a person's edits to it): under its own id
        and split whatever its image's identity (two samples may hold the same pixels), all its
        files or none."""
        with reporting_os_errors(self.root):
            self._lock.check()
            entry = self._samples.get(image_id)
            if entry is None:
                raise DatasetError(f"no sample {image_id!r} in {self.root}")
            target = Target(image_id, entry.split, dict(self.train_ids), self.vocabulary_version, self.owner_token)
            self.record(target, _write_files(self.root, target, sample))

    def forget(self, target: Target) -> None:
        """Give up a planned id whose sample was not written."""
        identity = self._planned.pop(target.image_id, None)
        if identity is not None and self._ids.get(identity) == target.image_id and target.image_id not in self._samples:
            del self._ids[identity]

    def record(self, target: Target, meta: dict[str, Any]) -> None:
        """Take a sample whose files :func:`write_sample_files` wrote into the dataset's knowledge:
        its journal row now, the indexes when the writer closes."""
        with reporting_os_errors(self.root):
            self._lock.check()
            image_id, split = target.image_id, target.split
            check_meta(meta, Path(f"{image_id}.json"))
            entry = Entry.of(split, meta)
            self._planned.pop(image_id, None)
            previous = self._samples.get(image_id)
            self._remember(image_id, entry)
            status = os.stat(resolve_inside(self.root, f"{split}/meta/{image_id}.json"))
            self._append_journal(entry.to_json(image_id, stat_key(status)))
            if previous and previous.image != entry.image:  # e.g. .jpg before, .png now
                self._write_index(split)  # the index names the new image before the old one goes
                resolve_inside(self.root, f"{split}/{previous.image}").unlink(missing_ok=True)
            self._unindexed += 1

    def _append_journal(self, row: dict[str, Any]) -> None:
        """One line, one ``write`` on a descriptor opened for appending: O(1) whatever the size of
        the dataset.  A kill mid-line leaves a damaged last row, which the next open ignores."""
        if self._journal is None:
            path = resolve_inside(self.root, JOURNAL)
            self._journal = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        written = os.write(self._journal, line)
        if written != len(line):  # a full disk mid-line: the row must not count
            raise OSError(28, "No space left on device", str(self.root / JOURNAL))

    def _close_journal(self) -> None:
        if self._journal is not None:
            os.close(self._journal)
            self._journal = None

    # -- the owner's files -------------------------------------------------------------------------

    def _index_text(self, split: str) -> str:
        return _index_rows([(image_id, entry) for image_id, entry in self._samples.items() if entry.split == split])

    def _index_is_current(self, split: str) -> bool:
        try:
            return resolve_inside(self.root, f"{split}/{INDEX}").read_text(encoding="utf-8") == self._index_text(split)
        except (FileNotFoundError, UnicodeDecodeError):
            return False

    def _write_index(self, split: str) -> None:
        atomic_write_bytes(resolve_inside(self.root, f"{split}/{INDEX}"), self._index_text(split).encode("utf-8"))

    def rebuild_index(self) -> dict[str, int]:
        """Consolidate: rewrite every split's ``metadata.jsonl``, ``dataset.json``, the class files
        and the journal from the samples; returns the number of samples per split."""
        with reporting_os_errors(self.root):
            self._lock.check()
            counts = {}
            for split in self._splits():
                self._write_index(split)
                counts[split] = sum(entry.split == split for entry in self._samples.values())
            models = []
            for _, entry in sorted(self._samples.items()):
                if entry.model and entry.model not in models:
                    models.append(entry.model)
            models = [{key: _thawed(value) for key, value in model} for model in models]
            # Another program may have taken the dataset over while this one was paused after the
            # check above: what is on disk now joins what this one writes, so no class is lost.
            self.train_ids = fmt.merge_stored_classes(self.root, self.registry, self.train_ids)
            manifest = fmt.build_manifest(
                self.registry, self.train_ids, self.ratios, models, self.vocabulary_version, self.previous
            )
            manifest["splits"]["counts"] = counts
            fmt.write_manifest(self.root, manifest)  # the manifest first: a new dataset is one from now on
            fmt.write_class_files(self.root, self.registry, self.train_ids)
            self._compact_journal()
            self.previous = manifest
            self._unindexed = 0
        return counts

    def _compact_journal(self) -> None:
        """Rewrite the journal as one row per sample (what the next open reads instead of every
        meta file)."""
        self._close_journal()
        rows = []
        # In the queue's tie order, so that a review finds where it opens in the first rows.
        for image_id, entry in sorted(self._samples.items(), key=lambda item: (SPLIT_NAMES.index(item[1].split), item[0])):
            try:
                status = os.stat(self.root / entry.split / "meta" / f"{image_id}.json")
            except FileNotFoundError:
                continue
            rows.append(json.dumps(entry.to_json(image_id, stat_key(status)), ensure_ascii=False))
        atomic_write_bytes(resolve_inside(self.root, JOURNAL), "".join(row + "\n" for row in rows).encode("utf-8"))

    # -- closing -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Bring the index up to date and give the dataset up (idempotent)."""
        if not self._release.alive:
            return
        try:
            if self._unindexed:
                self.rebuild_index()
                # Workers elsewhere (a Dask worker killed mid-sample) may have left temporaries.
                with reporting_os_errors(self.root):
                    self._remove_stale_temporaries()
        finally:
            self._close_journal()
            self._release()

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if self._created and not self._samples and not self._splits_on_disk():
            self._abandon()  # nothing was written into the dataset it made: leave no skeleton
        elif kind is None:
            self.close()
        else:
            # Keep what was written, index it if the disk still allows, and let the original
            # error be the one reported.
            try:
                self.close()
            except DatasetError:
                pass

    def _abandon(self) -> None:
        """Undo a dataset this writer created and wrote no sample into, and give it up."""
        self._close_journal()
        try:
            if self._created and self._lock is not None and self._lock.holds():
                for name in _ROOT_FILES:
                    (self.root / name).unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            if self._lock is not None:
                self._release()
            remove_folders(self._made)


def _plain_files(folder: Path) -> dict[str, bool]:
    """Each name in ``folder`` (none if it is missing): whether it is a plain file (no link), from
    the folder's listing alone, without a ``stat`` per file where the file system says."""
    if not folder.is_dir():
        return {}
    with os.scandir(folder) as entries:
        return {entry.name: entry.is_file(follow_symlinks=False) for entry in entries}


def _holds_only_leftovers(folder: Path) -> bool:
    """Whether ``folder`` is empty but for a lock and temporary files (a killed writer's)."""
    with os.scandir(folder) as entries:
        return all(entry.name == LOCK_NAME or temporary_writer(entry.name) for entry in entries)


def _merge_classes(stored: ClassRegistry, registry, vocabulary, manifest: Path) -> ClassRegistry:
    """The classes to write with: ``vocabulary`` adopted into the dataset's (by name), or
    ``registry`` with the dataset's classes added (by uid), or with neither the dataset's as they
    are (its current vocabulary stays)."""
    if vocabulary is not None:
        stored.update(tuple(tuple(names) for names in vocabulary))
        return stored
    if registry is None:
        return stored
    try:
        return registry.merged_with(stored)
    except ClassConflict as conflict:
        raise DatasetError(
            f"label {conflict.uid} is {conflict.second!r} in {manifest} but {conflict.first!r} here; open that dataset "
            "in napari and label with its classes, or choose another folder"
        ) from None


def _source(sample: Sample, labels: np.ndarray) -> dict[str, Any]:
    """The ``source`` record of a sample written for the first time."""
    if sample.source is not None:
        sha = sample.source_sha256 or sha256_of(sample.source)
    else:
        sha = sample.source_sha256 or pixels_sha256(sample.image)
    return {
        "path": str(sample.source) if sample.source is not None else None,
        "sha256": sha,
        "shape": list(np.shape(sample.image) if sample.image is not None else labels.shape),
        "dtype": str(np.asarray(sample.image).dtype) if sample.image is not None else "file",
    }


def _meta_text(meta: dict[str, Any]) -> str:
    """A meta file's JSON: readable UTF-8, or escaped ASCII where a source's name is not valid
    UTF-8 (a file name in another encoding reaches Python as lone surrogates)."""
    try:
        text = json.dumps(meta, indent=2, ensure_ascii=False, default=str) + "\n"
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(meta, indent=2, ensure_ascii=True, default=str) + "\n"
    return text


def _write_bytes(data: bytes, handle: BinaryIO) -> None:
    handle.write(data)


def _copy(source: Path, sha256: str | None, handle: BinaryIO) -> None:
    """Copy ``source``; with ``sha256``, check that these are the bytes its labels were made
    from (the file may have changed since it was read)."""
    digest = hashlib.sha256()
    with open(source, "rb") as original:
        for block in iter(lambda: original.read(1 << 20), b""):
            digest.update(block)
            handle.write(block)
    if sha256 is not None and digest.hexdigest() != sha256:
        raise SourceChanged(f"{source}: the file changed while it was being labelled; run again")


def _index_rows(entries: list[tuple[str, Entry]]) -> str:
    """``metadata.jsonl``: one row per sample, in id order."""
    rows = [
        {"file_name": entry.image, "label_file_name": f"masks/{image_id}.png", "id": image_id,
         "review_status": entry.review_status}
        for image_id, entry in sorted(entries, key=lambda item: item[0])
    ]
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _confidence_levels(confidence: np.ndarray) -> np.ndarray:
    """``round(255 p)`` as uint8, band by band (no full-size float temporaries)."""
    levels = np.empty(np.shape(confidence), np.uint8)
    for rows in fmt.row_bands(levels.shape):
        levels[rows] = np.rint(np.clip(np.asarray(confidence[rows], np.float32), 0, 1) * 255)
    return levels


def _provenance(labels: np.ndarray, edited: np.ndarray | None) -> tuple[np.ndarray, int, int]:
    """The provenance mask (model 0, painted 1, set to unlabelled 2) and the two counts."""
    provenance = np.zeros(labels.shape, np.uint8)
    painted = ignored = 0
    if edited is None:
        return provenance, painted, ignored
    for rows in fmt.row_bands(labels.shape):
        touched = np.asarray(edited[rows], bool)
        erased = touched & (labels[rows] == 0)
        band = provenance[rows]
        band[touched] = PAINTED
        band[erased] = IGNORED_BY_PERSON
        ignored += int(np.count_nonzero(erased))
        painted += int(np.count_nonzero(touched)) - int(np.count_nonzero(erased))
    return provenance, painted, ignored


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
