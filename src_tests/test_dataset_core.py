"""Dataset format building blocks: safe paths, stable splits, label encoding, class files and the
manifest."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from napari_sclip.classes import ClassRegistry
from napari_sclip.dataset import format as fmt
from napari_sclip.dataset.paths import DatasetError, resolve_inside, safe_relative
from napari_sclip.dataset.splits import assign_split, unit_interval


@pytest.mark.parametrize(
    "bad", ["", "/etc/passwd", "../outside.png", "train/../../x.png", "train\\images\\a.png", "C:/x.png", "./a.png", "a//b"]
)
def test_escaping_or_odd_paths_are_refused(tmp_path, bad):
    with pytest.raises(DatasetError, match="invalid path"):
        resolve_inside(tmp_path, bad)


def test_symlinks_out_of_the_dataset_are_refused(tmp_path):
    root = tmp_path / "ds"
    (root / "train").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    os.symlink(outside, root / "train" / "images")
    with pytest.raises(DatasetError, match="images is a symbolic link"):
        resolve_inside(root, "train/images/a.png")


def test_normal_paths_resolve_inside(tmp_path):
    assert resolve_inside(tmp_path, "train/masks/a.png") == tmp_path / "train" / "masks" / "a.png"
    assert str(safe_relative("val/images/b c.jpg")) == "val/images/b c.jpg"


def test_splits_are_stable_and_follow_the_ratios():
    ids = [f"image-{i}" for i in range(4000)]
    first = {i: assign_split(i) for i in ids}
    assert first == {i: assign_split(i) for i in ids}  # deterministic
    share = sum(s == "train" for s in first.values()) / len(ids)
    assert 0.77 < share < 0.83
    # Adding images never moves existing ones, and a three-way split only refines the two-way one
    # where the intervals agree.
    more = {i: assign_split(i) for i in ids + [f"new-{k}" for k in range(100)]}
    assert all(more[i] == first[i] for i in ids)
    three = {i: assign_split(i, {"train": 0.8, "val": 0.1, "test": 0.1}) for i in ids}
    assert all(three[i] == "train" for i in ids if first[i] == "train")


def test_unit_interval_is_uniform_enough():
    values = [unit_interval(str(i)) for i in range(2000)]
    assert min(values) >= 0 and max(values) < 1
    assert 0.45 < sum(values) / len(values) < 0.55


@pytest.mark.parametrize("ratios", [{"train": 0.5}, {"train": 0.9, "val": 0.2}, {"train": 1.2, "val": -0.2}, {"holdout": 1.0}])
def test_bad_ratios(ratios):
    with pytest.raises(DatasetError):
        assign_split("x", ratios)


# -- label encoding, class files, manifest ---------------------------------------------------------


@pytest.fixture
def registry():
    registry = ClassRegistry()
    registry.update((("cat",), ("dog", "puppy"), ("bird",)))
    registry.update((("bird",), ("cat",), ("fish",)))  # dog (2) retired, fish = 4
    return registry


def test_new_training_ids_follow_uid_order_and_old_ones_never_change(registry):
    ids = fmt.extend_train_ids({}, registry)
    assert ids == {1: 0, 3: 1, 4: 2}  # dog (2) was retired before the first export
    registry.update((("cat",), ("fish",), ("dog",), ("owl",)))  # bird retired, dog back, owl = 5
    assert fmt.extend_train_ids(ids, registry) == {1: 0, 3: 1, 4: 2, 2: 3, 5: 4}


def test_labels_to_mask_and_back(registry):
    ids = fmt.extend_train_ids({}, registry)
    labels = np.array([[0, 1, 2], [3, 4, 9]], np.uint8)  # 2 has no training id, 9 is no class
    mask = fmt.labels_to_mask(labels, ids)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, [[255, 0, 255], [1, 2, 255]])
    np.testing.assert_array_equal(fmt.mask_to_labels(mask, ids), [[0, 1, 0], [3, 4, 0]])


def test_plain_pillow_reads_the_training_ids(registry, tmp_path):
    from PIL import Image

    mask = fmt.labels_to_mask(np.array([[1, 3], [4, 0]], np.uint8), fmt.extend_train_ids({}, registry))
    Image.fromarray(mask).save(tmp_path / "m.png")
    image = Image.open(tmp_path / "m.png")
    assert image.mode == "L"
    np.testing.assert_array_equal(np.asarray(image.convert("L")), [[0, 1], [2, 255]])


def test_many_classes_need_sixteen_bit_masks():
    registry = ClassRegistry()
    registry.update(tuple((f"class {i}",) for i in range(300)))
    with pytest.warns(UserWarning, match="16-bit"):
        mask = fmt.labels_to_mask(np.array([[0, 300]], np.uint16), fmt.extend_train_ids({}, registry))
    np.testing.assert_array_equal(mask, [[65535, 299]])


def test_class_files(registry, tmp_path):
    fmt.write_class_files(tmp_path, registry, fmt.extend_train_ids({}, registry))
    assert (tmp_path / "classes.txt").read_text() == "cat\nbird\nfish\n"  # uid order: 1, 3, 4
    assert json.loads((tmp_path / "id2label.json").read_text()) == {"0": "cat", "1": "bird", "2": "fish"}
    lines = (tmp_path / "labelmap.txt").read_text().splitlines()
    assert lines[0].startswith("# label:color_rgb") and lines[1].startswith("cat:") and lines[1].endswith("::")


def test_manifest_round_trip(registry, tmp_path):
    ids = fmt.extend_train_ids({}, registry)
    manifest = fmt.build_manifest(registry, ids, {"train": 0.8, "val": 0.2}, [{"model": "ViT-B-16"}], 2)
    fmt.write_manifest(tmp_path, manifest)
    read, restored, restored_ids = fmt.read_manifest(tmp_path)
    assert read == manifest and restored == registry and restored_ids == ids
    dog = next(c for c in read["classes"] if c["name"] == "dog")
    assert dog["position"] is None and dog["train_id"] is None  # retired, kept, never reused


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "dataset.json is missing"),
        ("{not json", "cannot read"),
        ('{"format": {"name": "other", "version": 1}, "classes": []}', "not 'napari-sclip-pseudo-labels'"),
        ('{"format": {"name": "napari-sclip-pseudo-labels", "version": 99}, "classes": []}', "version 99"),
        ('{"format": {"name": "napari-sclip-pseudo-labels", "version": 1}}', "malformed"),
        ('{"format": {"name": "napari-sclip-pseudo-labels", "version": 1}, "classes": '
         '[{"uid": 1, "name": "a", "train_id": 3}]}', "not 0..0"),
    ],
)
def test_bad_manifests_name_the_file(tmp_path, content, message):
    if content is not None:
        (tmp_path / "dataset.json").write_text(content)
    with pytest.raises(DatasetError, match=message):
        fmt.read_manifest(tmp_path)
