"""The 8-bit RGB conversion rule."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sclip.engine.errors import ImageError
from napari_sclip.engine.image import to_rgb_uint8


def test_uint8_rgb_is_kept():
    rgb = np.random.default_rng(0).integers(0, 255, (5, 6, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_rgb_uint8(rgb), rgb)


def test_gray_is_repeated_and_alpha_dropped():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(to_rgb_uint8(gray), np.stack([gray] * 3, -1))
    np.testing.assert_array_equal(to_rgb_uint8(np.stack([gray, gray * 0 + 9], -1)), np.stack([gray] * 3, -1))
    rgba = np.dstack([np.stack([gray] * 3, -1), np.full((3, 4), 200, np.uint8)])
    np.testing.assert_array_equal(to_rgb_uint8(rgba), np.stack([gray] * 3, -1))


def test_contrast_limits_map_linearly_and_clip():
    data = np.array([[0, 1000, 2000, 3000, 4000]], np.uint16)
    out = to_rgb_uint8(data, contrast_limits=(1000, 3000))[..., 0]
    np.testing.assert_array_equal(out, [[0, 0, 128, 255, 255]])  # 127.5 rounds to even 128


def test_float_without_limits_uses_robust_percentiles():
    rng = np.random.default_rng(1)
    data = rng.normal(100.0, 10.0, (200, 200)).astype(np.float32)
    data[0, 0] = 1e9  # a hot pixel must not squash the rest
    out = to_rgb_uint8(data)[..., 0]
    lo, hi = np.percentile(data, [0.5, 99.5])
    expected = np.rint(np.clip((data - lo) * 255 / (hi - lo), 0, 255)).astype(np.uint8)
    assert np.abs(out.astype(int) - expected).max() <= 1
    assert out.std() > 30


def test_rgb_channels_share_one_mapping():
    data = np.zeros((10, 10, 3), np.uint16)
    data[..., 0] = np.linspace(0, 1000, 100).reshape(10, 10)
    data[..., 1] = 500
    out = to_rgb_uint8(data, contrast_limits=(0, 1000))
    assert (out[..., 1] == 128).all()  # not stretched to its own range


def test_constant_images_map_to_zero():
    assert (to_rgb_uint8(np.full((4, 4), 7.5, np.float64)) == 0).all()


def test_bool_maps_to_0_and_255():
    out = to_rgb_uint8(np.array([[True, False]]))
    np.testing.assert_array_equal(out[..., 0], [[255, 0]])


@pytest.mark.parametrize("limits", [(5, 5), (10, 1), (0, np.inf), ("a", "b"), (1,)])
def test_bad_contrast_limits(limits):
    with pytest.raises(ImageError, match="contrast_limits"):
        to_rgb_uint8(np.zeros((4, 4), np.uint16), contrast_limits=limits)


def test_one_dimensional_input():
    with pytest.raises(ImageError, match="not 2D"):
        to_rgb_uint8(np.zeros(10))


@pytest.mark.parametrize(
    "shape, planes, plane_shape",
    [
        ((30, 40), [None], (30, 40)),
        ((30, 40, 3), [None], (30, 40, 3)),
        ((30, 40, 2), [None], (30, 40, 2)),  # two channels: still one 2D image
        ((5, 30, 40), [(0,), (1,), (2,), (3,), (4,)], (30, 40)),  # a (Z, H, W) stack
        ((2, 30, 40, 3), [(0,), (1,)], (30, 40, 3)),  # an RGB stack
        ((2, 3, 30, 40), [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)], (30, 40)),  # (T, Z, H, W)
    ],
)
def test_image_planes(shape, planes, plane_shape):
    from napari_sclip.engine.image import image_layout

    image = np.arange(np.prod(shape), dtype=np.uint16).reshape(shape)
    found = list(image_layout(shape).planes(image))
    assert [index for index, _ in found] == planes
    for index, plane in found:
        assert plane.shape == plane_shape
        np.testing.assert_array_equal(plane, image if index is None else image[index])
