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
  samples join the index every :data:`INDEX_EVERY_SAMPLES` samples or :data:`INDEX_EVERY_SECONDS`,
  and on close; loaders ignore files that their split's index does not list yet.
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
import shutil
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
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
from napari_sclip.classes import ClassRegistry
from napari_sclip.dataset import format as fmt
from napari_sclip.dataset.lock import LOCK_NAME, DatasetLock, is_gone
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
    "model", "pretrained", "quick_gelu", "method", "short_side", "window", "stride", "logit_scale",
    "prob_threshold", "pamr", "pamr_iterations", "pamr_dilations",
)
#: Each split's index: the rows Hugging Face's imagefolder (and the loaders in docs/dataset.md) read.
INDEX = "metadata.jsonl"
#: The files at the dataset's root, besides the lock.
_ROOT_FILES = (fmt.MANIFEST, "classes.txt", "id2label.json", "labelmap.txt")
#: The index is refreshed after this many new samples, or this many seconds, whichever is first.
INDEX_EVERY_SAMPLES = 25
INDEX_EVERY_SECONDS = 60.0


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
    """A sample's ``meta/<id>.json``, checked: its id is the file's name, its image and mask are
    that id's files (``images/<id>.<ext>``, ``masks/<id>.png``: a hand-edited meta file never
    makes a writer replace or delete another sample's files), and the fields a writer uses have
    their types."""
    try:
        meta = read_json(path)
    except OSError as exc:
        raise DatasetError(describe_os_error(exc, path)) from None
    image_id = path.name[: -len(".json")]
    image_prefix = f"images/{image_id}."
    source = meta.get("source") if isinstance(meta, dict) else None
    index = meta.get("slice") if isinstance(meta, dict) else None
    image = meta.get("image") if isinstance(meta, dict) else None
    problem = (
        "it is not a JSON object" if not isinstance(meta, dict)
        else f"its id must be {image_id!r}, the file's name" if meta.get("id") != image_id
        else f"its image must be images/{image_id}.<ext>" if not (
            isinstance(image, str) and image.startswith(image_prefix) and image[len(image_prefix) :].isalnum()
        )
        else f"its mask must be masks/{image_id}.png" if meta.get("mask") != f"masks/{image_id}.png"
        else "its source must be an object with text sha256 and path" if source is not None and not (
            isinstance(source, dict) and all(isinstance(source.get(key), (str, type(None))) for key in ("sha256", "path"))
        )
        else "its slice must be a list of whole numbers" if index is not None and not (
            isinstance(index, list) and all(is_int(i, 0, 2**31) for i in index)
        )
        else "its edits must be an object" if not isinstance(meta.get("edits", {}), (dict, type(None)))
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


def is_edited(meta: dict[str, Any]) -> bool:
    """Whether a person touched a stored sample (painted, set pixels to ignore, or reviewed it)."""
    edits = meta.get("edits") or {}
    return bool(edits.get("painted_pixels") or edits.get("ignored_pixels")) or meta.get(
        "review_status", "unreviewed"
    ) != "unreviewed"


Identity = tuple[str | None, tuple[int, ...] | None]  # (source SHA-256, slice index)


def identity_of(meta: dict[str, Any]) -> Identity:
    """What makes two samples the same image: the source's SHA-256 and the slice of it."""
    index = meta.get("slice")
    return (meta.get("source") or {}).get("sha256"), tuple(index) if index is not None else None


def _encode_png(array: np.ndarray, handle: BinaryIO) -> None:
    from PIL import Image

    Image.fromarray(array).save(handle, format="PNG")


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

    Classes keep their training ids; those of new classes come after the existing ones.  The
    vocabulary version (recorded in the manifest and with every sample written) is 1 for a new
    dataset, and goes up by one when the current vocabulary differs from the dataset's.

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
    ):
        self.root = Path(root).expanduser()
        self.previous: dict[str, Any] | None = None  # the manifest as last written or read
        self._lock: DatasetLock | None = None
        self._created = False  # this writer made the dataset (and removes it if it fails empty)
        self._made: list[Path] = []
        self._samples: dict[str, tuple[str, dict[str, Any]]] = {}  # id -> (split, meta)
        self._ids: dict[Identity, str] = {}
        self._unindexed, self._indexed_at = 0, time.monotonic()
        with reporting_os_errors(self.root):
            self._refuse_foreign_folder()
            self._made = make_folders(self.root)
            try:
                self._lock = DatasetLock(self.root)
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
        self._scan()
        changed = (
            self._created
            or self.train_ids != train_ids
            or self.registry.to_json() != before[0]
            or self.vocabulary_version != self.previous.get("vocabulary_version", 1)
        )
        # New classes reach the manifest before any mask uses them; an index that an interrupted
        # run left behind catches up with its samples.
        if changed or not all(self._index_is_current(split) for split in self._splits()):
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

    def _scan(self) -> None:
        """Read every sample's meta file (the owner's view of the dataset from now on)."""
        for split in SPLIT_NAMES:
            for image_id in meta_ids(self.root, split):
                path = resolve_inside(self.root, f"{split}/meta/{image_id}.json")
                meta = read_meta(path)
                for relative in (meta["image"], meta["mask"]):
                    if not resolve_inside(self.root, f"{split}/{relative}").is_file():
                        raise DatasetError(f"{path} names {relative}, which is missing")
                self._remember(image_id, split, meta)

    def _remember(self, image_id: str, split: str, meta: dict[str, Any]) -> None:
        self._samples[image_id] = (split, meta)
        identity = identity_of(meta)
        if identity[0] is not None and meta["source"].get("path"):  # a file keeps its id under any name
            self._ids[identity] = image_id

    def _splits(self) -> list[str]:
        return sorted({split for split, _ in self._samples.values()}, key=SPLIT_NAMES.index)

    # -- ids ---------------------------------------------------------------------------------------

    def existing_meta(self, image_id: str) -> tuple[str, dict] | None:
        """``(split, meta)`` of a sample already in the dataset, if any."""
        return self._samples.get(image_id)

    def samples_by_source(self) -> dict[str, dict[tuple[int, ...] | None, dict]]:
        """``sha256 -> {slice index or None: meta}`` of every stored sample (a 2D image has one
        entry, ``None``; a stack one per 2D slice)."""
        found: dict[str, dict[tuple[int, ...] | None, dict]] = {}
        for _, meta in self._samples.values():
            sha, index = identity_of(meta)
            if sha:
                found.setdefault(sha, {})[index] = meta
        return found

    def image_id(self, stem: str, identity: Identity) -> str:
        """The id of the image ``identity``: the one an image file already has in the dataset,
        else ``stem`` (made safe), unless another image has that; then the stem plus the start of
        the image's SHA-256 (longer starts if needed).  Images from no file are known by name and
        pixels: the same name with other pixels is another sample, never written over."""
        if identity in self._ids:
            return self._ids[identity]
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem).strip(".") or "image"
        sha = identity[0]
        for candidate in (safe, *(f"{safe}-{sha[:n]}" for n in (8, 16, 64) if sha)):
            found = self._samples.get(candidate)
            if found is None or identity_of(found[1]) == identity:
                return candidate
        raise DatasetError(f"no free id for {stem!r} in {self.root}: rename the image")

    # -- writing -----------------------------------------------------------------------------------

    def write(self, sample: Sample) -> str:
        """Write one sample (all its files, or none); returns its id."""
        with reporting_os_errors(self.root):
            self._lock.check()
            return self._write(sample)

    def _write(self, sample: Sample) -> str:
        labels = np.asarray(sample.labels)
        if labels.ndim != 2:
            raise DatasetError(f"labels of {sample.stem!r} must be 2D, got shape {labels.shape}")
        if sample.source is None and sample.image is None:
            raise DatasetError(f"sample {sample.stem!r} needs its image as an array, or a PNG or JPEG file")
        for name, plane in (("confidence", sample.confidence), ("edited", sample.edited)):
            if plane is not None and np.shape(plane) != labels.shape:
                raise DatasetError(f"{name} of {sample.stem!r} has shape {np.shape(plane)}, its labels {labels.shape}")
        carried = dict(sample.meta)
        source = carried.pop("source", None) or _source(sample, labels)
        image_id = self.image_id(sample.stem, identity_of({"source": source, "slice": carried.get("slice")}))
        previous = self._samples.get(image_id)
        split = previous[0] if previous else assign_split(image_id, self.ratios)
        copied = (
            sample.source is not None
            and sample.source.suffix.lower() in COPIED_SUFFIXES
            # A turned photo is stored as the pixels its labels were made on: loaders that apply
            # EXIF (Hugging Face, MMSegmentation, Detectron2) and those that do not (torchvision,
            # Datumaro) must all see the mask's frame.
            and (sample.image is None or exif_orientation(sample.source) == 1)
        )
        image_name = f"images/{image_id}{sample.source.suffix.lower() if copied else '.png'}"

        folder = resolve_inside(self.root, split)
        staging = None if folder.is_dir() else temporary_path(folder)  # a split's first sample
        staged: list[tuple[Path, Path]] = []  # (temporary, final)

        def place(relative: str) -> Path:
            return staging / relative if staging else resolve_inside(self.root, f"{split}/{relative}")

        def stage(relative: str, write) -> None:
            staged.append((write_temporary(place(relative), write), place(relative)))

        try:
            if staging:
                staging.mkdir()
            for sub in _FOLDERS:
                place(sub).mkdir(exist_ok=True)
            # One full-size plane at a time: each is encoded as soon as it is made.
            if copied:
                stage(image_name, partial(_copy, sample.source))
            else:
                stage(image_name, partial(_encode_png, storable_image(sample.image)))
            stage(f"masks/{image_id}.png", partial(_encode_png, fmt.labels_to_mask(labels, self.train_ids)))
            if sample.confidence is not None:
                stage(f"confidence/{image_id}.png", partial(_encode_png, _confidence_levels(sample.confidence)))
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
                "vocabulary_version": carried.get("vocabulary_version", self.vocabulary_version),
            }
            meta.update((key, value) for key, value in carried.items() if key not in meta)
            text = json.dumps(meta, indent=2, ensure_ascii=False, default=str) + "\n"
            meta = json.loads(text)  # as a reader will see it (tuples as lists, ...)
            stage(f"meta/{image_id}.json", partial(_write_bytes, text.encode("utf-8")))
            for temporary, final in staged:  # the meta file last
                os.replace(temporary, final)
            staged.clear()
            if staging:
                atomic_write_bytes(staging / INDEX, _index_rows([meta]).encode("utf-8"))
                os.rename(staging, folder)
                staging = None
        except BaseException:
            for temporary, _ in staged:
                temporary.unlink(missing_ok=True)
            if staging:
                shutil.rmtree(staging, ignore_errors=True)
            raise

        self._remember(image_id, split, meta)
        if previous and previous[1]["image"] != image_name:  # e.g. .jpg before, .png now
            self._write_index(split)  # the index names the new image before the old one goes
            resolve_inside(self.root, f"{split}/{previous[1]['image']}").unlink(missing_ok=True)
        self._unindexed += 1
        if self._unindexed >= INDEX_EVERY_SAMPLES or time.monotonic() - self._indexed_at > INDEX_EVERY_SECONDS:
            self.rebuild_index()
        return image_id

    # -- the owner's files -------------------------------------------------------------------------

    def _index_text(self, split: str) -> str:
        return _index_rows([meta for sample_split, meta in self._samples.values() if sample_split == split])

    def _index_is_current(self, split: str) -> bool:
        try:
            return resolve_inside(self.root, f"{split}/{INDEX}").read_text(encoding="utf-8") == self._index_text(split)
        except (FileNotFoundError, UnicodeDecodeError):
            return False

    def _write_index(self, split: str) -> None:
        atomic_write_bytes(resolve_inside(self.root, f"{split}/{INDEX}"), self._index_text(split).encode("utf-8"))

    def rebuild_index(self) -> dict[str, int]:
        """Rewrite every split's ``metadata.jsonl``, ``dataset.json`` and the class files from the
        samples; returns the number of samples per split."""
        with reporting_os_errors(self.root):
            self._lock.check()
            counts = {}
            for split in self._splits():
                self._write_index(split)
                counts[split] = sum(sample_split == split for sample_split, _ in self._samples.values())
            models = []
            for _, meta in sorted(self._samples.values(), key=lambda item: item[1]["id"]):
                model = {key: meta[key] for key in _MODEL_KEYS if key in meta}
                if model and model not in models:
                    models.append(model)
            # Another program may have taken the dataset over while this one was paused after the
            # check above: what is on disk now joins what this one writes, so no class is lost.
            self.train_ids = fmt.merge_stored_classes(self.root, self.registry, self.train_ids)
            manifest = fmt.build_manifest(
                self.registry, self.train_ids, self.ratios, models, self.vocabulary_version, self.previous
            )
            manifest["splits"]["counts"] = counts
            fmt.write_manifest(self.root, manifest)  # the manifest first: a new dataset is one from now on
            fmt.write_class_files(self.root, self.registry, self.train_ids)
            self.previous = manifest
            self._unindexed, self._indexed_at = 0, time.monotonic()
        return counts

    # -- closing -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Bring the index up to date and give the dataset up (idempotent)."""
        if not self._release.alive:
            return
        try:
            if self._unindexed:
                self.rebuild_index()
        finally:
            self._release()

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
        elif self._created and not self._samples:
            self._abandon()
        else:
            # Keep what was written, index it if the disk still allows, and let the original
            # error be the one reported.
            try:
                self.close()
            except DatasetError:
                pass

    def _abandon(self) -> None:
        """Undo a dataset this writer created and wrote no sample into, and give it up."""
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


