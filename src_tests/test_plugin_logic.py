"""The plugin's logic without a window: class numbering, edit tracking, slices, layer writes."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sclip.classes import ClassRegistry
from napari_sclip.colors import label_color
from napari_sclip.plugin.runner import slice_regions


def test_new_vocabulary_is_numbered_in_order():
    registry = ClassRegistry()
    assert registry.update((("cat",), ("dog", "puppy"), ("bird",))) == [1, 2, 3]
    assert registry.active == [1, 2, 3]


def test_appending_and_reordering_never_renumber():
    registry = ClassRegistry()
    registry.update((("cat",), ("dog",)))
    assert registry.update((("cat",), ("dog",), ("bird",))) == [1, 2, 3]
    assert registry.update((("Bird",), ("cat", "kitten"), ("dog",))) == [3, 1, 2]  # case-insensitive
    assert registry.names[1] == ("cat", "kitten")  # synonyms follow the newest vocabulary


def test_removed_classes_retire_their_value():
    registry = ClassRegistry()
    registry.update((("cat",), ("dog",), ("bird",)))
    uids, retired = registry.plan((("cat",), ("fish",)))
    assert uids == [1, 4] and retired == [2, 3]  # fish does not take dog's value
    registry.update((("cat",), ("fish",)))
    assert registry.update((("cat",), ("fish",), ("dog",))) == [1, 4, 2]  # dog comes back as 2


def test_slice_regions():
    plane = (slice(None), slice(None))
    assert slice_regions((50, 60), rgb=False, current=None) == [plane]
    assert slice_regions((50, 60, 3), rgb=True, current=(0, 0)) == [plane]
    assert slice_regions((4, 50, 60), rgb=False, current=None) == [(z,) + plane for z in range(4)]
    assert slice_regions((4, 50, 60), rgb=False, current=(2, 10, 10)) == [(2,) + plane]
    assert slice_regions((2, 3, 50, 60, 3), rgb=True, current=None)[-1] == (1, 2) + plane
    assert slice_regions((4, 50, 60), rgb=False, current=(9, 0, 0)) == [(3,) + plane]  # clamped


def test_colours_are_distinct_and_stable():
    colours = [label_color(v) for v in range(1, 21)]
    assert len(set(colours)) == 20
    assert label_color(0) == (0, 0, 0)
    assert label_color(7) == label_color(7)


@pytest.fixture
def labels_layer():
    from napari.layers import Labels

    return Labels(np.zeros((3, 20, 30), np.uint8))


def test_edit_tracker_follows_paint_and_fill(labels_layer):
    from napari_sclip.plugin.edits import EditTracker

    tracker = EditTracker(labels_layer)
    labels_layer.brush_size = 3
    labels_layer.paint((1, 10, 10), 5)
    assert tracker.mask[1, 10, 10] and tracker.mask[1].sum() >= 5 and not tracker.mask[0].any()
    labels_layer.data_setitem((np.array([2]), np.array([3]), np.array([4])), 7)
    assert tracker.mask[2, 3, 4]
    assert tracker.painted_values() == {5, 7}
    with tracker.suspended():
        labels_layer.data_setitem((np.array([0]), np.array([0]), np.array([0])), 9)
    assert not tracker.mask[0, 0, 0]


def test_write_labels_keeps_edits_and_is_one_undo_step(labels_layer):
    from napari_sclip.plugin.layers import write_labels

    labels_layer.data[1, 0, 0] = 4
    keep = np.zeros((20, 30), bool)
    keep[0, 0] = True
    new = np.full((20, 30), 2, np.uint8)
    with labels_layer.block_history():
        changed = write_labels(labels_layer, (1, slice(None), slice(None)), new, keep)
        write_labels(labels_layer, (2, slice(None), slice(None)), new, None)
    assert changed == 20 * 30 - 1
    assert labels_layer.data[1, 0, 0] == 4 and (labels_layer.data[1, 1:] == 2).all()
    assert (labels_layer.data[2] == 2).all() and (labels_layer.data[0] == 0).all()
    labels_layer.undo()
    assert (labels_layer.data[2] == 0).all() and (labels_layer.data[1, 1:] == 0).all()


def test_class_colormap_and_features():
    from napari_sclip.plugin.layers import class_colormap, class_features

    registry = ClassRegistry()
    registry.update((("cat",), ("dog", "puppy")))
    registry.update((("dog",),))
    colormap = class_colormap(registry)
    np.testing.assert_allclose(colormap.color_dict[2][:3], np.array(label_color(2)) / 255)
    assert colormap.color_dict[0][3] == 0  # unlabelled is transparent
    table = class_features(registry)
    assert list(table["index"]) == [0, 1, 2]
    assert list(table["class_name"]) == ["unlabelled", "cat", "dog"]


def test_hovering_shows_the_class_name():
    from napari.layers import Labels

    from napari_sclip.plugin.layers import style_labels_layer

    registry = ClassRegistry()
    registry.update((("cat",), ("dog", "puppy")))
    layer = Labels(np.array([[1, 2], [2, 0]], np.uint8))
    style_labels_layer(layer, registry)
    assert "class_name: dog, synonyms: puppy" in layer.get_status((0, 1), world=True)["coordinates"]
    assert "class_name: unlabelled" in layer.get_status((1, 1), world=True)["coordinates"]


def test_run_job_segments_each_slice_with_monotonic_progress(segmenter):
    from napari_sclip.engine.progress import drive
    from napari_sclip.engine.vocabulary import parse_vocabulary
    from napari_sclip.plugin.runner import SegmentJob, run_job

    stack = np.random.default_rng(0).integers(0, 4000, (3, 40, 50)).astype(np.uint16)
    vocabulary = parse_vocabulary(["cat", "dog"])
    job = SegmentJob(stack, rgb=False, regions=slice_regions(stack.shape, False, None),
                     vocabulary=vocabulary, contrast_limits=(0, 4000))
    steps = []
    results = drive(run_job(segmenter, job), steps.append)
    fractions = [s.fraction for s in steps]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("slice 3/3" in s.message for s in steps)
    assert [r.region[0] for r in results] == [0, 1, 2]
    assert all(r.confidence is None for r in results)  # not kept unless asked for
    expected = segmenter.segment(stack[1], vocabulary, contrast_limits=(0, 4000))
    np.testing.assert_array_equal(results[1].labels, expected.labels)


def test_banded_write_equals_one_write_and_is_one_undo_step(labels_layer):
    from napari_sclip.engine.progress import drive
    from napari_sclip.plugin.layers import iter_write_labels

    rng = np.random.default_rng(3)
    new = rng.integers(1, 4, (20, 30)).astype(np.uint8)
    keep = rng.random((20, 30)) < 0.2
    labels_layer.data[1] = 9
    before = labels_layer.data.copy()
    bands = []
    steps = iter_write_labels(labels_layer, (1, slice(None), slice(None)), new, keep, band_pixels=90)
    with labels_layer.block_history():
        changed = drive(_counting(steps, bands))
    assert len(bands) == 7  # 3 rows of 30 pixels per band
    expected = np.where(keep, 9, new)
    np.testing.assert_array_equal(labels_layer.data[1], expected)
    assert changed == int((~keep).sum())
    labels_layer.undo()
    np.testing.assert_array_equal(labels_layer.data, before)


def _counting(steps, seen):
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value
        seen.append(1)
        yield


def test_registry_round_trips_through_json():
    import json

    registry = ClassRegistry()
    registry.update((("cat",), ("dog", "puppy"), ("bird",)))
    registry.update((("bird",), ("cat",), ("fish",)))  # dog retired, fish appended as 4
    restored = ClassRegistry.from_json(json.loads(json.dumps(registry.to_json())))
    assert restored == registry
    assert restored.update((("bird",), ("cat",), ("fish",), ("dog",))) == [3, 1, 4, 2]
