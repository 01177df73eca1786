"""The dataset's fixed files: the manifest (``dataset.json``), the class files that trainers and
annotation tools read, and the mapping between napari label values and training ids.

Label encoding
--------------
A napari label value is a class's permanent uid (:class:`napari_sclip.classes.ClassRegistry`).
Masks store *training ids*: 0, 1, 2, ... given to classes as they enter the dataset (in uid order
within one export) and never changed afterwards, so masks written earlier stay valid when classes
are added, and a class removed from a vocabulary keeps its id.  ``255`` means ignore/unlabelled
(uid 0, and classes without an id).  Above 254 classes masks become 16-bit, ignore = 65535.
"""

from __future__ import annotations

import json
import unicodedata
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from napari_sclip import __version__
from napari_sclip._files import atomic_write_bytes, describe_os_error
from napari_sclip.classes import ClassRegistry, label_dtype
from napari_sclip.colors import label_color
from napari_sclip.dataset.lock import STALE_SECONDS
from napari_sclip.dataset.paths import DatasetError, is_int, read_json, resolve_inside
from napari_sclip.dataset.splits import check_ratios

FORMAT_NAME = "napari-sclip-pseudo-labels"
FORMAT_VERSION = 1
MANIFEST = "dataset.json"
IGNORE_8BIT = 255
IGNORE_16BIT = 65535
#: The largest class uid (napari label value): 16-bit masks and label layers hold it.
MAX_UID = 65535


TrainIds = dict[int, int]  # uid -> training id


def extend_train_ids(train_ids: TrainIds, registry: ClassRegistry) -> TrainIds:
    """Keep every existing training id; give the registry's active classes that have none the next
    ids, in uid order."""
    extended = dict(train_ids)
    next_id = max(extended.values(), default=-1) + 1
    for uid in sorted(registry.active):
        if uid not in extended:
            extended[uid] = next_id
            next_id += 1
    return extended


def mask_dtype(train_ids: TrainIds) -> np.dtype:
    """uint8 while the training ids and the ignore value fit, else uint16 (with a warning)."""
    if len(train_ids) < IGNORE_8BIT:
        return np.dtype(np.uint8)
    warnings.warn(f"{len(train_ids)} classes do not fit 8-bit masks; writing 16-bit PNG masks", stacklevel=2)
    return np.dtype(np.uint16)


def ignore_value(dtype: np.dtype) -> int:
    return IGNORE_8BIT if np.dtype(dtype) == np.uint8 else IGNORE_16BIT


def labels_to_mask(labels: np.ndarray, train_ids: TrainIds) -> np.ndarray:
    """napari label values -> training-id mask.  Values without a training id become ignore.

    Works in bands of rows (:func:`row_bands`), so a huge int64 labels layer costs no more than the
    8-bit mask it becomes."""
    dtype = mask_dtype(train_ids)
    labels = np.asarray(labels)
    # One entry per uid, and one more for every value above them (and below 0): ignore.
    table = np.full(max(train_ids, default=0) + 2, ignore_value(dtype), dtype=dtype)
    for uid, train_id in train_ids.items():
        table[uid] = train_id
    mask = np.empty(labels.shape, dtype)
    for rows in row_bands(labels.shape):
        band = labels[rows]
        if not (band.dtype.kind == "u" and band.dtype.itemsize == 1 and len(table) >= 256):
            band = np.clip(band, -1, len(table) - 1)  # -1 and the top entry are ignore
        mask[rows] = table[band]
    return mask


