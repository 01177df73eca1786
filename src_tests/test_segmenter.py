"""The whole pipeline against the plain reference, and the API's behaviour around it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sclip import Progress, SegmentationResult, Segmenter
from napari_sclip.engine import segmenter as segmenter_module
from napari_sclip.engine.errors import ImageError, ParameterError, VocabularyError

from conftest import TINY_MODEL, natural_image
from reference_sclip import sclip_reference

CLASSES = ["person, astronaut", "sky", "flag, banner", "rocket"]


def _reference(segmenter, rgb, classes=CLASSES, **params):
    from napari_sclip.engine.vocabulary import parse_vocabulary

    vocabulary = parse_vocabulary(classes)
    text = torch.from_numpy(segmenter.text_features(vocabulary.names))
    return sclip_reference(segmenter.load().clip, text, list(vocabulary.name_class_index), rgb, **params)


@pytest.mark.parametrize(
    "shape, params",
    [
        ((336, 448), {}),  # short side already 336: no resize anywhere
        ((200, 300), {}),  # upscaled to 336 x 504
        ((700, 500), {"prob_threshold": 0.3}),  # downscaled, thresholded
        ((150, 400), {"short_side": 100, "window": 96, "stride": 40, "logit_scale": 65.0}),  # windows of 96
        ((120, 90), {"short_side": 120, "window": 224, "stride": 112}),  # image smaller than a window
    ],
)
def test_matches_reference_implementation(segmenter, shape, params):
    rgb = natural_image(*shape)
    result = segmenter.segment(rgb, CLASSES, return_probs=True, **params)
    labels, confidence, probs = _reference(segmenter, rgb, **params)
    # Without a resize the pipelines agree to 1e-4.  With one, the 8-bit rounding after the resize
    # can land one grey level apart on a few pixels (x.5 ties), which moves probabilities ~1e-4.
    atol = 1e-4 if shape == (336, 448) else 1e-3
    np.testing.assert_allclose(result.probs, probs, atol=atol)
    np.testing.assert_allclose(result.confidence, confidence, atol=atol)
    agree = np.mean(result.labels == labels)
    assert agree > 0.999, agree  # only near-ties may flip


@pytest.mark.parametrize("shape", [(200, 300), (700, 500), (6000, 80)])
def test_preprocessing_matches_the_reference_resize(segmenter, shape):
    from reference_sclip import preprocess_reference

    rgb = natural_image(*shape)
    ours, _ = segmenter._preprocess(rgb, 336, segmenter.load())
    theirs = preprocess_reference(rgb, 336)[0]
    std = torch.tensor([68.501, 66.632, 70.323]).view(3, 1, 1)
    levels = ((ours - theirs) * std).abs()
    assert ours.shape == theirs.shape
    assert levels.max() < 1.001  # at most one grey level apart
    assert (levels > 0.5).float().mean() < 1e-3


def test_result_fields(segmenter):
    rgb = natural_image(100, 130)
    result = segmenter.segment(rgb, CLASSES)
    assert isinstance(result, SegmentationResult)
    assert result.labels.shape == result.confidence.shape == (100, 130)
    assert result.labels.dtype == np.uint8 and result.confidence.dtype == np.float32
    assert result.probs is None
    assert result.class_names == ("person", "sky", "flag", "rocket")
    assert set(np.unique(result.labels)) <= {1, 2, 3, 4}
    assert ((result.confidence > 0) & (result.confidence <= 1)).all()
    assert result.params["method"] == "sclip"
    assert result.params["resized_shape"] == (336, 437)
    assert result.params["windows"] == 2 * 3


def test_probabilities_are_max_over_synonyms(segmenter):
    """A class's probability is the max over its names of the softmax over all names."""
    rgb = natural_image(120, 160)
    grouped = segmenter.segment(rgb, ["cat, kitten", "dog"], return_probs=True)
    flat = segmenter.segment(rgb, ["cat", "kitten", "dog"], return_probs=True)
    np.testing.assert_allclose(grouped.probs[0], np.maximum(flat.probs[0], flat.probs[1]), atol=1e-6)
    np.testing.assert_allclose(grouped.probs[1], flat.probs[2], atol=1e-6)
    assert grouped.class_names == ("cat", "dog")