def _holds_only_leftovers(folder: Path) -> bool:
    """Whether ``folder`` is empty but for a lock and temporary files (a killed writer's)."""
    with os.scandir(folder) as entries:
        return all(entry.name == LOCK_NAME or temporary_writer(entry.name) for entry in entries)


def _merge_classes(stored: ClassRegistry, registry, vocabulary, manifest: Path) -> ClassRegistry:
    """The classes to write with: ``vocabulary`` adopted into the dataset's (by name), or
    ``registry`` with the dataset's classes added (by uid)."""
    if vocabulary is not None:
        stored.update(tuple(tuple(names) for names in vocabulary))
        return stored
    registry = registry if registry is not None else ClassRegistry()
    for uid, names in stored.names.items():
        if uid in registry.names and registry.names[uid][0].casefold() != names[0].casefold():
            raise DatasetError(
                f"label {uid} is {names[0]!r} in {manifest} but {registry.names[uid][0]!r} here; open that dataset "
                "in napari and label with its classes, or choose another folder"
            )
        registry.names.setdefault(uid, names)
    return registry


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


def _write_bytes(data: bytes, handle: BinaryIO) -> None:
    handle.write(data)


def _copy(source: Path, handle: BinaryIO) -> None:
    with open(source, "rb") as original:
        shutil.copyfileobj(original, handle)


def _index_rows(metas: list[dict[str, Any]]) -> str:
    """``metadata.jsonl``: one row per sample, in id order."""
    rows = [
        {"file_name": meta["image"], "label_file_name": meta["mask"], "id": meta["id"],
         "review_status": meta.get("review_status", "unreviewed")}
        for meta in sorted(metas, key=lambda meta: meta["id"])
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
