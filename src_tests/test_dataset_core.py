"""Dataset format building blocks: safe paths and stable splits."""

from __future__ import annotations

import os

import pytest

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
    with pytest.raises(DatasetError, match="leads outside"):
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