def test_synonyms_given_as_lists(segmenter):
    rgb = natural_image(64, 64)
    a = segmenter.segment(rgb, [["cat", "kitten"], "dog"], return_probs=True)
    b = segmenter.segment(rgb, ["cat, kitten", "dog"], return_probs=True)
    np.testing.assert_array_equal(a.probs, b.probs)


def test_labels_and_confidence_follow_the_probabilities(segmenter):
    rgb = natural_image(90, 120)
    result = segmenter.segment(rgb, CLASSES, return_probs=True)
    np.testing.assert_array_equal(result.labels, result.probs.argmax(0) + 1)
    np.testing.assert_allclose(result.confidence, result.probs.max(0))


def test_threshold_sets_label_zero_below_it(segmenter):
    rgb = natural_image(90, 120)
    free = segmenter.segment(rgb, CLASSES)
    threshold = float(np.median(free.confidence))
    cut = segmenter.segment(rgb, CLASSES, prob_threshold=threshold)
    low = free.confidence < threshold
    assert low.any() and (~low).any()
    assert (cut.labels[low] == 0).all()
    np.testing.assert_array_equal(cut.labels[~low], free.labels[~low])
    np.testing.assert_array_equal(cut.confidence, free.confidence)


def _authors_postprocess(probs: np.ndarray, prob_threshold: float, area_threshold: float | None = None) -> np.ndarray:
    """The SCLIP authors' post-processing, plainly, on ``(C, H, W)`` class probabilities with
    class 0 as background: class indices, not label values."""
    probs = probs.copy()
    if area_threshold is not None:
        counts = np.array([(probs.argmax(0) == c).sum() for c in range(len(probs))])
        for c in range(1, len(probs)):
            if counts[c] <= area_threshold * counts[1:].sum():
                probs[c] = 0
    indices = probs.argmax(0)
    indices[probs.max(0) < prob_threshold] = 0
    return indices


def _between(values: np.ndarray) -> float:
    """A threshold halfway between the two middle ones of ``values``, far from every value."""
    ordered = np.unique(values)
    k = len(ordered) // 2
    return float(ordered[k - 1] + ordered[k]) / 2


def test_below_the_threshold_pixels_get_the_background_class_as_the_authors_do(segmenter):
    rgb = natural_image(90, 120)
    free = segmenter.segment(rgb, CLASSES, return_probs=True)
    threshold = _between(free.confidence)
    for background in (0, 2):
        result = segmenter.segment(rgb, CLASSES, prob_threshold=threshold, background_class=background)
        order = [*range(background, len(CLASSES)), *range(background)]  # the background class first
        expected = np.array(order)[_authors_postprocess(free.probs[order], threshold)] + 1
        assert ((expected == background + 1) & (free.labels != background + 1)).any()  # sent there
        np.testing.assert_array_equal(result.labels, expected)
        np.testing.assert_array_equal(result.confidence, free.confidence)
        assert result.params["background_class"] == background and "area_threshold" not in result.params


