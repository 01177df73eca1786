"""napari reader for pseudo-label datasets: a dataset folder, or one of its images, opens as
image + labels layers with class names, colours, confidence and the person-edited mask, so that
editing continues where it stopped."""

from __future__ import annotations

from typing import Any, Callable

from napari_sclip.plugin.layers import class_colormap, class_features, confidence_name, labels_name

METADATA_KEY = "napari_sclip"


def get_reader(path: str | list[str]) -> Callable[[str], list[tuple]] | None:
    """npe2 reader hook: return a reader when ``path`` belongs to a napari-sclip dataset."""
    from napari_sclip.dataset.reader import find_dataset_root

    if isinstance(path, list):
        return None
    return read_dataset if find_dataset_root(path) is not None else None


def read_dataset(path: str) -> list[tuple[Any, dict, str]]:
    """Layers for every sample of a dataset folder, or for the one image given."""
    from napari_sclip.dataset import format as fmt
    from napari_sclip.dataset.reader import find_dataset_root, read_sample, sample_ids

    root, only = find_dataset_root(path)
    _, registry = fmt.read_manifest(root)
    wanted = [(split, image_id) for split, image_id in sample_ids(root) if only in (None, image_id)]
    layers: list[tuple[Any, dict, str]] = []
    for split, image_id in wanted:
        sample = read_sample(root, split, image_id, registry)
        rgb = sample.image.ndim == 3 and sample.image.shape[-1] in (3, 4)
        layers.append((sample.image, {"name": image_id, "rgb": rgb, "metadata": {"dataset": str(root), "split": split}}, "image"))
        if sample.confidence is not None:
            layers.append((sample.confidence, {"name": confidence_name(image_id), "colormap": "magma",
                                               "contrast_limits": (0.0, 1.0), "opacity": 0.6, "visible": False}, "image"))
        layers.append((
            sample.labels,
            {
                "name": labels_name(image_id),
                "colormap": class_colormap(registry),
                "features": class_features(registry),
                "metadata": {METADATA_KEY: {"classes": registry, "edited": sample.edited, "meta": sample.meta}},
            },
            "labels",
        ))
    return layers
