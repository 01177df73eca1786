"""Datasets come back into napari: reader layers, labels as uids, edits, and a round trip."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from napari_sclip.classes import ClassRegistry
from napari_sclip.dataset.paths import DatasetError
from napari_sclip.dataset.writer import DatasetWriter, Sample
from napari_sclip.plugin.io import METADATA_KEY, get_reader

from conftest import natural_image


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


def test_reader_opens_a_dataset_folder(dataset):
    root, registry, labels, edited = dataset
    reader = get_reader(str(root))
    assert reader is not None
    layers = reader(str(root))
    names = [meta["name"] for _, meta, _ in layers]
    assert names == ["astronaut", "astronaut confidence", "astronaut labels", "other", "other labels"]
    data, meta, kind = layers[2]
    assert kind == "labels"
    np.testing.assert_array_equal(data, labels)  # uids come back exactly
    state = meta["metadata"][METADATA_KEY]
    assert state["classes"] == registry
    np.testing.assert_array_equal(state["edited"], edited)
    assert dict(zip(meta["features"]["index"], meta["features"]["class_name"]))[4] == "rocket"
    np.testing.assert_allclose(layers[1][0], 64 / 255)


def test_reader_opens_one_image_of_a_dataset(dataset):
    root = dataset[0]
    image = next(root.glob("*/images/other.png"))
    layers = get_reader(str(image))(str(image))
    assert [meta["name"] for _, meta, _ in layers] == ["other", "other labels"]


def test_reader_declines_other_paths(tmp_path):
    (tmp_path / "plain").mkdir()
    assert get_reader(str(tmp_path / "plain")) is None
    assert get_reader([str(tmp_path)]) is None


def test_missing_mask_is_named(dataset):
    root = dataset[0]
    mask = next(root.glob("*/masks/other.png"))
    mask.unlink()
    with pytest.raises(DatasetError, match="other.png"):
        get_reader(str(root))(str(root))


def test_export_import_export_gives_identical_files(dataset, tmp_path):
    """Writing what was read gives the same masks, provenance and confidence."""
    root, registry, _, _ = dataset
    layers = get_reader(str(root))(str(root))
    again = DatasetWriter(tmp_path / "again", layers[2][1]["metadata"][METADATA_KEY]["classes"])
    again.write(Sample("astronaut", layers[2][0], image=layers[0][0], confidence=layers[1][0],
                       edited=layers[2][1]["metadata"][METADATA_KEY]["edited"]))
    again.write(Sample("other", layers[4][0], image=layers[3][0]))
    again.rebuild_index()
    for folder in ("masks", "provenance", "confidence"):
        for first in root.glob(f"*/{folder}/*.png"):
            second = tmp_path / "again" / first.relative_to(root)
            np.testing.assert_array_equal(np.asarray(Image.open(second)), np.asarray(Image.open(first)))
    for name in ("classes.txt", "id2label.json", "labelmap.txt"):
        assert (tmp_path / "again" / name).read_text() == (root / name).read_text()
