"""Inputs at every surface: which axes are slices and channels (one rule), odd but valid images,
bad and huge files, through the API, the files reader, the CLI (a subprocess) and the widget."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import test_widget
import tifffile
from PIL import Image

from napari_sclip.engine.errors import ImageError
from napari_sclip.engine.image import image_layout
from napari_sclip.io.images import read_image, read_with_layout

from conftest import TINY_MODEL, natural_image

CLASSES = ["a", "b"]
widget = test_widget.widget  # the fixture: a real napari window, the tiny model chosen by NAPARI_SCLIP_*


# -- the rule ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, axes, slice_shape, plane_shape",
    [
        ((30, 40), None, (), (30, 40)),
        ((30, 40, 1), None, (), (30, 40, 1)),
        ((30, 40, 4), None, (), (30, 40, 4)),
        ((7, 30, 40), None, (7,), (30, 40)),  # (Z, H, W)
        ((3, 30, 40), None, (3,), (30, 40)),  # channels-first without names: 3 slices, as napari shows it
        ((7, 30, 40, 3), None, (7,), (30, 40, 3)),  # (Z, H, W, C)
        ((2, 7, 30, 40), None, (2, 7), (30, 40)),  # (T, Z, H, W)
        ((2, 7, 30, 40, 2), None, (2, 7), (30, 40, 2)),  # (T, Z, H, W, C)
        ((300, 400, 200), None, (300,), (400, 200)),  # a volume whose last axis is long: slices
        ((3, 30, 40), "SYX", (), (30, 40, 3)),  # planar RGB
        ((3, 30, 40), "CYX", (), (30, 40, 3)),  # OME channels first
        ((5, 2, 30, 40), "ZCYX", (5,), (30, 40, 2)),  # ImageJ hyperstack
        ((2, 5, 3, 30, 40), "TZCYX", (2, 5), (30, 40, 3)),
        ((2, 30, 40, 3), "CYXS", (2,), (30, 40, 3)),  # samples are the colour; C indexes slices
        ((40, 30), "XY", (), (30, 40)),  # named axes in any order
        ((7, 30, 40), "QYX", (7,), (30, 40)),  # tifffile's unknown axes: the shape rule
    ],
)
def test_one_rule_for_slices_and_channels(shape, axes, slice_shape, plane_shape):
    layout = image_layout(shape, axes)
    assert layout.slice_shape == slice_shape and layout.plane_shape == plane_shape
    assert layout.count == int(np.prod(slice_shape))
    data = np.arange(np.prod(shape)).reshape(shape)
    planes = list(layout.planes(data))
    assert len(planes) == layout.count
    # Reference: named axes moved to (slices..., Y, X, channel), then the leading ones indexed.
    reference = data
    if axes:
        channel = "S" if "S" in axes else "C"
        order = [i for i, a in enumerate(axes) if a not in "YX" + channel]
        order += [axes.index("Y"), axes.index("X")] + ([axes.index(channel)] if channel in axes else [])
        reference = data.transpose(order)
    for index, plane in planes:
        np.testing.assert_array_equal(plane, reference if index is None else reference[index])


@pytest.mark.parametrize(
    "shape, axes, message",
    [
        ((256, 256, 5), None, r"\(256, 256, 5\) has 5 channels in its last axis"),
        ((512, 512, 20), None, "has 20 channels"),
        ((4, 256, 256, 7), None, "has 7 channels"),
        ((256, 256, 5), "QYX", "has 5 channels"),  # a TIFF written from a plain array
        ((6, 30, 40), "CYX", r"6 channels \(axis C of CYX\)"),
        ((30, 40, 5), "YXS", r"5 channels \(axis S of YXS\)"),
        ((10,), None, "not 2D"),
        ((0, 40), None, "empty"),
    ],
)
def test_the_rule_refuses_in_one_line(shape, axes, message):
    with pytest.raises(ImageError, match=message) as info:
        image_layout(shape, axes)
    assert "\n" not in str(info.value)


# -- the API -------------------------------------------------------------------------------------


def test_api_refuses_five_channels_before_any_work(segmenter, monkeypatch):
    monkeypatch.setattr(type(segmenter), "load", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ImageError, match="has 5 channels in its last axis.*pick or combine three"):
        segmenter.segment(np.zeros((256, 256, 5), np.uint8), CLASSES)


@pytest.mark.parametrize(
    "make",
    [
        lambda gray: gray.astype(np.float16) / 255,  # contrast (0, 1)
        lambda gray: gray.astype(np.int32) * 3 - 100,  # negative values, contrast (-100, 665)
        lambda gray: np.stack([gray.astype(np.uint16) * 257, np.full_like(gray, 9, np.uint16)], -1),
        lambda gray: np.stack([gray] * 3, -1).astype(np.float64) * 2,  # contrast (0, 510)
    ],
    ids=["float16", "int32", "uint16-gray-alpha", "float64-rgb"],
)
def test_odd_but_valid_arrays_give_the_8_bit_result(segmenter, make):
    gray = natural_image(48, 64)[..., 1]
    image = make(gray)
    limits = {np.dtype(np.float16): (0, 1), np.dtype(np.int32): (-100, 665),
              np.dtype(np.uint16): (0, 65535), np.dtype(np.float64): (0, 510)}[image.dtype]
    expected = segmenter.segment(gray, CLASSES).labels
    np.testing.assert_array_equal(segmenter.segment(image, CLASSES, contrast_limits=limits).labels, expected)


def test_bool_and_rgba_arrays_just_work(segmenter):
    mask = natural_image(40, 50)[..., 0] > 100
    assert segmenter.segment(mask, CLASSES).labels.shape == (40, 50)
    rgba = np.dstack([natural_image(40, 50), np.full((40, 50), 128, np.uint8)])
    np.testing.assert_array_equal(segmenter.segment(rgba, CLASSES).labels,
                                  segmenter.segment(rgba[..., :3], CLASSES).labels)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((32, 32), np.complex64), "dtype complex64 cannot be segmented"),
        (np.array([[1, "a"], [None, 2.0]], dtype=object), "dtype object cannot be segmented"),
        (np.full((32, 32), np.nan, np.float32), "1024 NaN or infinite"),
        (np.zeros((1, 1), np.uint8), r"1 x 1 px is too small.*16 px"),
        (np.zeros((1, 500), np.uint8), r"1 x 500 px is too small"),
        (np.zeros((256, 5), np.uint16), r"256 x 5 px is too small"),
        (np.zeros((2, 2, 2, 32, 40), np.uint8), r"stack of 2D slices \(8 of 32 x 40 px\)"),
        (np.zeros((3, 32, 40), np.uint8), r"numpy.moveaxis\(image, 0, -1\)"),
        (np.float32(3.0), "not 2D"),
    ],
)
def test_bad_arrays_get_one_line(segmenter, image, message):
    with pytest.raises(ImageError, match=message) as info:
        segmenter.segment(image, CLASSES)
    assert "\n" not in str(info.value)


# -- reading files -------------------------------------------------------------------------------


def test_tiff_axis_names_are_honoured(tmp_path):
    rng = np.random.default_rng(0)
    hyper = rng.integers(0, 4000, (5, 2, 32, 40), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "zcyx.tif", hyper, imagej=True, metadata={"axes": "ZCYX"})
    data, layout = read_with_layout(tmp_path / "zcyx.tif")
    planes = list(layout.planes(data))
    assert [index for index, _ in planes] == [(z,) for z in range(5)]
    for (z,), plane in planes:
        np.testing.assert_array_equal(plane, np.moveaxis(hyper[z], 0, -1))  # (H, W, 2)

    rgb = natural_image(32, 40)
    tifffile.imwrite(tmp_path / "cyx.ome.tif", np.moveaxis(rgb, -1, 0), ome=True, metadata={"axes": "CYX"})
    data, layout = read_with_layout(tmp_path / "cyx.ome.tif")
    [(index, plane)] = layout.planes(data)
    assert index is None
    np.testing.assert_array_equal(plane, rgb)

    tifffile.imwrite(tmp_path / "tzcyx.tif", np.zeros((2, 3, 2, 32, 40), np.float32), imagej=True,
                     metadata={"axes": "TZCYX"})
    _, layout = read_with_layout(tmp_path / "tzcyx.tif")
    assert (layout.slice_shape, layout.plane_shape) == ((2, 3), (32, 40, 2))

    tifffile.imwrite(tmp_path / "six.tif", np.zeros((6, 32, 40), np.uint16), imagej=True, metadata={"axes": "CYX"})
    with pytest.raises(ImageError, match=r"six.tif: image of shape \(6, 32, 40\) has 6 channels \(axis C of CYX\)"):
        read_with_layout(tmp_path / "six.tif")


def test_a_plain_256x256x5_tiff_is_five_channels_not_256_slices(tmp_path):
    tifffile.imwrite(tmp_path / "five.tif", np.zeros((256, 256, 5), np.uint8))
    assert tifffile.TiffFile(tmp_path / "five.tif").series[0].axes == "QYX"  # tifffile: 256 pages of 256 x 5
    with pytest.raises(ImageError, match="five.tif: image of shape \\(256, 256, 5\\) has 5 channels"):
        read_with_layout(tmp_path / "five.tif")


def _bad_files(folder: Path) -> dict[str, str]:
    """Write damaged and unusable files into ``folder``: {name: what their one line says}."""
    good = folder / "_good.png"
    Image.fromarray(natural_image(64, 64)).save(good)
    Image.fromarray(natural_image(64, 64)).save(folder / "_good.jpg", quality=90)
    png, jpg = good.read_bytes(), (folder / "_good.jpg").read_bytes()
    good.unlink(), (folder / "_good.jpg").unlink()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "empty.tif").write_bytes(b"")
    (folder / "text.png").write_text("not a png")
    tifffile.imwrite(folder / "stack.tif", np.zeros((4, 64, 64), np.uint16), photometric="minisblack")
    whole = (folder / "stack.tif").read_bytes()
    (folder / "stack.tif").unlink()
    (folder / "cut-stack.tif").write_bytes(whole[: len(whole) // 2])  # a stack copied halfway
    tifffile.imwrite(folder / "five.tif", np.zeros((256, 256, 5), np.uint8))
    return {
        "truncated.png": "cannot read image: image file is truncated",
        "truncated.jpg": "cannot read image: image file is truncated",
        "empty.png": "empty file",
        "empty.tif": "empty file",
        "text.png": "cannot read image: not an image format Pillow knows",
        "cut-stack.tif": "damaged TIFF: invalid page offset",
        "five.tif": "has 5 channels",
    }


def test_bad_files_give_one_line_and_print_nothing(tmp_path, capfd):
    expected = _bad_files(tmp_path)
    (tmp_path / "folder.png").mkdir()
    expected["folder.png"] = "cannot read image: Is a directory"
    for name, message in expected.items():
        with pytest.raises(ImageError) as info:
            read_with_layout(tmp_path / name)
        text = str(info.value)
        assert text.startswith(f"{tmp_path / name}: ") and message in text and "\n" not in text
    assert capfd.readouterr().err == ""  # tifffile's complaints are not printed


def test_size_bound_follows_pillow_without_its_warning(tmp_path, monkeypatch):
    """Pillow warns above MAX_IMAGE_PIXELS and refuses above twice that: we read silently up to
    the refusal and refuse every format there in one line."""
    import PIL.Image

    Image.fromarray(natural_image(40, 40)).save(tmp_path / "warned.png")  # 1600 px: Pillow will warn
    Image.fromarray(natural_image(40, 40)).save(tmp_path / "warned.jpg")
    Image.fromarray(natural_image(50, 50)).save(tmp_path / "big.png")  # 2500 px: over 2000
    tifffile.imwrite(tmp_path / "big.tif", natural_image(50, 50)[..., 0])
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_with_layout(tmp_path / "warned.png")[0].shape == (40, 40, 3)
        assert read_with_layout(tmp_path / "warned.jpg")[0].shape == (40, 40, 3)
    with pytest.raises(ImageError, match=r"big.png: over the 2,000 pixels per image .* crop it or cut it into tiles"):
        read_with_layout(tmp_path / "big.png")
    with pytest.raises(ImageError, match=r"big.tif: 2,500 pixels, over the 2,000 pixels per image"):
        read_with_layout(tmp_path / "big.tif")
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", None)  # the user lifted Pillow's bound
    assert read_with_layout(tmp_path / "big.tif")[0].shape == (50, 50)


def test_a_12000_px_square_png_reads_without_a_warning(tmp_path):
    """144 MP: over Pillow's warning threshold (89 MP), under its refusal (179 MP)."""
    Image.new("1", (12000, 12000)).save(tmp_path / "huge.png")  # cheap: 1 bit per pixel, compressed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data, layout = read_with_layout(tmp_path / "huge.png")
    assert data.shape == (12000, 12000) and layout.count == 1