def test_the_area_threshold_drops_small_classes_as_the_authors_do(segmenter, monkeypatch):
    rgb = natural_image(150, 170)
    free = segmenter.segment(rgb, CLASSES, return_probs=True)
    counts = np.bincount(free.probs.argmax(0).ravel(), minlength=len(CLASSES))
    fractions = counts[1:] / counts[1:].sum()
    area = _between(fractions)  # drops some foreground classes, keeps others
    threshold = _between(free.confidence)
    expected = _authors_postprocess(free.probs, threshold, area) + 1
    kept = {c for c in range(1, len(CLASSES)) if fractions[c - 1] > area}
    assert kept and len(kept) < len(CLASSES) - 1
    assert set(np.unique(expected)) - {1} <= {c + 1 for c in kept}
    monkeypatch.setattr(segmenter_module, "_BAND_ELEMENTS", 5 * 170 * 7)  # bands of 5 rows: counts span bands
    steps = []
    result = segmenter.segment(rgb, CLASSES, prob_threshold=threshold, background_class=0, area_threshold=area,
                               return_probs=True, progress=steps.append)
    np.testing.assert_array_equal(result.labels, expected)
    dropped = [c for c in range(1, len(CLASSES)) if c not in kept]
    assert (result.probs[dropped] == 0).all()
    np.testing.assert_allclose(result.probs[[0, *sorted(kept)]], free.probs[[0, *sorted(kept)]], rtol=1e-6)
    assert result.params["area_threshold"] == area
    resize = [step for step in steps if step.stage == "resize"]
    bands = len(segmenter_module._tiles((150, 170), 6, None))  # six names
    assert bands > 1 and resize[-1].done == resize[-1].total == 2 * bands  # two passes over the bands
    # No threshold at all: the area threshold alone changes the labels of dropped classes only.
    alone = segmenter.segment(rgb, CLASSES, background_class=0, area_threshold=area)
    np.testing.assert_array_equal(alone.labels, _authors_postprocess(free.probs, 0.0, area) + 1)


def test_logit_scale_sharpens(segmenter):
    rgb = natural_image(90, 120)
    soft = segmenter.segment(rgb, CLASSES, logit_scale=10.0)
    sharp = segmenter.segment(rgb, CLASSES, logit_scale=100.0)
    assert sharp.confidence.mean() > soft.confidence.mean()


def test_large_output_is_computed_in_bands(segmenter, monkeypatch):
    rgb = natural_image(150, 170)
    whole = segmenter.segment(rgb, CLASSES, return_probs=True)
    monkeypatch.setattr(segmenter_module, "_BAND_ELEMENTS", 5 * 170 * 7)  # bands of 7 rows
    banded = segmenter.segment(rgb, CLASSES, return_probs=True)
    np.testing.assert_array_equal(banded.labels, whole.labels)
    np.testing.assert_allclose(banded.probs, whole.probs, atol=1e-6)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_batch_size_does_not_change_results(tiny_checkpoint, batch_size):
    rgb = natural_image(200, 300)
    reference = Segmenter(TINY_MODEL, str(tiny_checkpoint), "cpu", batch_size=2).segment(rgb, CLASSES, return_probs=True)
    other = Segmenter(TINY_MODEL, str(tiny_checkpoint), "cpu", batch_size=batch_size).segment(rgb, CLASSES, return_probs=True)
    np.testing.assert_allclose(other.probs, reference.probs, atol=1e-5)


def test_progress_reports_every_stage(segmenter):
    events: list[Progress] = []
    segmenter.segment(natural_image(200, 300), ["never encoded before", "nor this"], progress=events.append)
    stages = [e.stage for e in events]
    assert {"text", "windows", "resize"} <= set(stages)
    windows = [e for e in events if e.stage == "windows"]
    assert windows[0].done == 0 and windows[-1].done == windows[-1].total == 8
    assert all(a.done <= b.done for a, b in zip(windows, windows[1:]))


