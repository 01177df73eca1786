"""napari reader and writer for pseudo-label datasets.

A dataset (its ``dataset.json``, or its folder when a caller names this plugin) opens as image + labels layers with class names, colours,
confidence and the person-edited mask, so that editing continues where it stopped.  Labels
layers (with their images) save as a dataset.
"""

from __future__ import annotations

from typing import Any, Callable

from napari_sclip.plugin.layers import class_colormap, class_features, confidence_name, labels_name

METADATA_KEY = "napari_sclip"


def get_reader(path: str | list[str]) -> Callable[[str], list[tuple]] | None:
    """npe2 reader hook: a reader for a napari-sclip dataset's manifest (or folder), else ``None``."""
    from napari_sclip.dataset.reader import find_dataset_root

    if isinstance(path, list):
        path = path[0] if len(path) == 1 else None
    return read_dataset if path is not None and find_dataset_root(path) is not None else None


def read_dataset(path: str) -> list[tuple[Any, dict, str]]:
    """Layers for every sample of the dataset at ``path`` (its folder or its manifest)."""
    from napari_sclip.dataset import format as fmt
    from napari_sclip.dataset.reader import find_dataset_root, read_sample, sample_ids

    root = find_dataset_root(path)
    if root is None:
        from napari_sclip.dataset.paths import DatasetError

        raise DatasetError(f"{path} is not a napari-sclip dataset (no {fmt.MANIFEST} of this format)")
    _, registry, train_ids = fmt.read_manifest(root)
    layers: list[tuple[Any, dict, str]] = []
    for split, image_id in sample_ids(root):
        sample = read_sample(root, split, image_id, train_ids)
        rgb = sample.image.ndim == 3 and sample.image.shape[-1] in (3, 4)
        stored_image = root / split / sample.meta["image"]
        layers.append((sample.image, {"name": image_id, "rgb": rgb, "metadata": {"dataset_image": str(stored_image)}}, "image"))
        if sample.confidence is not None:
            layers.append((sample.confidence, {"name": confidence_name(image_id), "colormap": "magma",
                                               "contrast_limits": (0.0, 1.0), "opacity": 0.6, "visible": False}, "image"))
        layers.append((
            sample.labels,
            {
                "name": labels_name(image_id),
                "colormap": class_colormap(registry),
                "features": class_features(registry),
                "metadata": {METADATA_KEY: {
                    "classes": registry, "edited": sample.edited, "meta": sample.meta,
                    "review_status": sample.meta.get("review_status", "unreviewed"),
                }},
            },
            "labels",
        ))
    return layers


def labelled_image(image_data, image_meta: dict, labels_data, labels_meta: dict, confidence=None):
    """A :class:`~napari_sclip.dataset.export.LabelledImage` from napari layer data and metadata.

    A labels layer napari-sclip did not make gets classes named after its values ("label 3").
    """
    from pathlib import Path

    import numpy as np

    from napari_sclip.classes import ClassRegistry
    from napari_sclip.dataset.export import LabelledImage

    state = labels_meta.get("metadata", {}).get(METADATA_KEY, {})
    registry = state.get("classes")
    if registry is None:
        registry = ClassRegistry()
        values = [int(v) for v in np.unique(np.asarray(labels_data)) if v != 0]
        registry.names = {v: (f"label {v}",) for v in values}
        registry.active = values
    edits = state.get("edits")
    edited = edits.mask if edits is not None else state.get("edited")
    # A 2D image read from a file (or from a dataset) is copied as is; stacks go slice by slice.
    source = (image_meta.get("metadata") or {}).get("dataset_image") or (image_meta.get("source") or {}).get("path")
    source_path = Path(source) if source and Path(source).is_file() and np.ndim(labels_data) == 2 else None
    return LabelledImage(
        name=image_meta["name"],
        image=image_data,
        labels=labels_data,
        registry=registry,
        rgb=bool(image_meta.get("rgb", False)),
        confidence=confidence,
        edited=edited,
        source=source_path,
        # What the dataset knew of this image, updated by any run made since it was opened.
        meta={**state.get("meta", {}), **state.get("params", {}),
              **({"review_status": state["review_status"]} if "review_status" in state else {})},
    )


def write_dataset(path: str, layer_data: list[tuple[Any, dict, str]]) -> list[str]:
    """npe2 writer hook: save labels layers, each with the image layer it was made from (named
    "<image>" for "<image> labels"), as a dataset folder at ``path``."""
    from napari_sclip.dataset.export import export_images
    from napari_sclip.dataset.paths import DatasetError

    images = {meta["name"]: (data, meta) for data, meta, kind in layer_data if kind == "image"}
    items = []
    for data, meta, kind in layer_data:
        if kind != "labels":
            continue
        image_name = meta["name"].removesuffix(" labels")
        if image_name not in images:
            raise DatasetError(f"select the image layer {image_name!r} together with {meta['name']!r} to save a dataset")
        image_data, image_meta = images[image_name]
        confidence = images.get(confidence_name(image_name), (None, None))[0]
        items.append(labelled_image(image_data, image_meta, data, meta, confidence))
    export_images(path, items)
    return [path]
