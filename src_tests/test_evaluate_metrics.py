"""The mmseg IoUMetric port against a pixel-by-pixel confusion matrix and hand-worked numbers."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from napari_sclip.evaluate.metrics import (
    IGNORE_INDEX,
    Areas,
    image_areas,
    reduce_zero_label,
    scores,
)


def confusion_reference(pred, label, num_classes, ignore_index=IGNORE_INDEX):
    """Explicit loops: matrix[l][p] for in-range pairs; row totals also count off-range preds."""
    matrix = [[0] * num_classes for _ in range(num_classes)]
    rows = [0] * num_classes
    for p, lab in zip(pred.ravel().tolist(), label.ravel().tolist()):
        if lab == ignore_index:
            continue
        assert 0 <= lab < num_classes  # the random cases only make in-range or ignored labels
        rows[lab] += 1
        if 0 <= p < num_classes:
            matrix[lab][p] += 1
    cols = [sum(matrix[r][c] for r in range(num_classes)) for c in range(num_classes)]
    diag = [matrix[c][c] for c in range(num_classes)]

    def div(a, b):
        return a / b if b else math.nan

    iou = [div(diag[c], rows[c] + cols[c] - diag[c]) for c in range(num_classes)]
    acc = [div(diag[c], rows[c]) for c in range(num_classes)]

    def nanmean(xs):
        kept = [x for x in xs if not math.isnan(x)]
        return sum(kept) / len(kept) if kept else math.nan

    return {
        "intersect": diag, "pred": cols, "label": rows,
        "iou": iou, "acc": acc,
        "miou": nanmean(iou), "macc": nanmean(acc), "aacc": div(sum(diag), sum(rows)),
    }  # fmt: skip


def random_case(rng, num_classes, shape=(7, 9), dtype=np.int16):
    """Labels from some classes plus ignore; preds from others too, plus 255 and out-of-range."""
    classes = np.arange(num_classes)
    in_label = rng.choice(classes, size=max(1, num_classes // 2), replace=False)
    in_pred = rng.choice(classes, size=max(1, num_classes // 2), replace=False)  # some pred-only
    label_values = np.concatenate([in_label, [IGNORE_INDEX]])
    pred_values = np.concatenate([in_pred, in_label, [IGNORE_INDEX, num_classes]])
    if np.issubdtype(dtype, np.signedinteger):
        pred_values = np.concatenate([pred_values, [-1, 1000]])
    label = rng.choice(label_values, size=shape).astype(dtype)
    pred = rng.choice(pred_values, size=shape).astype(dtype)
    return pred, label


@pytest.mark.parametrize("num_classes", [1, 2, 3, 8, 21])
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int64])
def test_matches_a_pixel_loop_confusion_matrix(num_classes, seed, dtype):
    rng = np.random.default_rng(1000 * num_classes + seed)
    pred, label = random_case(rng, num_classes, dtype=dtype)
    expected = confusion_reference(pred, label, num_classes)
    areas = image_areas(pred, label, num_classes)
    for name in ("intersect", "pred", "label"):
        assert getattr(areas, name).tolist() == expected[name], name
    np.testing.assert_array_equal(areas.union, areas.pred + areas.label - areas.intersect)

    got = scores(areas, [f"c{i}" for i in range(num_classes)])
    np.testing.assert_allclose(got.iou, expected["iou"], rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(got.acc, expected["acc"], rtol=1e-12, equal_nan=True)
    for name in ("miou", "macc", "aacc"):
        np.testing.assert_allclose(getattr(got, name), expected[name], rtol=1e-12, equal_nan=True)


def test_random_cases_exercise_the_edge_cases():
    # Guard for the test above: absent classes, predicted-only classes and 255 preds all occur.
    rng = np.random.default_rng(1021)
    pred, label = random_case(rng, 21)
    kept = label != IGNORE_INDEX
    assert (~kept).any() and (pred[kept] == IGNORE_INDEX).any()
    in_label, in_pred = set(label[kept].tolist()), set(pred[kept].tolist())
    assert set(range(21)) - in_label - in_pred  # absent from both
    assert (in_pred - in_label) & set(range(21))  # predicted only
    got = scores(image_areas(pred, label, 21), [str(i) for i in range(21)])
    assert np.isnan(got.iou).any() and (got.iou == 0).any()


def test_sets_are_summed_not_averaged_per_image():
    rng = np.random.default_rng(7)
    cases = [random_case(rng, 5, shape=shape) for shape in [(3, 4), (10, 2), (1, 1), (6, 6)]]
    total = sum((image_areas(p, lab, 5) for p, lab in cases), Areas.zeros(5))
    everything = image_areas(
        np.concatenate([p.ravel() for p, _ in cases])[None],
        np.concatenate([lab.ravel() for _, lab in cases])[None],
        5,
    )
    assert total == everything
    running = Areas.zeros(5)
    for p, lab in cases:
        running += image_areas(p, lab, 5)
    assert running == everything
    assert running != Areas.zeros(5)
    # A per-image mean of mIoU would differ: the big image must weigh more.
    names = list("abcde")
    per_image = np.nanmean([scores(image_areas(p, lab, 5), names).miou for p, lab in cases])
    assert not np.isclose(per_image, scores(everything, names).miou)


def test_hand_worked_example():
    # Classes: 0 and 1 in both, 2 absent from both (excluded from the means), 3 predicted only.
    label = np.array([[0, 0, 1], [1, 255, 0]], np.uint8)
    pred = np.array([[0, 1, 1], [3, 0, 255]], np.uint8)
    # The ignored pixel (pred 0) goes; the 255 prediction counts for no class but costs recall.
    areas = image_areas(pred, label, 4)
    assert areas.intersect.tolist() == [1, 1, 0, 0]
    assert areas.pred.tolist() == [1, 2, 0, 1]
    assert areas.label.tolist() == [3, 2, 0, 0]
    assert areas.union.tolist() == [3, 3, 0, 1]
    got = scores(areas, ["a", "b", "c", "d"])
    np.testing.assert_allclose(got.iou, [1 / 3, 1 / 3, np.nan, 0.0], equal_nan=True)
    np.testing.assert_allclose(got.acc, [1 / 3, 1 / 2, np.nan, np.nan], equal_nan=True)
    assert got.miou == pytest.approx(2 / 9)  # (1/3 + 1/3 + 0) / 3
    assert got.macc == pytest.approx(5 / 12)  # (1/3 + 1/2) / 2
    assert got.aacc == pytest.approx(2 / 5)


def test_out_of_range_labels_count_nowhere_but_their_pred_does():
    # As torch.histc(min=0, max=C-1): a non-ignored label of 7 is in no bin; its pred still is.
    label = np.array([[7, 1]], np.uint16)
    pred = np.array([[1, 1]], np.uint16)
    areas = image_areas(pred, label, 3)
    assert areas.label.tolist() == [0, 1, 0]
    assert areas.pred.tolist() == [0, 2, 0]
    assert areas.intersect.tolist() == [0, 1, 0]


def test_all_undefined_is_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = scores(Areas.zeros(2), ["a", "b"])
        assert math.isnan(got.miou) and math.isnan(got.macc) and math.isnan(got.aacc)
        everything_ignored = np.full((2, 2), IGNORE_INDEX, np.uint8)
        got = scores(image_areas(np.zeros((2, 2), np.uint8), everything_ignored, 2), ["a", "b"])
        assert np.isnan(got.iou).all() and math.isnan(got.miou)
        assert got.to_json()["miou"] is None
        assert "-" in got.table()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32])
def test_reduce_zero_label(dtype):
    raw = np.array([0, 1, 2, 255], dtype)
    reduced = reduce_zero_label(raw)
    assert reduced.dtype == dtype
    assert reduced.tolist() == [255, 0, 1, 255]
    assert raw.tolist() == [0, 1, 2, 255]  # a new array


def test_reduce_zero_label_keeps_mmseg_formula_above_255():
    # mmseg subtracts then maps 254 back to 255, so 256 also ends up ignored.
    assert reduce_zero_label(np.array([255, 256, 300], np.uint16)).tolist() == [255, 255, 299]


def test_reduce_zero_label_with_the_metric():
    raw = np.array([[0, 1, 2], [255, 3, 1]], np.uint8)  # 0 = "other", ignored after reduction
    pred = np.array([[2, 0, 1], [0, 2, 1]], np.uint8)
    areas = image_areas(pred, reduce_zero_label(raw), 3)
    # Kept pixels (label, pred): (0, 0), (1, 1), (2, 2), (0, 1).
    assert areas.label.tolist() == [2, 1, 1]
    assert areas.pred.tolist() == [1, 2, 1]
    assert areas.intersect.tolist() == [1, 1, 1]
    assert scores(areas, ["x", "y", "z"]).aacc == pytest.approx(3 / 4)


def test_json_round_trips():
    rng = np.random.default_rng(3)
    areas = image_areas(*random_case(rng, 4), 4)
    text = json.dumps(areas.to_json())
    back = Areas.from_json(json.loads(text))
    assert back == areas and back.intersect.dtype == np.int64

    got = scores(Areas([1, 0, 0], [2, 0, 1], [1, 0, 1], [2, 0, 0]), ["cat", "dog", "sky"])
    value = json.loads(json.dumps(got.to_json(), allow_nan=False))
    assert value["classes"]["cat"] == {"iou": 0.5, "acc": 0.5}
    assert value["classes"]["dog"] == {"iou": None, "acc": None}
    assert value["classes"]["sky"] == {"iou": 0.0, "acc": None}
    assert value["miou"] == pytest.approx(0.25) and value["aacc"] == pytest.approx(0.5)
    assert Areas.from_json(value["areas"]) == got.areas


def test_table():
    got = scores(Areas([1, 0, 0], [2, 0, 1], [1, 0, 1], [2, 0, 0]), ["cat", "dog", "blue sky"])
    text = got.table()
    for word in ("cat", "dog", "blue sky", "mIoU", "mAcc", "aAcc", "50.0", "25.0"):
        assert word in text
    dog = next(line for line in text.splitlines() if line.startswith("dog"))
    assert dog.split()[1:] == ["-", "-"]
    assert "50.00" in got.table(digits=2)


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        image_areas(np.zeros((2, 3), np.uint8), np.zeros((3, 2), np.uint8), 2)
    with pytest.raises(ValueError):
        image_areas(np.zeros(6, np.uint8), np.zeros(6, np.uint8), 2)
    with pytest.raises(TypeError):
        image_areas(np.zeros((2, 2)), np.zeros((2, 2), np.uint8), 2)
    with pytest.raises(ValueError):
        Areas.zeros(2) + Areas.zeros(3)
    with pytest.raises(ValueError):
        scores(Areas.zeros(2), ["only one"])