def test_iter_segment_can_be_cancelled(segmenter, monkeypatch):
    calls = []
    original = Segmenter._window_features

    def counting(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(Segmenter, "_window_features", counting)
    steps = segmenter.iter_segment(natural_image(200, 300), CLASSES)
    for step in steps:
        if step.stage == "windows" and step.done > 0:
            steps.close()
            break
    assert len(calls) == 1  # one batch of 4 of the 8 windows ran, then nothing more
    assert not torch.is_inference_mode_enabled()


def test_iter_segment_returns_the_result(segmenter):
    steps = segmenter.iter_segment(natural_image(64, 64), ["a", "b"])
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            result = stop.value
            break
    assert result.labels.shape == (64, 64)


# -- images of every kind ------------------------------------------------------------------------


def test_grayscale_rgba_and_channel_axis_variants_agree(segmenter):
    rgb = natural_image(80, 100)
    gray = rgb[..., 0]
    by_gray = segmenter.segment(gray, CLASSES)
    by_gray_1 = segmenter.segment(gray[..., None], CLASSES)
    by_gray_rgb = segmenter.segment(np.repeat(gray[..., None], 3, axis=-1), CLASSES)
    np.testing.assert_array_equal(by_gray.labels, by_gray_rgb.labels)
    np.testing.assert_array_equal(by_gray_1.labels, by_gray_rgb.labels)
    rgba = np.concatenate([rgb, np.full((80, 100, 1), 7, np.uint8)], axis=-1)
    np.testing.assert_array_equal(segmenter.segment(rgba, CLASSES).labels, segmenter.segment(rgb, CLASSES).labels)


def test_sixteen_bit_and_float_images_use_contrast_limits(segmenter):
    rgb = natural_image(80, 100)
    as16 = rgb.astype(np.uint16) * 257  # 0..65535
    asfloat = rgb.astype(np.float32) / 255.0
    expected = segmenter.segment(rgb, CLASSES, return_probs=True).probs
    by16 = segmenter.segment(as16, CLASSES, contrast_limits=(0, 65535), return_probs=True).probs
    byfloat = segmenter.segment(asfloat, CLASSES, contrast_limits=(0.0, 1.0), return_probs=True).probs
    np.testing.assert_allclose(by16, expected, atol=1e-6)
    np.testing.assert_allclose(byfloat, expected, atol=1e-6)


@pytest.mark.parametrize("shape", [(16, 16), (16, 3000), (4000, 16), (16, 16, 3)])
def test_tiny_and_thin_images_just_work(segmenter, shape):
    image = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    result = segmenter.segment(image, ["a", "b"])
    assert result.labels.shape == shape[:2]
    assert set(np.unique(result.labels)) <= {1, 2}


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (1, 3000), (4000, 2), (15, 200, 3)])
def test_images_thinner_than_a_patch_are_refused(segmenter, shape):
    image = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    with pytest.raises(ImageError, match=rf"image of {shape[0]} x {shape[1]} px is too small.*patch size \(16 px\)"):
        segmenter.segment(image, ["a", "b"])


def test_bool_image(segmenter):
    mask = np.zeros((40, 50), bool)
    mask[10:30, 10:40] = True
    assert segmenter.segment(mask, ["a", "b"]).labels.shape == (40, 50)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((0, 10, 3), np.uint8), "empty"),
        (np.zeros((5, 64, 64), np.uint16), "stack of 2D slices"),
        (np.zeros((2, 5, 64, 64), np.uint8), "segment its 2D slices"),
        (np.zeros((64, 64, 7), np.uint8), "7 channels"),
        (np.array([[0.0, np.nan], [1.0, 2.0]]), "NaN or infinite"),
        (np.array([[0.0, np.inf], [1.0, 2.0]]), "NaN or infinite"),
        (np.array([["a", "b"]]), "expected integer, float or bool"),
    ],
)
def test_bad_images_get_a_clear_error(segmenter, image, message):
    with pytest.raises(ImageError, match=message):
        segmenter.segment(image, ["a"])


@pytest.mark.parametrize(
    "classes, message",
    [
        ([], "empty"),
        (["cat", "  "], "class 2 is blank"),
        (["cat", "dog", "Cat"], "appears in classes 1 and 3"),
        (["cat, kitten, cat"], "twice in class 1"),
        (["cat,,kitten"], "empty name"),
        ("cat; dog", "list with one item per class"),
        ([3], "give a string"),
    ],
)
def test_bad_vocabularies_get_a_clear_error(segmenter, classes, message):
    with pytest.raises(VocabularyError, match=message):
        segmenter.segment(natural_image(32, 32), classes)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"window": 8}, "patch size"),
        ({"stride": 300}, "must not exceed window"),
        ({"stride": 0}, "stride must be a positive integer"),
        ({"short_side": 12.5}, "short_side must be a positive integer"),
        ({"logit_scale": float("nan")}, "logit_scale"),
        ({"logit_scale": -1.0}, "logit_scale"),
        ({"prob_threshold": 1.5}, "between 0 and 1"),
        ({"background_class": 1}, "index of one of the 1 classes"),
        ({"background_class": True}, "background_class"),
        ({"area_threshold": 0.1}, "needs background_class"),
        ({"background_class": 0, "area_threshold": 2.0}, "area_threshold must be between 0 and 1"),
    ],
)
def test_bad_parameters_get_a_clear_error(segmenter, params, message):
    with pytest.raises(ParameterError, match=message) as error:
        segmenter.segment(natural_image(32, 32), ["a"], **params)
    assert "\n" not in str(error.value)


