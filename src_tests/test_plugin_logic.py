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

    mask = np.zeros(labels_layer.data.shape, bool)
    tracker = EditTracker(labels_layer, mask)
    labels_layer.brush_size = 3
    labels_layer.paint((1, 10, 10), 5)
    assert mask[1, 10, 10] and mask[1].sum() >= 5 and not mask[0].any()
    labels_layer.fill((2, 3, 4), 7)  # the bucket: every pixel of slice 2 (all were 0)
    assert mask[2].all()
    with tracker.suspended():
        labels_layer.data_setitem((np.array([0]), np.array([0]), np.array([0])), 9)
    assert not mask[0, 0, 0]
    tracker.disconnect()
    labels_layer.data_setitem((np.array([0]), np.array([1]), np.array([1])), 9)
    assert not mask[0, 1, 1]


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


def test_label_values_and_values_present_match_numpy(rng):
    from napari_sclip.plugin.layers import label_values, values_present

    for dtype in (np.uint8, np.uint16, np.int32, np.uint32):
        data = rng.choice([0, 3, 9, 300 if dtype != np.uint8 else 200], (4, 20, 30)).astype(dtype)
        assert label_values(data) == [int(v) for v in np.unique(data) if v]
        assert values_present(data, {3, 5, 9}) == {3, 9}
        assert values_present(data[0], set()) == set()
    assert label_values(np.zeros((5, 5), np.uint16)) == []


def _state_with_history():
    from napari_sclip.plugin.state import LabelsState

    state = LabelsState.new((3, 20, 30))
    state.classes.update((("cat",), ("dog", "puppy")))
    state.edited[2, 4, 5] = True
    state.record_run((0,), {"model": "m", "window": 224, "resized_shape": (336, 504)})
    state.review_status = "reviewed"
    return state


def test_labels_state_travels_as_plain_data():
    """What a layer's metadata holds is JSON apart from the edited mask, and reads back equal."""
    import json

    from napari_sclip.plugin.state import METADATA_KEY, LabelsState

    state = _state_with_history()
    metadata = {"other plugin": 1}
    state.store(metadata)
    plain = dict(metadata[METADATA_KEY])
    assert plain.pop("edited") is state.edited  # shared: strokes marked later are in the metadata
    json.dumps(plain)
    restored = LabelsState.from_metadata(json.loads(json.dumps({METADATA_KEY: {**plain, "edited": None}})),
                                         np.zeros((3, 20, 30), np.uint8))
    assert restored.classes == state.classes and restored.review_status == "reviewed"
    assert restored.slices == {(0,): {"model": "m", "window": 224, "resized_shape": [336, 504]}}
    assert not restored.edited.any()  # no mask stored: nothing edited
    assert metadata["other plugin"] == 1


def test_labels_state_slices_and_runs():
    from napari_sclip.plugin.state import LabelsState

    state = _state_with_history()
    assert state.labelled_slices() == [(0,), (2,)]  # segmented, and painted
    state.slices[(1,)] = {"source": {"sha256": "x"}, "created": "then", "slice": [1], "model": "old",
                          "vocabulary_version": 3, "pamr_iterations": 10}
    state.record_run((1,), {"model": "new", "pamr": False})
    assert state.slices[(1,)] == {"source": {"sha256": "x"}, "created": "then", "slice": [1],
                                  "model": "new", "pamr": False}  # identity kept, provenance replaced
    flat = LabelsState.new((20, 30))
    assert flat.labelled_slices() == []
    flat.edited[3, 3] = True
    assert flat.labelled_slices() == [()]


def test_a_foreign_labels_layer_is_adopted_as_someone_s_work():
    from napari_sclip.plugin.state import LabelsState

    data = np.zeros((10, 10), np.uint8)
    data[2:4, 2:4] = 7
    for metadata in ({}, {"napari_sclip": "not ours"}):
        state = LabelsState.from_metadata(metadata, data)
        np.testing.assert_array_equal(state.edited, data != 0)
        assert state.classes.names == {7: ("label 7",)} and state.classes.active == []
        assert state.classes.plan((("cat",),))[0] == [8]  # value 7 stays the painted class's


