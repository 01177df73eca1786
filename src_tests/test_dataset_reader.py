"""Datasets come back into napari: reader layers, labels as uids, edits, and a round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from napari_sclip.classes import ClassRegistry
from napari_sclip.dataset.export import export_images
from napari_sclip.dataset.paths import DatasetError
from napari_sclip.dataset.writer import JOURNAL, DatasetWriter, Sample
from napari_sclip.plugin.io import get_reader, labelled_images
from napari_sclip.plugin.state import LabelsState

from conftest import natural_image, same_files_apart_from_timestamps


@pytest.fixture
def dataset(tmp_path):
    registry = ClassRegistry()
    registry.update((("person",), ("sky",), ("flag",)))
    registry.update((("person",), ("flag",), ("rocket",)))  # sky (2) retired, rocket = 4
    writer = DatasetWriter(tmp_path / "ds", registry)
    rng = np.random.default_rng(0)
    labels = rng.choice([0, 1, 3, 4], (40, 50)).astype(np.uint8)
    edited = np.zeros((40, 50), bool)
    edited[:4, :4] = True
    source = tmp_path / "astronaut.png"
    Image.fromarray(natural_image(40, 50)).save(source)
    writer.write(Sample("astronaut", labels, source=source, confidence=np.full((40, 50), 0.25), edited=edited))
    writer.write(Sample("other", np.ones((20, 30), np.uint8), image=natural_image(20, 30)))
    writer.rebuild_index()
    return tmp_path / "ds", registry, labels, edited


def test_reader_opens_a_dataset_from_its_manifest_or_folder(dataset):
    root, registry, labels, edited = dataset
    reader = get_reader(str(root / "dataset.json"))
    assert reader is not None and get_reader(str(root)) is reader
    assert get_reader([str(root / "dataset.json")]) is reader  # napari passes a one-path list too
    layers = reader(str(root / "dataset.json"))
    assert [meta["name"] for _, meta, _ in reader(str(root))] == [meta["name"] for _, meta, _ in layers]
    names = [meta["name"] for _, meta, _ in layers]
    assert names == ["astronaut", "astronaut confidence", "astronaut labels", "other", "other labels"]
    data, meta, kind = layers[2]
    assert kind == "labels"
    np.testing.assert_array_equal(data, labels)  # uids come back exactly
    state = LabelsState.from_metadata(meta["metadata"], data)
    assert state.classes == registry
    np.testing.assert_array_equal(state.edited, edited)
    assert dict(zip(meta["features"]["index"], meta["features"]["class_name"]))[4] == "rocket"
    np.testing.assert_allclose(layers[1][0], 64 / 255)


def test_reader_declines_other_paths(dataset, tmp_path):
    root = dataset[0]
    (tmp_path / "plain").mkdir()
    assert get_reader(str(tmp_path / "plain")) is None
    assert get_reader([str(root), str(root)]) is None
    assert get_reader(str(next(root.glob("*/images/other.png")))) is None  # images open as images
    assert get_reader(str(root / "classes.txt")) is None


def test_missing_mask_is_named(dataset):
    root = dataset[0]
    mask = next(root.glob("*/masks/other.png"))
    mask.unlink()
    with pytest.raises(DatasetError, match="other.png"):
        get_reader(str(root))(str(root))


def _export_layers(path, layers) -> None:
    """Export reader layers as the widget pairs them: "<image> labels" with "<image>" and its
    "<image> confidence"."""
    by_name = {meta["name"]: (data, meta) for data, meta, _ in layers}
    items = []
    for data, meta, kind in layers:
        if kind == "labels":
            image = meta["name"].removesuffix(" labels")
            confidence = by_name.get(f"{image} confidence", (None,))[0]
            items += labelled_images(*by_name[image], data, meta, confidence)
    export_images(path, items)


def test_export_import_export_gives_identical_files(dataset, tmp_path):
    """The napari path: the reader's layers, exported again, give the same files (in a new
    folder, and in place), timestamps apart."""
    root = dataset[0]
    _export_layers(tmp_path / "again", get_reader(str(root))(str(root)))
    same_files_apart_from_timestamps(root, tmp_path / "again")

    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    _export_layers(root, get_reader(str(root))(str(root)))  # in place
    same_files_apart_from_timestamps(root, tmp_path / "again")
    for path, data in before.items():
        if path.suffix != ".json" and path.name != JOURNAL:  # the journal holds the meta files' times
            assert path.read_bytes() == data, path
    meta = json.loads(next(root.glob("*/meta/astronaut.json")).read_text())
    assert meta["review_status"] == "edited" and meta["source"]["path"].endswith("astronaut.png")


def test_masks_of_a_dataset_that_grew_past_254_classes_keep_their_own_ignore(tmp_path):
    """An 8-bit mask written before the dataset grew keeps 255 as ignore, although training id
    255 is a class by then; napari gets 0 (unlabelled) there, not that class."""
    import warnings

    from napari_sclip.dataset import format as fmt
    from napari_sclip.dataset.reader import read_sample, sample_ids

    registry = ClassRegistry()
    registry.update((("a",), ("b",)))
    early = np.ones((20, 30), np.uint8)
    early[:5] = 0  # unlabelled: stored as 255 in the 8-bit mask
    with DatasetWriter(tmp_path / "ds", registry) as writer:
        writer.write(Sample("early", early, image=natural_image(20, 30)))
        writer.rebuild_index()
    grown = ClassRegistry()
    grown.update(tuple((name,) for name in ["a", "b", *(f"k{i}" for i in range(300))]))
    late = np.full((20, 30), 300, np.uint16)  # a uid whose training id is past 255
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with DatasetWriter(tmp_path / "ds", grown) as writer:
            writer.write(Sample("late", late, image=natural_image(20, 30)))
            writer.rebuild_index()
    _, _, train_ids = fmt.read_manifest(tmp_path / "ds")
    assert max(train_ids.values()) > 255
    samples = {image_id: read_sample(tmp_path / "ds", split, image_id, train_ids)
               for split, image_id in sample_ids(tmp_path / "ds")}
    np.testing.assert_array_equal(samples["early"].labels, early)
    np.testing.assert_array_equal(samples["late"].labels, late)
