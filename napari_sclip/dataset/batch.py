"""Pseudo-labelling image files into a dataset, the engine's way (no napari): what
``napari-sclip segment`` runs, usable from Python as well.

A run holds the dataset while it runs (another run into the same folder is refused), and can be
stopped at any moment and started again: each image's files are written atomically
(:class:`~napari_sclip.dataset.writer.DatasetWriter`, which writes a new dataset's manifest first),
the index is refreshed as the run goes, and an image whose SHA-256 is already in the dataset is
skipped.  With ``overwrite`` such an image is labelled again, unless a person edited or reviewed
it: those masks are never replaced.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from napari_sclip._files import describe_os_error
from napari_sclip.dataset.export import plane_stem
from napari_sclip.dataset.writer import DatasetWriter, Sample, is_edited, sha256_of

if TYPE_CHECKING:
    from napari_sclip.engine.progress import ProgressCallback
    from napari_sclip.engine.segmenter import Segmenter
    from napari_sclip.engine.vocabulary import Vocabulary

Status = Literal["written", "skipped", "kept", "failed"]


@dataclass(frozen=True)
class BatchItem:
    """What happened to one image file.

    ``status`` is ``"written"`` (labelled now), ``"skipped"`` (already in the dataset),
    ``"kept"`` (already there and edited or reviewed by a person, so not labelled again even with
    ``overwrite``) or ``"failed"`` (unreadable or unusable image; ``reason`` says why).
    ``image_ids`` are the samples it has in the dataset: one, or one per 2D slice of a stack.
    ``reason`` is one line that starts with the file's path.
    """

    path: Path
    status: Status
    image_ids: tuple[str, ...] = ()
    reason: str = ""


def label_images(
    paths: Sequence[Path],
    vocabulary: Vocabulary,
    root: str | Path,
    segmenter: Segmenter,
    *,
    options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    ratios: Mapping[str, float] | None = None,
    progress: ProgressCallback | None = None,
) -> Iterator[BatchItem]:
    """Segment the images at ``paths`` into the dataset at ``root``, yielding one
    :class:`BatchItem` per file as it is done.  Stacks are segmented slice by slice, one sample
    per 2D slice (:func:`~napari_sclip.engine.image.image_layout` says which axes are slices).

    Parameters
    ----------
    options
        Keyword arguments for :meth:`Segmenter.segment` (short side, window, threshold, ...).
    overwrite
        Label images already in the dataset again (never those a person edited or reviewed).
    ratios
        Split ratios for a new dataset; an existing one keeps its own.
    progress
        Called with the engine's :class:`~napari_sclip.engine.progress.Progress` reports for the
        slice being labelled, and with ``Progress("slices", done, total)`` for the file being
        labelled: once its slices are known (``done`` 0) and after each of them.

    Raises
    ------
    DatasetError
        ``root`` is not a dataset (nor empty), its manifest is damaged, another process holds it,
        or it cannot be written (read-only, full, vanished).
    SclipError
        The model cannot be loaded or the options are wrong (bad images only fail their own item).
    """
    from napari_sclip.engine.errors import ImageError
    from napari_sclip.engine.progress import Progress
    from napari_sclip.io.images import read_with_layout

    report = progress or (lambda step: None)
    with DatasetWriter(root, ratios=dict(ratios) if ratios else None, vocabulary=vocabulary.classes) as writer:
        # Segmenter label value -> uid, in the smallest dtype (the labels of huge images are big).
        active = [0, *writer.registry.active]
        uids = np.array(active, dtype=np.min_scalar_type(max(active)))
        stored = writer.samples_by_source()
        for path in paths:
            path = Path(path)
            try:
                sha = sha256_of(path)
            except OSError as exc:
                yield BatchItem(path, "failed", reason=describe_os_error(exc, path))
                continue
            done = stored.setdefault(sha, {})  # plane index (None for a 2D image) -> meta
            if _keep(done.get(None), overwrite):  # a 2D image already there: no need to read it
                yield BatchItem(path, "kept" if overwrite else "skipped", (done[None]["id"],))
                continue
            try:
                image, layout = read_with_layout(path)
            except ImageError as exc:
                yield BatchItem(path, "failed", reason=str(exc))
                continue
            ids, written, where = [], 0, ""
            report(Progress("slices", 0, layout.count))
            try:
                for index in layout.indices():
                    if _keep(done.get(index), overwrite):  # not even read (a compressed page is decoded)
                        ids.append(done[index]["id"])
                        report(Progress("slices", len(ids), layout.count))
                        continue
                    where = f" (slice {', '.join(map(str, index))})" if index is not None else ""
                    plane = layout.plane(image, index or ())
                    result = segmenter.segment(plane, vocabulary, progress=progress, **dict(options or {}))
                    image_id = writer.write(_sample(path, sha, image, index, plane, uids[result.labels], result))
                    done[index] = writer.existing_meta(image_id)[1]
                    ids.append(image_id)
                    written += 1
                    report(Progress("slices", len(ids), layout.count))
            except ImageError as exc:
                yield BatchItem(path, "failed", tuple(ids), reason=f"{path}{where}: {exc}")
                continue
            status = "written" if written else "kept" if overwrite else "skipped"
            yield BatchItem(path, status, tuple(ids))


def _keep(meta: dict | None, overwrite: bool) -> bool:
    """Whether a stored sample stays as it is: always without ``overwrite``, and when a person
    edited or reviewed it."""
    return meta is not None and (not overwrite or is_edited(meta))


def _sample(path: Path, sha: str, image: np.ndarray, index, plane: np.ndarray, labels, result) -> Sample:
    """A 2D image keeps its file (copied when PNG or JPEG; others stored as PNG of ``plane``, its
    channels last); a stack's slice is stored as PNG, its meta naming the file and the slice."""
    if index is None:
        return Sample(path.stem, labels, image=plane, source=path, source_sha256=sha,
                      confidence=result.confidence, meta=dict(result.params))
    source = {"path": str(path), "sha256": sha, "shape": list(image.shape), "dtype": str(image.dtype)}
    return Sample(plane_stem(path.stem, index), labels, image=plane, confidence=result.confidence,
                  meta={"source": source, "slice": list(index), **result.params})
