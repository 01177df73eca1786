"""Window placement, per-pixel counts, the resize size, and the bilinear resize itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_sclip.engine.resize import resize_bilinear
from napari_sclip.engine.windows import resized_shape, slide_windows, window_counts, window_starts


def test_window_starts_along_an_axis():
    # 504 px, window 224, stride 112: (504 - 224 + 111) // 112 + 1 = 4 windows, the last shifted.
    assert window_starts(504, 224, 112) == [(0, 224), (112, 336), (224, 448), (280, 504)]
    assert window_starts(336, 224, 112) == [(0, 224), (112, 336)]
    assert window_starts(224, 224, 112) == [(0, 224)]
    assert window_starts(100, 224, 112) == [(0, 100)]  # shorter than a window
    assert window_starts(225, 224, 112) == [(0, 224), (1, 225)]


@pytest.mark.parametrize("length, window, stride", [(1000, 224, 112), (337, 224, 100), (50, 16, 16), (7, 3, 1)])
def test_window_count_formula_and_coverage(length, window, stride):
    spans = window_starts(length, window, stride)
    assert len(spans) == max(length - window + stride - 1, 0) // stride + 1
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(stop - start == min(window, length) for start, stop in spans)
    assert all(b[0] - a[0] <= stride for a, b in zip(spans, spans[1:]))  # no gaps


def test_windows_are_row_major_and_counts_add_up():
    windows = slide_windows(336, 504, 224, 112)
    assert len(windows) == 2 * 4
    assert windows[0] == (0, 224, 0, 224) and windows[3] == (0, 224, 280, 504)
    assert windows[4] == (112, 336, 0, 224)
    counts = window_counts(336, 504, windows)
    expected = np.zeros((336, 504), int)
    for y1, y2, x1, x2 in windows:
        expected[y1:y2, x1:x2] += 1
    np.testing.assert_array_equal(counts, expected)
    assert counts.min() == 1 and counts.max() == 2 * 3  # rows overlap twice, columns up to three times
    assert counts[0, 0] == 1 and counts[150, 300] == 2 * 3


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((480, 640), (336, 448)),
        ((336, 448), (336, 448)),
        ((1024, 2048), (336, 672)),
        ((100, 3000), (68, 2048)),  # long side capped at 2048: scale = 2048 / 3000
        ((333, 500), (336, 505)),  # int(500 * 336 / 333 + 0.5) = 505
        ((1, 3000), (16, 2048)),  # raised to one patch
    ],
)
def test_resized_shape(shape, expected):
    assert resized_shape(*shape, short_side=336, min_side=16) == expected


@pytest.mark.parametrize("src, dst", [((14, 14), (224, 224)), ((37, 53), (336, 480)), ((700, 900), (336, 432)), ((9, 9), (9, 9))])
def test_resize_matches_interpolate(src, dst):
    x = torch.randn(5, *src)
    expected = F.interpolate(x[None], size=dst, mode="bilinear", align_corners=False)[0]
    # Source coordinates near 900 carry float32 rounding of ~1e-5 in any formulation.
    torch.testing.assert_close(resize_bilinear(x, dst), expected, rtol=0, atol=1e-4)
    band = resize_bilinear(x, dst, rows=(3, 9))
    torch.testing.assert_close(band, expected[:, 3:9], rtol=0, atol=1e-4)


def test_resize_identity_is_exact():
    x = torch.randint(0, 255, (3, 40, 50), dtype=torch.uint8)
    assert torch.equal(resize_bilinear(x, (40, 50)), x.float())


def test_resize_reads_a_strided_uint8_view():
    hwc = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    view = torch.from_numpy(hwc).permute(2, 0, 1)
    expected = F.interpolate(view[None].float(), size=(30, 40), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(resize_bilinear(view, (30, 40)), expected, rtol=0, atol=1e-4)
