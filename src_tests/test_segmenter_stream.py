"""The engine's three stages (prepare -> run_windows -> finish), as a pipelined batch labeller runs
them: batches that straddle images give the same results as segment() on each image alone, to the
bit; input is pulled lazily; the out-of-memory fallback, the feature cache and threads."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from napari_sclip import Progress, Segmenter
from napari_sclip.engine.errors import ModelError
from napari_sclip.engine.feature_cache import FEATURE_CACHE
from napari_sclip.engine.methods import METHODS
from napari_sclip.engine.segmenter import PreparedImage

from conftest import TINY_DEEP_MODEL, TINY_MODEL, make_tiny_clip, natural_image

CLASSES = ["person, astronaut", "sky", "flag, banner", "rocket"]
OTHER_CLASSES = ["cat", "dog, puppy"]


@pytest.fixture(scope="module")
def deep_checkpoint(tiny_dir, tmp_path_factory):
    """A 12-block tiny model (SC-CLIP needs one) saved through the same loading path."""
    path = tmp_path_factory.mktemp("deep-stream") / "deep.pt"
    torch.save(make_tiny_clip(seed=9, vision_layers=12).state_dict(), path)
    return path


def _jobs() -> list[tuple[np.ndarray, dict]]:
    """Images of many sizes and kinds, each with its own options (vocabularies too)."""
    rng = np.random.default_rng(7)
    rgb = natural_image(96, 128)
    read_only = natural_image(80, 90)
    read_only.flags.writeable = False  # as from PIL
    return [
        (rgb, {"return_probs": True}),
        (natural_image(70, 200)[..., 1], {"pamr": True}),  # grayscale
        (natural_image(60, 90).astype(np.uint16) * 200, {"contrast_limits": (0, 51000), "return_probs": True}),
        (np.concatenate([rgb, np.full((96, 128, 1), 9, np.uint8)], axis=-1), {"classes": OTHER_CLASSES}),  # RGBA
        (rng.integers(0, 255, (16, 16), dtype=np.uint8), {"prob_threshold": 0.4}),
        (natural_image(300, 500), {"return_probs": True, "classes": OTHER_CLASSES}),
        (read_only, {"short_side": 120, "window": 224, "stride": 112}),  # windows smaller than 224
        (rgb, {"short_side": 100, "window": 96, "stride": 40, "logit_scale": 65.0, "return_probs": True}),
        (natural_image(96, 128), {}),
    ]


def _options(options: dict) -> tuple[list, dict]:
    options = dict(options)
    return options.pop("classes", CLASSES), options


def _stream(segmenter: Segmenter, jobs, **method) -> list:
    prepared = [segmenter.prepare(image, _options(o)[0], **_options(o)[1], **method, tag=i) for i, (image, o) in enumerate(jobs)]
    return [(p, segmenter.finish(p, canvas)) for p, canvas in segmenter.run_windows(iter(prepared))]


def _assert_same(result, expected) -> None:
    assert np.array_equal(result.labels, expected.labels)
    assert np.array_equal(result.confidence, expected.confidence)
    assert (result.probs is None) == (expected.probs is None)
    if expected.probs is not None:
        assert np.array_equal(result.probs, expected.probs)
    assert result.class_names == expected.class_names
    assert result.params == expected.params


@pytest.mark.parametrize("method", list(METHODS))
def test_batches_across_images_equal_segment_on_each_image(deep_checkpoint, method):
    jobs = _jobs()
    alone = Segmenter(TINY_DEEP_MODEL, str(deep_checkpoint), "cpu", method=method, feature_cache=False)
    expected = [alone.segment(image, _options(o)[0], **_options(o)[1]) for image, o in jobs]
    # Batches of 5 straddle images; the reference runs batches of 4 within one image.
    streamed = Segmenter(TINY_DEEP_MODEL, str(deep_checkpoint), "cpu", method=method, batch_size=5,
                         feature_cache=False)
    results = _stream(streamed, jobs)
    assert [p.tag for p, _ in results] == list(range(len(jobs)))  # input order
    for (_, result), reference in zip(results, expected):
        _assert_same(result, reference)
    assert any(r.params["pamr"] for _, r in results)
    assert len({r.params["resized_shape"] for _, r in results}) > 3


def test_images_with_different_methods_in_one_stream(segmenter):
    jobs = _jobs()[:4]
    methods = ["sclip", "maskclip", "naclip", "sclip"]
    expected = [segmenter.segment(image, _options(o)[0], method=m, **_options(o)[1])
                for (image, o), m in zip(jobs, methods)]
    FEATURE_CACHE.clear()
    streamed = Segmenter(segmenter.model_name, segmenter.pretrained, "cpu", batch_size=7)
    prepared = [streamed.prepare(image, _options(o)[0], method=m, **_options(o)[1]) for (image, o), m in zip(jobs, methods)]
    for (p, canvas), reference in zip(streamed.run_windows(prepared), expected):
        _assert_same(streamed.finish(p, canvas), reference)


def test_prepared_image_fields(segmenter):
    prepared = segmenter.prepare(natural_image(96, 128), CLASSES, pamr=True, tag={"path": "a.png"})
    assert isinstance(prepared, PreparedImage)
    assert prepared.pixels.device.type == "cpu" and prepared.pixels.dtype == torch.float32
    assert prepared.pixels.shape == (3, 336, 448) and prepared.resized_shape == (336, 448)
    assert prepared.size == (96, 128) and len(prepared.windows) == 6
    assert (prepared.short_side, prepared.window, prepared.stride, prepared.logit_scale) == (336, 224, 112, 40.0)
    assert prepared.refinement is not None and prepared.method.name == "sclip"
    assert prepared.cache_key is not None and prepared.cache_key[-1] == prepared.digest
    assert prepared.tag == {"path": "a.png"}
    assert Segmenter(segmenter.model_name, segmenter.pretrained, "cpu", feature_cache=False).prepare(
        natural_image(96, 128), CLASSES).cache_key is None


def test_canvas_is_divided_and_on_the_device(segmenter):
    prepared = segmenter.prepare(natural_image(96, 128), CLASSES)
    [(same, canvas)] = list(segmenter.run_windows([prepared]))
    assert same is prepared
    assert canvas.shape == (6, 336, 448) and canvas.device == segmenter.device
    assert canvas.abs().max() <= 1.0 + 1e-5  # averaged cosine similarities, not sums


def test_run_windows_pulls_lazily(tiny_checkpoint):
    segmenter = Segmenter(TINY_MODEL, str(tiny_checkpoint), "cpu", batch_size=5, feature_cache=False)
    image = natural_image(64, 64)  # 336 x 336: 4 windows
    prepared = [segmenter.prepare(np.roll(image, i, axis=0), CLASSES, tag=i) for i in range(7)]
    pulled = []

    def source():
        for p in prepared:
            pulled.append(p.tag)
            yield p

    seen = []
    for p, _ in segmenter.run_windows(source()):
        seen.append((p.tag, len(pulled)))
    assert [tag for tag, _ in seen] == list(range(7))
    # The first batch (5 windows) needs images 0 and 1; image 0 comes out before 2 is pulled.
    assert seen[0] == (0, 2)
    for tag, count in seen:  # never more than one batch's worth of images ahead
        assert count <= tag + 1 + math.ceil(5 / 4), seen


def test_closing_run_windows_stops_pulling(segmenter):
    prepared = [segmenter.prepare(natural_image(64, 64), CLASSES, tag=i) for i in range(5)]
    pulled = []

    def source():
        for p in prepared:
            pulled.append(p.tag)
            yield p

    stream = segmenter.run_windows(source())
    next(stream)
    stream.close()
    assert pulled == [0]  # batch size 4: image 0 alone fills a batch and comes out before 1 is pulled


def test_progress_counts_windows(tiny_checkpoint):
    segmenter = Segmenter(TINY_MODEL, str(tiny_checkpoint), "cpu", batch_size=5)
    prepared = [segmenter.prepare(natural_image(64, 64 + 40 * i), CLASSES) for i in range(3)]
    events: list[Progress] = []
    list(segmenter.run_windows(prepared, progress=events.append))
    assert {e.stage for e in events} == {"windows"}
    assert events[0].done == 0
    assert all(a.done <= b.done and a.total <= b.total for a, b in zip(events, events[1:]))
    assert events[-1].done == events[-1].total == sum(len(p.windows) for p in prepared)


def test_empty_input(segmenter):
    assert list(segmenter.run_windows([])) == []


@pytest.mark.parametrize(
    "error", [torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)"), RuntimeError("CUDA out of memory.")]
)
def test_out_of_memory_halves_batches_across_images(tiny_checkpoint, monkeypatch, error):
    jobs = _jobs()[:5]
    alone = Segmenter(TINY_MODEL, str(tiny_checkpoint), "cpu", feature_cache=False)
    expected = [alone.segment(image, _options(o)[0], **_options(o)[1]) for image, o in jobs]
    sizes = []
    original = Segmenter._window_features

    def small_gpu(self, method, crops):
        sizes.append(len(crops))
        if len(crops) > 2:
            raise error
        return original(self, method, crops)

    monkeypatch.setattr(Segmenter, "_window_features", small_gpu)
    streamed = Segmenter(TINY_MODEL, str(tiny_checkpoint), "cpu", batch_size=5, feature_cache=False)
    for (_, result), reference in zip(_stream(streamed, jobs), expected):
        _assert_same(result, reference)
    assert sizes[:2] == [5, 2] and max(sizes[2:]) <= 2  # halved once, then kept small


def test_out_of_memory_with_one_window_gives_up_clearly(segmenter, monkeypatch):
    def no_gpu_memory(self, *args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(Segmenter, "_window_features", no_gpu_memory)
    prepared = [segmenter.prepare(natural_image(64, 64), CLASSES) for _ in range(2)]
    with pytest.raises(ModelError, match="device ran out of memory even with one window"):
        list(segmenter.run_windows(prepared))


def test_feature_cache_in_a_stream(segmenter):
    jobs = _jobs()[:5]  # image 3 is image 0 with an alpha channel: the same pixels reach the model
    expected = [segmenter.segment(image, _options(o)[0], **_options(o)[1]) for image, o in jobs]
    assert [r.params["features_reused"] for r in expected] == [False, False, False, True, False]
    FEATURE_CACHE.clear()
    first = _stream(segmenter, jobs)
    again = _stream(segmenter, jobs)
    for (_, a), (_, b), reference in zip(first, again, expected):
        _assert_same(a, reference)  # features_reused included
        assert b.params["features_reused"]
        b.params["features_reused"] = reference.params["features_reused"]
        _assert_same(b, reference)


def test_a_cached_image_between_fresh_ones(tiny_checkpoint):
    segmenter = Segmenter(TINY_MODEL, str(tiny_checkpoint), "cpu", batch_size=5)
    images = [natural_image(64, 64), natural_image(80, 100), np.roll(natural_image(64, 64), 5, axis=1)]
    segmenter.segment(images[1], CLASSES)  # its features are now cached
    fresh = Segmenter(TINY_MODEL, str(tiny_checkpoint), "cpu", feature_cache=False)
    expected = [fresh.segment(image, CLASSES) for image in images]
    results = _stream(segmenter, [(image, {}) for image in images])
    assert [r.params["features_reused"] for _, r in results] == [False, True, False]
    for (_, result), reference in zip(results, expected):
        result.params["features_reused"] = False
        _assert_same(result, reference)


def test_prepare_from_several_threads_equals_sequential(segmenter):
    jobs = _jobs()
    sequential = [segmenter.prepare(image, _options(o)[0], **_options(o)[1], tag=i) for i, (image, o) in enumerate(jobs)]
    other = Segmenter(segmenter.model_name, segmenter.pretrained, "cpu")  # loads on first prepare

    def prepare(i):
        image, options = jobs[i % len(jobs)]
        return other.prepare(image, _options(options)[0], **_options(options)[1], tag=i % len(jobs))

    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(prepare, range(3 * len(jobs))))
    for i, prepared in enumerate(concurrent):
        reference = sequential[i % len(jobs)]
        assert torch.equal(prepared.pixels, reference.pixels)
        for name in ("windows", "size", "vocabulary", "short_side", "window", "stride", "logit_scale",
                     "prob_threshold", "refinement", "return_probs", "cache_key", "digest", "tag"):
            assert getattr(prepared, name) == getattr(reference, name), name


def test_a_threaded_pipeline_equals_segment(tiny_checkpoint):
    """Reader threads prepare, this thread runs the windows, writer threads finish."""
    jobs = _jobs()
    alone = Segmenter(TINY_MODEL, str(tiny_checkpoint), "cpu", feature_cache=False)
    expected = [alone.segment(image, _options(o)[0], **_options(o)[1]) for image, o in jobs]
    segmenter = Segmenter(TINY_MODEL, str(tiny_checkpoint), "cpu", batch_size=3, feature_cache=False)
    with ThreadPoolExecutor(3) as readers, ThreadPoolExecutor(3) as writers:
        futures = [readers.submit(segmenter.prepare, image, _options(o)[0], **_options(o)[1], tag=i)
                   for i, (image, o) in enumerate(jobs)]
        prepared = (future.result() for future in futures)  # blocks like a queue would
        finished = [writers.submit(segmenter.finish, p, canvas) for p, canvas in segmenter.run_windows(prepared)]
        results = [future.result() for future in finished]
    for result, reference in zip(results, expected, strict=True):
        _assert_same(result, reference)