def test_bad_batch_size():
    with pytest.raises(ParameterError, match="batch_size"):
        Segmenter(batch_size=0)


def test_huge_image_stays_within_memory(tiny_dir, tiny_checkpoint):
    """6000 x 8000 RGB, 20 classes: one (20, H, W) float tensor alone would be 3.8 GB."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    code = textwrap.dedent(
        f"""
        import sys  # the peak is VmHWM: getrusage's would start at the forking pytest's size
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import numpy as np
        from pathlib import Path
        from napari_sclip import Segmenter
        from conftest import register_tiny_model
        register_tiny_model(Path({str(tiny_dir)!r}))
        image = np.random.default_rng(0).integers(0, 255, (6000, 8000, 3), dtype=np.uint8)
        result = Segmenter("sclip-test-tiny", {str(tiny_checkpoint)!r}, "cpu").segment(
            image, [f"class {{i}}" for i in range(20)])
        assert result.labels.shape == (6000, 8000) and result.labels.max() <= 20
        print(int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) // 1024)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    peak_mb = int(done.stdout.split()[-1])
    assert peak_mb < 3000, f"peak RSS {peak_mb} MB"


def test_out_of_memory_halves_the_batch_and_retries(tiny_checkpoint, monkeypatch):
    rgb = natural_image(200, 300)  # 8 windows
    fresh = Segmenter(TINY_MODEL, str(tiny_checkpoint), "cpu", feature_cache=False)
    expected = fresh.segment(rgb, CLASSES, return_probs=True)
    sizes = []
    original = Segmenter._window_features

    def small_gpu(self, method, crops):
        sizes.append(len(crops))
        if len(crops) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, method, crops)

    monkeypatch.setattr(Segmenter, "_window_features", small_gpu)
    segmenter = Segmenter(TINY_MODEL, str(tiny_checkpoint), "cpu", batch_size=8, feature_cache=False)
    result = segmenter.segment(rgb, CLASSES, return_probs=True)
    assert sizes == [8, 4, 2, 2, 2, 2]
    np.testing.assert_allclose(result.probs, expected.probs, atol=1e-5)


def test_other_runtime_errors_are_not_taken_for_out_of_memory(segmenter, monkeypatch):
    def broken(self, *args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(Segmenter, "_window_features", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        segmenter.segment(natural_image(64, 64), ["a", "b"])


def test_out_of_memory_with_one_window_gives_up_clearly(segmenter, monkeypatch):
    def no_gpu_memory(self, *args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(Segmenter, "_window_features", no_gpu_memory)
    from napari_sclip.engine.errors import ModelError

    with pytest.raises(ModelError, match="device ran out of memory even with one window"):
        segmenter.segment(natural_image(64, 64), ["a", "b"])


def test_a_name_repeated_in_two_classes_as_in_the_authors_files_goes_to_the_earlier(segmenter):
    from napari_sclip.engine.vocabulary import parse_vocabulary

    with pytest.raises(VocabularyError, match="'bed' appears in classes 1 and 3"):
        parse_vocabulary(["wall, bed", "person", "bed"])
    repeated = parse_vocabulary(["wall, bed", "person", "bed"], unique=False)
    rgb = natural_image(90, 120)
    result = segmenter.segment(rgb, repeated, return_probs=True)
    single = segmenter.segment(rgb, ["bed", "person"])
    assert (single.labels == 1).any()  # "bed" does win pixels
    assert not (result.labels == 3).any()  # but there, class 1's "bed" ties and wins
    np.testing.assert_allclose(result.probs[2], np.minimum(result.probs[2], result.probs[0]))