def row_bands(shape: tuple[int, ...], elements: int = 1 << 22) -> list[slice]:
    """Slices of rows, each about ``elements`` values of a ``shape`` array: how the writer keeps
    its temporaries small on huge images."""
    height = shape[0] if shape else 0
    rows = max(1, elements // max(1, int(np.prod(shape[1:], dtype=np.int64))))
    return [slice(start, min(start + rows, height)) for start in range(0, height, rows)]


def value_counts(values: np.ndarray, length: int) -> np.ndarray:
    """Occurrences of each value 0 .. ``length - 1`` of an 8- or 16-bit array, in bands of rows
    (``np.bincount`` makes a 64-bit copy of what it counts: 8 bytes a pixel of a huge mask)."""
    counts = np.zeros(length, np.int64)
    for rows in row_bands(np.shape(values)):
        counts += np.bincount(np.asarray(values[rows]).ravel(), minlength=length)[:length]
    return counts


def mask_to_labels(mask: np.ndarray, train_ids: TrainIds) -> np.ndarray:
    """Training-id mask -> napari label values (ignore and unknown ids become 0)."""
    mask = np.asarray(mask)
    if mask.dtype not in (np.uint8, np.uint16):
        raise DatasetError(f"masks must be 8- or 16-bit, got {mask.dtype}")
    dtype = label_dtype(max(train_ids, default=0))
    table = np.zeros(np.iinfo(mask.dtype).max + 1, dtype)
    for uid, train_id in train_ids.items():
        if train_id < len(table):
            table[train_id] = uid
    # Each mask's own ignore value: an 8-bit mask written before the dataset grew past 254 classes
    # keeps 255 as ignore, although training id 255 is a class by now.
    table[ignore_value(mask.dtype)] = 0
    return table[mask]


def _write_text(path: Path, text: str) -> None:
    """Write a file of the dataset's root (never through a symbolic link)."""
    atomic_write_bytes(resolve_inside(path.parent, path.name), text.encode("utf-8"))


def write_class_files(root: Path, registry: ClassRegistry, train_ids: TrainIds) -> None:
    """``classes.txt`` (line i = training id i), ``id2label.json`` and CVAT/Datumaro
    ``labelmap.txt``, all in training-id order."""
    ordered = by_train_id(train_ids)
    names = [registry.display_name(uid) for uid in ordered]
    _write_text(root / "classes.txt", "".join(f"{name}\n" for name in names))
    id2label = {str(train_id): name for train_id, name in enumerate(names)}
    _write_text(root / "id2label.json", json.dumps(id2label, indent=2, ensure_ascii=False) + "\n")
    _write_text(root / "labelmap.txt", labelmap_text(zip(names, map(label_color, ordered))))


def by_train_id(train_ids: TrainIds) -> list[int]:
    """The uids in training-id order (training ids are 0..n-1)."""
    return sorted(train_ids, key=train_ids.__getitem__)


def labelmap_name(name: str) -> str:
    """``name`` as a ``labelmap.txt`` field: CVAT and Datumaro split lines at ``:``, skip lines
    that start with ``#`` and strip leading white space, with no escape.  So ``%``, ``:``, line
    breaks and other control characters, and a leading ``#`` or white space, are percent-encoded
    (``a:b`` -> ``a%3Ab``); ``urllib.parse.unquote`` gives the exact name back, and distinct
    names stay distinct."""
    from urllib.parse import quote

    def unsafe(index: int, char: str) -> bool:
        leading = index == 0 and (char == "#" or char.isspace())
        return leading or char in "%:" or unicodedata.category(char) in ("Cc", "Zl", "Zp")

    return "".join(quote(c, safe="") if unsafe(i, c) else c for i, c in enumerate(name))


def labelmap_text(entries) -> str:
    """CVAT / Datumaro ``labelmap.txt``: ``name:r,g,b::`` per ``(name, (r, g, b))``, names
    through :func:`labelmap_name`."""
    lines = ["# label:color_rgb:parts:actions"]
    lines += [f"{labelmap_name(name)}:{','.join(map(str, color))}::" for name, color in entries]
    return "\n".join(lines) + "\n"


def build_manifest(
    registry: ClassRegistry,
    train_ids: TrainIds,
    ratios: dict[str, float],
    models: list[dict[str, Any]],
    vocabulary_version: int,
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``dataset.json`` document.  ``previous`` keeps the creation time of an existing one."""
    from datetime import datetime, timezone

    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    dtype = np.dtype(np.uint8) if len(train_ids) < IGNORE_8BIT else np.dtype(np.uint16)
    return {
        "format": {"name": FORMAT_NAME, "version": FORMAT_VERSION},
        "tool": {"name": "napari-sclip", "version": __version__},
        "created": (previous or {}).get("created", now),
        "updated": now,
        "label_encoding": {
            "mask": "single-channel PNG of training ids",
            "dtype": dtype.name,
            "ignore_index": ignore_value(dtype),
            "training_ids": "given as classes enter the dataset, never changed; uid = napari label value",
        },
        "vocabulary_version": vocabulary_version,
        "classes": [
            {**entry, "train_id": train_ids.get(entry["uid"]), "color": list(label_color(entry["uid"]))}
            for entry in registry.to_json()
        ],
        "models": models,
        "splits": {"ratios": ratios},
    }


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    _write_text(root / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def read_manifest(root: Path) -> tuple[dict[str, Any], ClassRegistry, TrainIds]:
    """Read and check ``dataset.json``; returns it, its class registry and its training ids.

    Raises :class:`DatasetError` naming the file for anything missing, unreadable or malformed
    (types and ranges included: a uid is a label value 1..65535, as 16-bit masks hold).
    """
    path = resolve_inside(root, MANIFEST)
    try:
        manifest = read_json(path)
    except FileNotFoundError:
        if not root.is_dir():
            raise DatasetError(f"dataset folder {root} does not exist") from None
        raise DatasetError(f"{root} is not a napari-sclip dataset: {MANIFEST} is missing") from None
    except OSError as exc:
        raise DatasetError(describe_os_error(exc, path)) from None
    try:
        if manifest["format"]["name"] != FORMAT_NAME:
            raise DatasetError(f"{path} describes a {manifest['format']['name']!r} dataset, not {FORMAT_NAME!r}")
        version = int(manifest["format"]["version"])
        if version > FORMAT_VERSION:
            raise DatasetError(f"{path} has format version {version}; this napari-sclip reads up to {FORMAT_VERSION}")
        _check_classes(path, manifest["classes"])
        registry = ClassRegistry.from_json(manifest["classes"])
        train_ids = {c["uid"]: c["train_id"] for c in manifest["classes"] if c.get("train_id") is not None}
        if sorted(train_ids.values()) != list(range(len(train_ids))):
            raise DatasetError(f"{path} has training ids that are not 0..{len(train_ids) - 1}")
        if not is_int(manifest.get("vocabulary_version", 1), 1, 2**63 - 1):
            raise DatasetError(f"{path} is malformed: vocabulary_version must be a positive whole number")
        try:
            check_ratios(manifest["splits"]["ratios"])
        except DatasetError as exc:
            raise DatasetError(f"{path} is malformed: {exc}") from None
    except DatasetError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DatasetError(f"{path} is malformed ({type(exc).__name__}: {exc})") from None
    return manifest, registry, train_ids


def _check_classes(path: Path, classes: Any) -> None:
    """Raise :class:`DatasetError` unless ``classes`` is a list of class entries whose uids are
    distinct label values and whose fields have their types."""
    if not isinstance(classes, list):
        raise DatasetError(f"{path} is malformed: 'classes' must be a list")
    seen = set()
    for entry in classes:
        uid = entry.get("uid") if isinstance(entry, dict) else None
        if not is_int(uid, 1, MAX_UID) or uid in seen:
            raise DatasetError(
                f"{path} is malformed: class uid {uid!r} is not a distinct label value 1..{MAX_UID}"
            )
        seen.add(uid)
        synonyms = entry.get("synonyms", [])
        if (
            not isinstance(entry.get("name"), str)
            or not (isinstance(synonyms, list) and all(isinstance(name, str) for name in synonyms))
            or not (entry.get("position") is None or is_int(entry["position"], 0, 2**31))
            or not (entry.get("train_id") is None or is_int(entry["train_id"], 0, 2**31))
        ):
            raise DatasetError(
                f"{path} is malformed: class {uid} needs a text name, a list of text synonyms, "
                "and whole numbers (or null) as position and train_id"
            )


def merge_stored_classes(root: Path, registry: ClassRegistry, train_ids: TrainIds) -> TrainIds:
    """Add the classes of the manifest on disk now to ``registry`` (in place) and return
    ``train_ids`` with theirs: what an owner writes keeps every class and training id that is
    there, also when another program took the dataset over while this one was paused.  A uid
    that names another class there, or a training id given to another uid, is a
    :class:`DatasetError` and nothing is changed."""
    if not resolve_inside(root, MANIFEST).exists():
        return train_ids
    _, stored, stored_ids = read_manifest(root)
    path = root / MANIFEST
    for uid, names in stored.names.items():
        mine = registry.names.get(uid)
        if mine is not None and mine[0].casefold() != names[0].casefold():
            raise DatasetError(_changed_meanwhile(path, f"label {uid} is {names[0]!r} there but {mine[0]!r} here"))
    merged, holders = dict(train_ids), {train_id: uid for uid, train_id in train_ids.items()}
    for uid, train_id in stored_ids.items():
        if merged.setdefault(uid, train_id) != train_id or holders.setdefault(train_id, uid) != uid:
            raise DatasetError(_changed_meanwhile(path, f"training id {train_id} belongs to another class there"))
    for uid, names in stored.names.items():
        registry.names.setdefault(uid, names)
    return merged


def _changed_meanwhile(path: Path, what: str) -> str:
    return (
        f"{path} was changed by another program while this run held the dataset (it was taken over: "
        f"paused for more than {STALE_SECONDS:.0f} s?): {what}; this run stopped writing, run it again"
    )