def test_labelled_images_are_the_labelled_slices_with_their_provenance():
    """What an export from napari writes: a stack's slices that hold model labels or edits, each with
    its own provenance; a value no class has keeps its pixels as "label <value>"."""
    from napari_sclip.plugin.io import labelled_images

    state = _state_with_history()
    labels = np.zeros((3, 20, 30), np.uint8)
    labels[0] = 1
    labels[2, 4, 5] = 5  # painted with a number no class has
    metadata: dict = {}
    state.store(metadata)
    image = np.random.default_rng(0).integers(0, 255, (3, 20, 30, 3), dtype=np.uint8)
    items = labelled_images(image, {"name": "stack", "rgb": True}, labels, {"metadata": metadata})
    assert [item.name for item in items] == ["stack-000", "stack-002"]
    first, painted = items
    np.testing.assert_array_equal(first.image, image[0])
    assert first.meta == {"model": "m", "window": 224, "resized_shape": (336, 504), "slice": [0],
                          "review_status": "reviewed"}
    assert painted.meta == {"slice": [2], "review_status": "reviewed"}
    assert painted.edited.sum() == 1 and painted.registry.names[5] == ("label 5",) and 5 in painted.registry.active
    labels[0, 0, 0] = 2
    assert first.labels[0, 0] == 1  # copied when taken


def test_segment_options_name_the_engine_s_arguments():
    import inspect

    from napari_sclip.engine.segmenter import Segmenter
    from napari_sclip.plugin.state import METHOD_OPTIONS, OPTION_NAMES

    accepted = inspect.signature(Segmenter.iter_segment).parameters
    assert set(METHOD_OPTIONS) <= set(accepted) and set(METHOD_OPTIONS) <= set(OPTION_NAMES)
    assert "quick_gelu" in inspect.signature(Segmenter).parameters


def _results(labels, params=None):
    from napari_sclip.plugin.runner import SliceResult

    return [SliceResult((k, slice(None), slice(None)), labels[k], None, params or {}) for k in range(len(labels))]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_rerun_writes_around_edits_clears_retired_classes_and_is_one_undo_step(labels_layer, overwrite):
    """update_labels against a plain computation: new labels where nobody painted; edited pixels
    kept unless overwritten; kept pixels of a retired class become unlabelled, in slices the run
    did not touch too."""
    from napari_sclip.plugin.edits import EditTracker
    from napari_sclip.plugin.records import LabelsRecord
    from napari_sclip.plugin.state import LabelsState
    from napari_sclip.plugin.writeback import new_labels, update_labels

    rng = np.random.default_rng(1)
    before = rng.integers(0, 4, (3, 20, 30)).astype(np.uint8)
    labels_layer.data = before.copy()
    state = LabelsState.new(before.shape)
    state.edited[:, :5] = True
    record = LabelsRecord(state, EditTracker(labels_layer, state.edited))
    edited = state.edited.copy()
    new = rng.integers(1, 3, (2, 20, 30)).astype(np.uint8)
    results = _results(new)  # slices 0 and 1; slice 2 untouched
    steps = update_labels(labels_layer, record, results, retired=[3], overwrite=overwrite)
    bands = 0
    try:
        while True:
            next(steps)
            bands += 1
    except StopIteration as stop:
        changed = stop.value
    expected = before.copy()
    for k in range(2):
        keep = np.zeros_like(edited[k]) if overwrite else edited[k]
        expected[k] = np.where(keep, np.where(before[k] == 3, 0, before[k]), new[k])
    expected[2] = np.where(before[2] == 3, 0, before[2])
    np.testing.assert_array_equal(labels_layer.data, expected)
    assert changed == np.count_nonzero(expected != before) and bands >= 3
    assert state.edited[:2].any() != overwrite and state.edited[2].sum() == edited[2].sum()  # overwrite forgets
    labels_layer.undo()
    np.testing.assert_array_equal(labels_layer.data, before)
    np.testing.assert_array_equal(new_labels((2, 20, 30), results), new)
    record.tracker.disconnect()


def test_label_dtype_is_the_smallest_that_holds_the_values():
    from napari_sclip.classes import label_dtype

    assert label_dtype(0) == np.uint8 and label_dtype(255) == np.uint8
    assert label_dtype(256) == np.uint16 and label_dtype(65535) == np.uint16


def test_registries_merge_by_uid_and_refuse_a_uid_with_two_classes():
    from napari_sclip.classes import ClassConflict

    mine = ClassRegistry({1: ("cat",), 2: ("dog", "puppy")}, [2, 1])
    theirs = ClassRegistry({2: ("DOG",), 3: ("bird",)}, [3])
    merged = mine.merged_with(theirs)
    assert merged.names == {1: ("cat",), 2: ("dog", "puppy"), 3: ("bird",)} and merged.active == [2, 1]
    assert 3 not in mine.names  # a copy
    with pytest.raises(ClassConflict) as conflict:
        mine.merged_with(ClassRegistry({1: ("horse",)}, [1]))
    assert (conflict.value.uid, conflict.value.first, conflict.value.second) == (1, "cat", "horse")
