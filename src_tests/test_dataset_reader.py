"""Datasets come back into napari: the reader opens a review whose layers hold the stored labels
(as uids), edits and confidence; saving and exporting write back what was read."""

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


@pytest.fixture
def viewer(display, make_napari_viewer):
    return make_napari_viewer(show=True)


@pytest.mark.gui
def test_the_reader_opens_a_review_whose_layers_hold_the_stored_sample(dataset, viewer, qtbot):
    from napari_sclip.plugin.records import RECORDS
    from napari_sclip.plugin.review_panel import PANEL_NAME

    root, registry, labels, edited = dataset
    reader = get_reader(str(root / "dataset.json"))
    assert reader is not None and get_reader(str(root)) is reader
    assert get_reader([str(root / "dataset.json")]) is reader  # napari passes a one-path list too
    assert viewer.open(str(root / "dataset.json"), plugin=None) == []  # the review's layers, not napari's
    panel = viewer.window.dock_widgets[PANEL_NAME]
    qtbot.waitUntil(lambda: panel.session is not None and not panel.session.opening, timeout=20_000)
    session = panel.session
    assert session.ids == ["other", "astronaut"]  # unreviewed first, then edited
    session.goto("astronaut")
    assert [layer.name for layer in viewer.layers] == ["astronaut", "astronaut confidence", "astronaut labels"]
    layer = viewer.layers["astronaut labels"]
    np.testing.assert_array_equal(layer.data, labels)  # uids come back exactly
    state = RECORDS.get(layer).state
    assert state.classes == registry
    np.testing.assert_array_equal(state.edited, edited)
    assert dict(zip(layer.features["index"], layer.features["class_name"]))[4] == "rocket"
    np.testing.assert_allclose(viewer.layers["astronaut confidence"].data, 64 / 255)
    assert LabelsState.from_metadata(layer.metadata, layer.data).classes == registry  # what an export reads
    session.close()


def test_reader_declines_other_paths(dataset, tmp_path):
    root = dataset[0]
    (tmp_path / "plain").mkdir()
    assert get_reader(str(tmp_path / "plain")) is None
    assert get_reader([str(root), str(root)]) is None
    assert get_reader(str(next(root.glob("*/images/other.png")))) is None  # images open as images
    assert get_reader(str(root / "classes.txt")) is None


@pytest.mark.gui
def test_a_missing_mask_is_named_and_a_damaged_one_leaves_the_rest_open(dataset, viewer):
    from napari_sclip.plugin.review import open_review

    root = dataset[0]
    mask = next(root.glob("*/masks/other.png"))
    kept = mask.read_bytes()
    mask.unlink()
    with pytest.raises(DatasetError, match="other.png"):  # the owner's scan refuses an incomplete sample
        open_review(viewer, root)
    mask.write_bytes(b"not a png" + kept[:10])
    session = open_review(viewer, root)  # "other" comes first in the queue
    assert "other.png" in session.open_error and session.current_id is None
    with pytest.raises(DatasetError, match="other.png"):
        session.goto("other")
    session.goto("astronaut")
    assert session.current_id == "astronaut"
    session.close()


@pytest.mark.gui
def test_saving_every_sample_unchanged_gives_identical_files(dataset, viewer, tmp_path):
    """The review's save path (marking and unmarking rewrites each sample) changes no file but
    time stamps, for a sample with a copied source, edits, confidence and a retired class."""
    import shutil

    from napari_sclip.plugin.review import open_review

    root = dataset[0]
    shutil.copytree(root, tmp_path / "before")
    session = open_review(viewer, root)
    for image_id in session.ids:
        session.goto(image_id)
        session.mark_reviewed(True)
        session.mark_reviewed(False)
    session.close()
    same_files_apart_from_timestamps(tmp_path / "before", root)
    for path in (tmp_path / "before").rglob("*"):
        if path.is_file() and path.suffix != ".json" and path.name != JOURNAL:
            assert path.read_bytes() == (root / path.relative_to(tmp_path / "before")).read_bytes(), path
    meta = json.loads(next(root.glob("*/meta/astronaut.json")).read_text())
    assert meta["review_status"] == "edited" and meta["source"]["path"].endswith("astronaut.png")


def test_exported_layers_round_trip_through_the_writer(dataset, tmp_path):
    """The widget's export path (layer data and metadata -> samples) writes what it read."""
    from napari_sclip.dataset.format import read_manifest
    from napari_sclip.dataset.reader import read_sample, sample_ids

    root = dataset[0]
    _, _, train_ids = read_manifest(root)
    items = []
    for split, image_id in sample_ids(root):
        sample = read_sample(root, split, image_id, train_ids)
        metadata: dict = {}
        LabelsState(dataset[1], sample.edited, {(): sample.meta}, "unreviewed").store(metadata)
        image_meta = {"name": image_id, "rgb": True, "metadata": {"dataset_image": str(root / split / sample.meta["image"])}}
        items += labelled_images(sample.image, image_meta, sample.labels, {"metadata": metadata}, sample.confidence)
    export_images(tmp_path / "again", items)
    same_files_apart_from_timestamps(root, tmp_path / "again")


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