def test_an_uncompressed_stack_is_mapped_not_loaded(tmp_path):
    """A 1 GB stack (a sparse file: cheap on disk) is read slice by slice: reading it and taking
    one slice keeps the process's peak memory far below the stack's size."""
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, shape=(1000, 1000, 1000), dtype="uint8", photometric="minisblack")
    code = textwrap.dedent(
        f"""
        # VmHWM: getrusage's peak would start at the forking pytest process's size
        from napari_sclip.io.images import read_with_layout
        before = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
        data, layout = read_with_layout({str(path)!r})
        assert layout.count == 1000 and layout.plane(data, (999,)).sum() == 0
        print((int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) - before) // 1024)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 100  # MB; loading would take 1000


def test_a_compressed_stack_is_decoded_a_page_at_a_time(tmp_path):
    """An 800 KB zlib stack that decodes to 800 MB: reading it and taking every slice keeps the
    process's peak memory near one slice (16 MB), not the stack."""
    path = tmp_path / "stackbomb.tif"
    tifffile.imwrite(path, (np.zeros((4000, 4000), np.uint8) for _ in range(50)), shape=(50, 4000, 4000),
                     dtype="uint8", compression="zlib", photometric="minisblack")
    assert path.stat().st_size < 2 << 20
    code = textwrap.dedent(
        f"""
        # VmHWM: getrusage's peak would start at the forking pytest process's size
        from napari_sclip.io.images import read_with_layout
        before = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
        data, layout = read_with_layout({str(path)!r})
        assert layout.count == 50 and all(plane.shape == (4000, 4000) and not plane.any()
                                          for _, plane in layout.planes(data))
        print((int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) - before) // 1024)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 150  # MB; decoding it whole would take 800


@pytest.mark.parametrize(
    "data, options",
    [
        (np.arange(2 * 3 * 2 * 32 * 40, dtype=np.float32).reshape(2, 3, 2, 32, 40),
         {"imagej": True, "metadata": {"axes": "TZCYX"}}),  # a slice gathers two pages (C)
        (np.arange(4 * 32 * 40 * 3).reshape(4, 32, 40, 3).astype(np.uint8), {"photometric": "rgb"}),
        (np.arange(2 * 3 * 32 * 40, dtype=np.uint16).reshape(2, 3, 32, 40),
         {"photometric": "minisblack", "byteorder": ">"}),
    ],
    ids=["imagej-tzcyx", "rgb-pages", "big-endian-2d-grid"],
)
def test_compressed_stacks_give_tifffiles_slices(tmp_path, data, options):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data, compression="zlib", **options)
    reference, (stack, layout) = tifffile.imread(path), read_with_layout(path)
    assert stack.shape == reference.shape and stack.dtype == reference.dtype
    planes = list(layout.planes(stack))
    assert len(planes) == layout.count > 1
    for index, plane in planes:
        np.testing.assert_array_equal(plane, layout.plane(reference, index))
    np.testing.assert_array_equal(read_image(path), reference)


def _damaged_compressed_stack(path: Path) -> Path:
    """Three zlib slices, the third one's compressed bytes overwritten."""
    tifffile.imwrite(path, np.stack([natural_image(40, 50)[..., k] for k in range(3)]), compression="zlib",
                     photometric="minisblack")
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[2].dataoffsets[0], tif.pages[2].databytecounts[0]
    data = bytearray(path.read_bytes())
    data[offset: offset + count] = b"\xff" * count
    path.write_bytes(bytes(data))
    return path


def test_a_damaged_page_of_a_compressed_stack_fails_its_slice_in_one_line(tmp_path, tiny_dir, cli_model):
    path = _damaged_compressed_stack(tmp_path / "stack.tif")
    with pytest.raises(ImageError, match=r"stack.tif: damaged TIFF: "):
        read_image(path)
    out = tmp_path / "out"
    done = _cli(tiny_dir, ["segment", str(path), "--classes", "a; b", "--out", str(out), *cli_model, "--quiet"])
    lines = done.stderr.splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr  # its only input failed
    assert lines[0].startswith(f"napari-sclip: error: {path} (slice 2): damaged TIFF: "), lines[0]
    assert sorted(p.stem for p in out.glob("*/meta/*.json")) == ["stack-000", "stack-001"]


# -- the batch and the CLI -----------------------------------------------------------------------


def test_label_images_reports_each_slice(segmenter, tmp_path):
    from napari_sclip.dataset.batch import label_images
    from napari_sclip.engine.vocabulary import parse_vocabulary

    Image.fromarray(natural_image(40, 50)).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "z.tif", np.stack([natural_image(40, 50)[..., k] for k in range(3)]),
                     photometric="minisblack")
    steps = []
    items = list(label_images([tmp_path / "a.png", tmp_path / "z.tif"], parse_vocabulary(CLASSES),
                              tmp_path / "out", segmenter, progress=steps.append))
    assert [item.status for item in items] == ["written", "written"]
    slices = [(s.done, s.total) for s in steps if s.stage == "slices"]
    assert slices[0] == (0, 2) and slices[-1] == (4, 4)  # two files; then 1 + 3 slices
    assert [done for done, _ in slices] == sorted(done for done, _ in slices)  # never backwards
    assert [total for _, total in slices] == sorted(total for _, total in slices)  # grows as stacks are read
    assert {done for done, _ in slices} == {0, 1, 2, 3, 4}  # each slice reported


def test_the_progress_bar_counts_slices_and_grows_with_stacks(tmp_path, tiny_checkpoint, monkeypatch):
    import tqdm.auto

    from napari_sclip.cli import main

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(natural_image(40, 50)).save(folder / "a.png")
    tifffile.imwrite(folder / "b.tif", np.stack([natural_image(40, 50)[..., k] for k in range(3)]),
                     photometric="minisblack")
    Image.fromarray(natural_image(40, 50)).save(folder / "c.png", format="PNG", compress_level=1)
    seen = []

    class Recording(tqdm.auto.tqdm):
        def refresh(self, *args, **kwargs):
            seen.append((self.n, self.total))
            return super().refresh(*args, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    code = main(["segment", str(folder), "--classes", "a; b", "--out", str(tmp_path / "out"),
                 "--model", TINY_MODEL, "--pretrained", str(tiny_checkpoint), "--device", "cpu"])
    assert code == 0
    assert seen[-1] == (5, 5)  # 1 + 3 + 1 slices
    assert all(n <= total for n, total in seen)
    assert [n for n, _ in seen] == sorted(n for n, _ in seen)  # never backwards
    assert seen[0][1] == 3 and 5 in {total for _, total in seen}  # 3 files until the stack was read
    assert [total for _, total in seen] == sorted(total for _, total in seen)


def _cli(tiny_dir: Path, args: list[str], before: str = "") -> subprocess.CompletedProcess:
    """``napari-sclip`` in a fresh interpreter with the tiny model registered (``before``: code to
    run first)."""
    code = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import register_tiny_model
        register_tiny_model(Path({str(tiny_dir)!r}))
        {before}
        from napari_sclip.cli import main
        sys.exit(main({args!r}))
        """
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


@pytest.fixture
def cli_model(tiny_checkpoint):
    return ["--model", TINY_MODEL, "--pretrained", str(tiny_checkpoint), "--device", "cpu"]


def test_cli_skips_each_bad_image_with_one_line(tmp_path, tiny_dir, cli_model):
    folder = tmp_path / "in"
    folder.mkdir()
    expected = _bad_files(folder)
    Image.fromarray(natural_image(40, 40)).save(folder / "good.png")
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(folder / "dot.png")
    Image.fromarray(natural_image(40, 40)[:1]).save(folder / "line.png")  # 1 x 40
    tifffile.imwrite(folder / "nan.tif", np.full((32, 32), np.nan, np.float32))
    tifffile.imwrite(folder / "complex.tif", np.zeros((32, 32), np.complex64))
    tifffile.imwrite(folder / "thin.tif", np.zeros((6, 40, 8), np.uint16))  # 6 slices of 40 x 8 px
    tifffile.imwrite(folder / "five-d.tif", np.zeros((2, 2, 2, 32, 40), np.uint16))  # nD: 8 slices
    expected.update({
        "dot.png": "1 x 1 px is too small to segment: both sides must be at least the model's patch size (16 px)",
        "line.png": "1 x 40 px is too small",
        "nan.tif": "1024 NaN or infinite pixel values",
        "complex.tif": "dtype complex64 cannot be segmented",
        "thin.tif": "thin.tif (slice 0): image of 40 x 8 px is too small",
    })
    out = tmp_path / "out"
    done = _cli(tiny_dir, ["segment", str(folder), "--classes", "a; b", "--out", str(out), *cli_model, "--quiet"])
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == len(expected), done.stderr  # one line per bad image, nothing else
    for name, message in expected.items():
        line = next(line for line in lines if line.startswith(f"napari-sclip: skipped {folder / name}"))
        assert message in line
    samples = sorted(p.stem for p in out.glob("*/meta/*.json"))
    assert samples == ["five-d-000-000-000", "five-d-000-000-001", "five-d-000-001-000", "five-d-000-001-001",
                       "five-d-001-000-000", "five-d-001-000-001", "five-d-001-001-000", "five-d-001-001-001",
                       "good"]


def test_cli_exits_1_when_the_only_input_is_unusable(tmp_path, tiny_dir, cli_model):
    tifffile.imwrite(tmp_path / "five.tif", np.zeros((256, 256, 5), np.uint8))
    (tmp_path / "x.png").mkdir()  # a folder named like an image
    done = _cli(tiny_dir, ["segment", str(tmp_path / "five.tif"), "--classes", "a", "--out", str(tmp_path / "o"),
                           *cli_model, "--quiet"])
    assert done.returncode == 1
    assert done.stderr == (f"napari-sclip: error: {tmp_path / 'five.tif'}: image of shape (256, 256, 5) has 5 "
                           "channels in its last axis; napari-sclip segments gray, gray + alpha, RGB or RGBA "
                           "(1 to 4 channels): pick or combine three as RGB first\n")
    done = _cli(tiny_dir, ["segment", str(tmp_path / "x.png"), "--classes", "a", "--out", str(tmp_path / "o"),
                           *cli_model, "--quiet"])
    assert done.returncode == 1
    assert done.stderr.startswith(f"napari-sclip: error: folder {tmp_path / 'x.png'} holds no images")
    assert done.stderr.count("\n") == 1


def test_cli_reads_large_images_silently_and_refuses_larger_ones_in_one_line(tmp_path, tiny_dir, cli_model):
    """Pillow's bound lowered in the CLI's process stands for a 13000 x 13000 image, cheaply; and a
    real 20000 x 20000 PNG is refused before it is decoded."""
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(natural_image(40, 40)).save(folder / "warned.png")  # Pillow would warn: 1600 > 1000
    Image.fromarray(natural_image(50, 50)).save(folder / "big.png")  # Pillow refuses: 2500 > 2000
    Image.new("1", (20000, 20000)).save(tmp_path / "huge.png")  # 400 MP, 50 KB on disk
    done = _cli(tiny_dir, ["segment", str(folder), "--classes", "a; b", "--out", str(tmp_path / "out"),
                           *cli_model, "--quiet"], before="import PIL.Image; PIL.Image.MAX_IMAGE_PIXELS = 1000")
    assert done.returncode == 2
    assert done.stderr == (f"napari-sclip: skipped {folder / 'big.png'}: over the 2,000 pixels per image that "
                           "napari-sclip reads (Pillow's decompression-bomb bound); crop it or cut it into "
                           "tiles first\n")
    assert [p.stem for p in tmp_path.glob("out/*/meta/*.json")] == ["warned"]
    done = _cli(tiny_dir, ["segment", str(tmp_path / "huge.png"), "--classes", "a", "--out", str(tmp_path / "o"),
                           *cli_model, "--quiet"])
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "over the 178,956,970 pixels per image" in done.stderr


def test_cli_segments_a_channels_first_ome_tiff_as_one_rgb_image(tmp_path, tiny_dir, cli_model, segmenter):
    rgb = natural_image(48, 60)
    tifffile.imwrite(tmp_path / "cyx.ome.tif", np.moveaxis(rgb, -1, 0), ome=True, metadata={"axes": "CYX"})
    out = tmp_path / "out"
    done = _cli(tiny_dir, ["segment", str(tmp_path / "cyx.ome.tif"), "--classes", "a; b", "--out", str(out),
                           *cli_model, "--quiet"])
    assert done.returncode == 0, done.stderr
    [mask] = out.glob("*/masks/*.png")
    expected = segmenter.segment(rgb, CLASSES).labels - 1
    np.testing.assert_array_equal(np.asarray(Image.open(mask)), expected)
    [stored] = out.glob("*/images/*.png")
    np.testing.assert_array_equal(np.asarray(Image.open(stored)), rgb)  # stored channels last


# -- the widget ----------------------------------------------------------------------------------


@pytest.mark.gui
@pytest.mark.parametrize(
    "shape, message",
    [
        ((256, 256, 5), "error: image of shape (256, 256, 5) has 5 channels in its last axis"),
        ((256, 256, 2), "error: the layer's shape (256, 256, 2) has 2 channels in its last axis, which napari "
                        "shows as 256 slices of 256 x 2 px"),
        ((300, 8), "error: image of 300 x 8 px is too small to segment"),
    ],
)
def test_widget_refuses_channels_and_thin_images_in_one_line(widget, qtbot, shape, message):
    from qtpy.QtCore import Qt

    viewer = widget.viewer
    image = viewer.add_image(np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8), name="odd")
    assert not image.rgb
    qtbot.mouseClick(widget._run_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    status = widget._status.text()
    assert status.startswith(message) and "\n" not in status
    assert [layer.name for layer in viewer.layers] == ["odd"]  # no labels layer
    assert widget._run_button.text() == "Segment"
    if "channels" in message:  # the shape alone decides: refused on the click, no engine loaded
        assert widget._segmenter is None
