"""napari opens and saves files as a user does it, with napari-sclip installed: plain images and
folders as without the plugin, datasets through their manifest.

``viewer.open(path, plugin=None)`` is what napari's File > Open does (``viewer.open``'s own default
is the builtin reader): napari picks the reader from the path alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from napari_sclip.classes import ClassRegistry
from napari_sclip.dataset.writer import DatasetWriter, Sample

from conftest import natural_image

pytestmark = pytest.mark.gui


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(natural_image(30, 40)).save(folder / name)
    return folder


@pytest.fixture
def dataset(tmp_path):
    registry = ClassRegistry()
    registry.update((("cat",), ("dog",)))
    writer = DatasetWriter(tmp_path / "ds", registry)
    labels = np.ones((30, 40), np.uint8)
    labels[:5] = 2
    writer.write(Sample("pet", labels, image=natural_image(30, 40)))
    writer.rebuild_index()
    return tmp_path / "ds", labels


def _reader_plugins(path) -> set[str]:
    """The plugins napari considers for ``path``: more than one means a "Choose reader" dialog."""
    from napari.plugins._npe2 import get_readers

    return set(get_readers(str(path)))


def test_plain_images_and_folders_have_napari_as_their_only_reader(display, make_napari_viewer, photos, dataset):
    make_napari_viewer()  # napari's plugins, discovered as at start-up
    root, _ = dataset
    for path in (photos / "a.jpg", photos, root, next(root.glob("*/images/pet.png"))):
        assert _reader_plugins(path) == {"napari"}, path
    assert _reader_plugins(root / "dataset.json") == {"napari-sclip"}


def test_viewer_open_of_a_photo_and_a_folder_is_unchanged(display, make_napari_viewer, photos):
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(photos / "a.jpg"), plugin=None)
    np.testing.assert_array_equal(layer.data, np.asarray(Image.open(photos / "a.jpg")))
    [stack] = viewer.open(str(photos), plugin=None)
    assert stack.data.shape == (2, 30, 40, 3)


def test_file_open_in_the_window_shows_no_reader_dialog(display, make_napari_viewer, photos, dataset, monkeypatch,
                                                       qtbot):
    """The Qt path of File > Open: a choice of readers would open QtReaderDialog."""
    from napari._qt import qt_viewer as qt_viewer_module

    asked = []
    monkeypatch.setattr(qt_viewer_module, "handle_gui_reading", lambda *a, **k: asked.append(a))
    viewer = make_napari_viewer()
    qt_viewer = viewer.window._qt_viewer
    qt_viewer._qt_open([str(photos / "a.jpg")], stack=False)
    qt_viewer._qt_open([str(dataset[0] / "dataset.json")], stack=False)
    assert not asked
    qtbot.waitUntil(lambda: "pet labels" in viewer.layers, timeout=20_000)
    assert [layer.name for layer in viewer.layers] == ["a", "pet", "pet labels"]


def test_a_dataset_opens_from_its_manifest_without_naming_the_plugin(display, make_napari_viewer, dataset, qtbot):
    root, labels = dataset
    viewer = make_napari_viewer()
    viewer.open(str(root / "dataset.json"), plugin=None)
    qtbot.waitUntil(lambda: "pet labels" in viewer.layers, timeout=20_000)  # its review opens in a worker
    assert [layer.name for layer in viewer.layers] == ["pet", "pet labels"]
    np.testing.assert_array_equal(viewer.layers["pet labels"].data, labels)
    names = dict(zip(viewer.layers["pet labels"].features["index"], viewer.layers["pet labels"].features["class_name"]))
    assert names[1] == "cat" and names[2] == "dog"


def test_someone_elses_dataset_json_is_not_taken_for_ours(tmp_path):
    from napari_sclip.plugin.io import get_reader

    other = tmp_path / "nnunet"
    other.mkdir()
    (other / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0}}))
    assert get_reader(str(other / "dataset.json")) is None
    (other / "dataset.json").write_text("{not json")
    assert get_reader(str(other / "dataset.json")) is None


def test_saving_layers_to_a_folder_stays_napari_s(display, make_napari_viewer, tmp_path):
    """An extensionless save of an image with its labels is napari's "Save to Folder"."""
    viewer = make_napari_viewer()
    viewer.add_image(natural_image(20, 30), name="img", rgb=True)
    viewer.add_labels(np.ones((20, 30), np.uint8), name="img labels")
    viewer.layers.save(str(tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img labels.tif", "img.tif"]
