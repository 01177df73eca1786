"""The Table 1 benchmarks: packaged class names, the authors' settings, pairing images with labels
in each dataset's layout, reading index PNGs, and one-line errors."""

from __future__ import annotations

import hashlib
import re
import time
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_sclip.engine.errors import ImageError, ParameterError
from napari_sclip.evaluate.benchmarks import (
    BENCHMARKS,
    Benchmark,
    LayoutError,
    Pair,
    folder_pairs,
    get_benchmark,
    read_label,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
NAMES = Path(__file__).resolve().parents[1] / "napari_sclip" / "evaluate" / "names"

#: /work/shared/benchmarks/README.md's table, in its order: name, title, mmseg dataset, images,
#: labels, split file, short side, logit scale, prob. threshold, area threshold,
#: reduce_zero_label, classes, SCLIP mIoU.
TABLE = [
    ("voc21", "VOC21", "PascalVOCDataset", "JPEGImages", "SegmentationClass",
     "ImageSets/Segmentation/val.txt", 336, 65, 0.1, 0.1, False, 21, 59.1),
    ("context60", "Context60", "PascalContext60Dataset", "JPEGImages", "SegmentationClassContext",
     "ImageSets/SegmentationContext/val.txt", 336, 50, 0.1, None, False, 60, 30.4),
    ("coco-object", "COCO-Object", "COCOObjectDataset", "images/val2017", "annotations/val2017",
     None, 336, 50, 0.1, None, False, 81, 30.5),
    ("voc20", "VOC20", "PascalVOC20Dataset", "JPEGImages", "SegmentationClass",
     "ImageSets/Segmentation/val.txt", 336, 40, 0, None, True, 20, 80.4),
    ("cityscapes", "Cityscapes", "CityscapesDataset", "leftImg8bit/val", "gtFine/val",
     None, 560, 40, 0, None, False, 19, 32.2),
    ("context59", "Context59", "PascalContext59Dataset", "JPEGImages", "SegmentationClassContext",
     "ImageSets/SegmentationContext/val.txt", 336, 40, 0, None, True, 59, 34.2),
    ("ade20k", "ADE20K", "ADE20KDataset", "images/validation", "annotations/validation",
     None, 336, 40, 0, None, True, 150, 16.1),
    ("coco-stuff", "COCO-Stuff", "COCOStuffDataset", "images/val2017", "annotations/val2017",
     None, 448, 40, 0, None, False, 171, 22.4),
]

#: mmseg's img_suffix / seg_map_suffix for each dataset class (SCLIP's custom_datasets.py for
#: VOC20, Context60/59 and COCO-Object; mmseg/datasets/*.py for the others).
SUFFIXES = {
    "voc21": (".jpg", ".png"),
    "context60": (".jpg", ".png"),
    "coco-object": (".jpg", "_instanceTrainIds.png"),
    "voc20": (".jpg", ".png"),
    "cityscapes": ("_leftImg8bit.png", "_gtFine_labelTrainIds.png"),
    "context59": (".jpg", ".png"),
    "ade20k": (".jpg", ".png"),
    "coco-stuff": (".jpg", "_labelTrainIds.png"),
}

#: Lines in each name file (VOC21's and Context60's include background).
LINES = {
    "voc21": 21, "context60": 60, "coco-object": 81, "voc20": 20,
    "cityscapes": 19, "context59": 59, "ade20k": 150, "coco-stuff": 171,
}

VOC_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128] + [0] * (768 - 15)


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and "\r" not in message and message.strip()
    return message


# -- class names and settings ----------------------------------------------------------------


#: SHA-256 of shared/benchmarks/cls_*.txt (the authors' files, SCLIP b56bd30): checked against the
#: shared folder below where it is present, and against the packaged copies everywhere.
SHARED_SHA256 = {
    "cls_ade20k.txt": "e53ded02c488bdb903ef000a2d207e4ac4f2bb4502a72572e4aab7c2504aef3a",
    "cls_city_scapes.txt": "6f6782fc1bf92bfd9f5562192e92045e0e093870e613f387f6c98fc66d4ceba4",
    "cls_coco_object.txt": "3475d03d61f85ce03812ce62d019de8f2ea51053885374629d29a17fbd3f02a6",
    "cls_coco_stuff.txt": "fb98709b9ab1baff4fd930bac4a77772a0458c7d534911de545f9a4081e14a3e",
    "cls_context59.txt": "cd808465f06a16169edc25580073f0eda347e64f06cc1c2e24acd0b237f6497d",
    "cls_context60.txt": "5e620446a8699f292a4c2e37fa8918a33dd4f14713dc1b3f22884d2be68b45a1",
    "cls_voc20.txt": "c68f65a2b342397cdfe05ff5289517e1e370b1d574a218ff1a17db27f2576db1",
    "cls_voc21.txt": "80e643a9a143966800cd4a49324fd0be2f94c0d7bac817ea16a5f66ed706bc38",
}


def test_packaged_name_files_have_the_authors_bytes():
    package = resources.files("napari_sclip.evaluate").joinpath("names")
    for name, digest in SHARED_SHA256.items():
        assert hashlib.sha256(package.joinpath(name).read_bytes()).hexdigest() == digest, name


def test_packaged_name_files_equal_the_shared_ones():
    if not SHARED.is_dir():
        pytest.skip(f"no shared benchmark folder at {SHARED} (the digests above still check the copies)")
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in SHARED.glob("cls_*.txt")} == SHARED_SHA256
    shared = sorted(p.name for p in SHARED.glob("cls_*.txt"))
    assert sorted(p.name for p in NAMES.glob("cls_*.txt")) == shared
    assert sorted(b.names_file for b in BENCHMARKS.values()) == shared
    package = resources.files("napari_sclip.evaluate").joinpath("names")
    for name in shared:
        original = (SHARED / name).read_bytes()
        assert (NAMES / name).read_bytes() == original, name
        assert package.joinpath(name).read_bytes() == original, name


@pytest.mark.parametrize("name", list(LINES))
def test_class_names_have_one_line_per_class(name):
    benchmark = get_benchmark(name)
    names = benchmark.class_names()
    assert len(names) == LINES[name] == benchmark.num_classes
    assert all(line.strip() and "\n" not in line for line in names)
    assert names is not benchmark.class_names()  # callers may change their copy


def test_class_names_are_the_lines_as_written():
    voc21 = get_benchmark("voc21").class_names()
    assert voc21[0].startswith("sky, wall, tree, wood, grass, road, sea, river, mountain, sands")
    assert voc21[0].endswith("stair, floor, hill, rail, fence")
    person = "person, person in shirt, person in jeans, person in dress, person in sweater, "
    assert voc21[15] == person + "person in skirt, person in jacket"
    assert get_benchmark("voc20").class_names() == voc21[1:]
    # The authors' file ends in "wood " and their reader keeps the space.
    assert get_benchmark("context60").class_names()[-1] == "wood "
    assert get_benchmark("context59").class_names()[0] == "aeroplane"


@pytest.mark.parametrize("row", TABLE, ids=[row[0] for row in TABLE])
def test_settings_equal_the_readme_table(row):
    (name, title, dataset, images, labels, split, short, scale, prob, area, reduce, classes,
     miou) = row
    b = BENCHMARKS[name]
    assert (b.name, b.title, b.mmseg_dataset, b.images, b.labels, b.split_file) == (
        name, title, dataset, images, labels, split)
    assert (b.short_side, b.logit_scale, b.prob_threshold, b.area_threshold) == (
        short, scale, prob, area)
    assert (b.reduce_zero_label, b.num_classes, b.paper_miou) == (reduce, classes, miou)
    assert (b.image_suffix, b.label_suffix) == SUFFIXES[name]


def test_table_order_and_average():
    assert list(BENCHMARKS) == [row[0] for row in TABLE]
    assert round(sum(b.paper_miou for b in BENCHMARKS.values()) / 8, 1) == 38.2


def test_readme_table_parses_to_the_same_settings():
    readme = SHARED / "README.md"
    if not readme.is_file():
        pytest.skip(f"no {readme}")
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in readme.read_text(encoding="utf-8").splitlines()
        if line.startswith("| ") and not line.startswith("| Benchmark")
    ]
    assert [r[0] for r in rows] == [b.title for b in BENCHMARKS.values()]

    def number(cell):
        return None if cell in ("–", "-") else float(cell)

    for cells, b in zip(rows, BENCHMARKS.values()):
        assert cells[1].split()[0] == b.mmseg_dataset
        assert cells[2] == f"{b.images} / {b.labels}"
        assert cells[3] == (b.split_file or "–")
        assert int(cells[4]) == b.short_side
        assert number(cells[5]) == b.logit_scale
        assert number(cells[6]) == b.prob_threshold
        assert number(cells[7]) == b.area_threshold
        assert cells[8] == ("yes" if b.reduce_zero_label else "no")
        assert int(cells[9]) == b.num_classes
        assert float(cells[10]) == b.paper_miou


def test_benchmarks_are_frozen_records():
    b = get_benchmark("voc21")
    assert isinstance(b, Benchmark)
    with pytest.raises(AttributeError):
        b.short_side = 1  # type: ignore[misc]


# -- get_benchmark ---------------------------------------------------------------------------


def test_get_benchmark_ignores_case():
    assert get_benchmark("VOC21") is BENCHMARKS["voc21"]
    assert get_benchmark("COCO-Object") is BENCHMARKS["coco-object"]
    assert get_benchmark(" Ade20K ") is BENCHMARKS["ade20k"]


def test_unknown_benchmark_is_one_line_listing_the_names():
    with pytest.raises(ParameterError) as info:
        get_benchmark("voc2012")
    message = one_line(info)
    assert "'voc2012'" in message
    for name in BENCHMARKS:
        assert name in message
    with pytest.raises(ParameterError) as info:
        get_benchmark("voc\n21")
    one_line(info)


# -- synthetic layouts -----------------------------------------------------------------------


def write_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(len(path.name)).integers(0, 255, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, "JPEG" if path.suffix == ".jpg" else "PNG")


def write_palette(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = values.shape
    image = Image.frombytes("P", (width, height), values.astype(np.uint8).tobytes())
    image.putpalette(VOC_PALETTE)
    image.save(path)


def write_grey(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values).save(path)


def label_values(seed: int, dtype=np.uint8, high: int = 5) -> np.ndarray:
    values = np.random.default_rng(seed).integers(0, high, (6, 8)).astype(dtype)
    values[0, 0] = 255 if dtype == np.uint8 else high  # the ignore value survives as is
    return values


def make_layout(root: Path, b: Benchmark) -> dict[str, np.ndarray]:
    """Lay out a tiny copy of ``b``'s dataset under ``root``; returns the label values of the
    samples that pairs() must return, by name.  Decoys: an image outside the split, other label
    files beside the right ones, hidden files, files with other suffixes."""
    images, labels = root / b.images, root / b.labels
    palette = b.labels == "SegmentationClass"  # VOC ships palette PNGs; the others are grey
    if b.name == "cityscapes":
        names = ["frankfurt/frankfurt_000000_000294", "frankfurt/frankfurt_000000_000576",
                 "lindau/lindau_000000_000019"]
    elif b.name.startswith("coco"):
        names = ["000000000139", "000000000285", "000000000632"]
    elif b.name == "ade20k":
        names = ["ADE_val_00000001", "ADE_val_00000002"]
    else:
        names = ["2007_000033", "2007_000042", "2008_000123"]
    written = {}
    for seed, name in enumerate(names + ["2099_999999_extra"] if b.split_file else names):
        write_image(images / (name + b.image_suffix))
        values = label_values(seed)
        (write_palette if palette else write_grey)(labels / (name + b.label_suffix), values)
        written[name] = values
    if b.split_file:
        # Out of order, with a blank line, spaces and a Windows line end, as mmseg strips them.
        split = root / b.split_file
        split.parent.mkdir(parents=True, exist_ok=True)
        split.write_bytes(f"{names[2]}\r\n\n  {names[0]} \n{names[1]}\n".encode())
        del written["2099_999999_extra"]
    else:
        # Raw labels beside the converted ones, like COCO's X.png next to X_labelTrainIds.png.
        first = names[0]
        write_grey(labels / (first + "_gtFine_labelIds.png"), label_values(9))
        write_grey(labels / (first + ".raw.png"), label_values(9))
        (images / (first + ".txt")).write_text("not an image")
        write_image(images / Path(first).parent / ("._" + Path(first).name + b.image_suffix))
    return written


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_pairs_in_each_layout(tmp_path, name):
    b = BENCHMARKS[name]
    written = make_layout(tmp_path, b)
    pairs = b.pairs(tmp_path)
    assert pairs == [
        Pair(n, tmp_path / b.images / (n + b.image_suffix),
             tmp_path / b.labels / (n + b.label_suffix))
        for n in sorted(written)
    ]
    assert all(isinstance(p.image, Path) and p.image.is_file() and p.label.is_file() for p in pairs)
    for pair in pairs:
        values = read_label(pair.label)
        assert values.dtype == np.uint8 and values.shape == (6, 8)
        np.testing.assert_array_equal(values, written[pair.name])
    assert b.pairs(str(tmp_path)) == pairs  # a str root works as well


def test_voc_split_leaves_out_unlisted_images(tmp_path):
    b = BENCHMARKS["voc21"]
    make_layout(tmp_path, b)
    assert (tmp_path / "JPEGImages" / "2099_999999_extra.jpg").is_file()
    assert [p.name for p in b.pairs(tmp_path)] == ["2007_000033", "2007_000042", "2008_000123"]


def test_voc_labels_are_palette_indices_not_colours(tmp_path):
    b = BENCHMARKS["voc20"]
    make_layout(tmp_path, b)
    label = b.pairs(tmp_path)[0].label
    with Image.open(label) as image:
        assert image.mode == "P"
    values = read_label(label)
    assert values.ndim == 2 and set(np.unique(values)) <= {0, 1, 2, 3, 4, 255}


def test_cityscapes_names_keep_the_city_folder(tmp_path):
    b = BENCHMARKS["cityscapes"]
    make_layout(tmp_path, b)
    pair = b.pairs(tmp_path)[0]
    assert pair.name == "frankfurt/frankfurt_000000_000294"
    assert pair.image == (
        tmp_path / "leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png"
    )
    assert pair.label == (
        tmp_path / "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelTrainIds.png"
    )


def test_pairs_of_many_images_are_quick(tmp_path):
    b = BENCHMARKS["coco-stuff"]
    images, labels = tmp_path / b.images, tmp_path / b.labels
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for i in range(5000):  # empty files: pairs() must not open them
        (images / f"{i:012d}.jpg").touch()
        (labels / f"{i:012d}_labelTrainIds.png").touch()
    start = time.perf_counter()
    pairs = b.pairs(tmp_path)
    assert len(pairs) == 5000 and pairs[0].name == "000000000000"
    assert time.perf_counter() - start < 3.0


# -- layout errors ---------------------------------------------------------------------------


def test_missing_data_root(tmp_path):
    with pytest.raises(LayoutError) as info:
        get_benchmark("voc21").pairs(tmp_path / "VOCdevkit" / "VOC2012")
    message = one_line(info)
    assert "does not exist" in message and "VOC2012" in message and "--data-root" in message


def test_data_root_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(LayoutError) as info:
        get_benchmark("ade20k").pairs(tmp_path / "file")
    assert "is not a folder" in one_line(info)


def test_missing_labels_folder_says_what_the_data_root_must_hold(tmp_path):
    b = get_benchmark("voc21")
    make_layout(tmp_path, b)
    (tmp_path / "SegmentationClass").rename(tmp_path / "Segmentation")
    with pytest.raises(LayoutError) as info:
        b.pairs(tmp_path)
    message = one_line(info)
    assert str(tmp_path / "SegmentationClass") in message
    assert "--data-root must be the folder holding JPEGImages and SegmentationClass" in message
    assert "VOCdevkit/VOC2012" in message


def test_missing_images_folder(tmp_path):
    b = get_benchmark("cityscapes")
    (tmp_path / "gtFine" / "val").mkdir(parents=True)
    with pytest.raises(LayoutError) as info:
        b.pairs(tmp_path)
    message = one_line(info)
    assert str(tmp_path / "leftImg8bit" / "val") in message and "images folder" in message


def test_missing_label_names_the_first_and_the_count(tmp_path):
    b = get_benchmark("context59")
    make_layout(tmp_path, b)
    (tmp_path / "SegmentationClassContext" / "2007_000042.png").unlink()
    (tmp_path / "SegmentationClassContext" / "2008_000123.png").unlink()
    with pytest.raises(LayoutError) as info:
        b.pairs(tmp_path)
    message = one_line(info)
    assert "2 of 3 images have no label" in message
    assert "the first is 2007_000042" in message
    assert str(tmp_path / "SegmentationClassContext" / "2007_000042.png") in message


def test_missing_converted_label_says_how_it_is_made(tmp_path):
    b = get_benchmark("cityscapes")
    make_layout(tmp_path, b)
    next((tmp_path / "gtFine/val/lindau").glob("*_labelTrainIds.png")).unlink()
    with pytest.raises(LayoutError) as info:
        b.pairs(tmp_path)
    message = one_line(info)
    assert "1 of 3 images have no label" in message and "lindau/lindau_000000_000019" in message
    assert "dataset_converters/cityscapes.py" in message


def test_listed_image_missing(tmp_path):
    b = get_benchmark("voc21")
    make_layout(tmp_path, b)
    (tmp_path / "JPEGImages" / "2007_000033.jpg").unlink()
    with pytest.raises(LayoutError) as info:
        b.pairs(tmp_path)
    message = one_line(info)
    assert "1 of the 3 names" in message and "2007_000033" in message and "no image" in message


def test_missing_split_file(tmp_path):
    b = get_benchmark("context60")
    make_layout(tmp_path, b)
    (tmp_path / b.split_file).unlink()
    with pytest.raises(LayoutError) as info:
        b.pairs(tmp_path)
    message = one_line(info)
    assert "ImageSets/SegmentationContext/val.txt" in message and "VOCdevkit/VOC2010" in message


def split_error(root: Path, text: str) -> str:
    """The one-line :class:`LayoutError` of a VOC21 layout whose split file holds ``text``."""
    b = get_benchmark("voc21")
    if not (root / b.split_file).exists():
        make_layout(root, b)
    (root / b.split_file).write_text(text)
    with pytest.raises(LayoutError) as info:
        b.pairs(root)
    return one_line(info)


@pytest.mark.parametrize(
    "line", ["../../etc/passwd", "/etc/passwd", "a/../../b", "C:/Windows/x", "a\\..\\b", "./a"]
)
def test_split_lines_outside_the_images_folder_are_refused(tmp_path, line):
    message = split_error(tmp_path, f"2007_000033\n{line}\n")
    assert "line 2" in message and ascii(line) in message


def test_split_line_with_a_control_character_stays_one_line(tmp_path):
    split_error(tmp_path, "2007_000033\x0b\x1c2007\n")


def test_split_file_without_names_and_with_a_name_twice(tmp_path):
    assert "lists no images" in split_error(tmp_path, "\n  \n")
    assert "twice" in split_error(tmp_path, "2007_000033\n2007_000033 \n")


def test_no_images_found(tmp_path):
    b = get_benchmark("ade20k")
    (tmp_path / b.images).mkdir(parents=True)
    (tmp_path / b.labels).mkdir(parents=True)
    write_image(tmp_path / b.images / "photo.png")  # not the benchmark's suffix
    with pytest.raises(LayoutError) as info:
        b.pairs(tmp_path)
    message = one_line(info)
    assert "no images ending in .jpg" in message and "ade/ADEChallengeData2016" in message


def test_path_with_a_line_break_stays_one_line(tmp_path):
    with pytest.raises(LayoutError) as info:
        get_benchmark("voc21").pairs(tmp_path / "two\nlines")
    one_line(info)


# -- read_label ------------------------------------------------------------------------------


def test_read_label_palette_grey_and_sixteen_bit(tmp_path):
    values = np.array([[0, 1, 2], [15, 20, 255]], dtype=np.uint8)
    write_palette(tmp_path / "p.png", values)
    write_grey(tmp_path / "l.png", values)
    wide = np.array([[0, 300, 1000], [65535, 7, 256]], dtype=np.uint16)
    write_grey(tmp_path / "i16.png", wide)
    with Image.open(tmp_path / "i16.png") as image:
        assert image.mode == "I;16"
    for name in ("p.png", "l.png"):
        got = read_label(tmp_path / name)
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, values)
    got = read_label(tmp_path / "i16.png")
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, wide)


def test_read_label_bilevel(tmp_path):
    Image.fromarray(np.array([[True, False], [False, True]])).save(tmp_path / "b.png")
    got = read_label(tmp_path / "b.png")
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, [[1, 0], [0, 1]])


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA"])
def test_read_label_refuses_colour_images(tmp_path, mode):
    Image.new(mode, (4, 3)).save(tmp_path / "colour.png")
    with pytest.raises(ImageError) as info:
        read_label(tmp_path / "colour.png")
    message = one_line(info)
    assert "colour.png" in message and "must be an index PNG" in message and mode in message


def test_read_label_missing_unreadable_and_not_png(tmp_path):
    with pytest.raises(ImageError) as info:
        read_label(tmp_path / "absent.png")
    assert "absent.png" in one_line(info)
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    with pytest.raises(ImageError) as info:
        read_label(tmp_path / "junk.png")
    assert "junk.png" in one_line(info)
    Image.new("L", (4, 3)).save(tmp_path / "jpeg.png", "JPEG")
    with pytest.raises(ImageError) as info:
        read_label(tmp_path / "jpeg.png")
    assert "index PNG" in one_line(info)
    write_grey(tmp_path / "whole.png", label_values(1))
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as info:
        read_label(tmp_path / "cut.png")
    assert "cut.png" in one_line(info)
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(ImageError) as info:
        read_label(tmp_path / "folder.png")
    assert "folder.png" in one_line(info)


# -- folder_pairs ----------------------------------------------------------------------------


def make_folder(root: Path) -> tuple[Path, Path]:
    images, masks = root / "images", root / "masks"
    for relative in ("a.jpg", "B.JPG", "sub/c.TIF", "sub/deeper/d.png", "e.Jpeg", "f.webp"):
        path = images / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 3)).save(path, {".JPG": "JPEG", ".Jpeg": "JPEG"}.get(path.suffix))
    (images / "notes.txt").write_text("x")
    (images / ".hidden.png").write_bytes(b"")
    (images / ".cache").mkdir()
    Image.new("RGB", (4, 3)).save(images / ".cache" / "g.png")
    for stem in ("a", "B", "sub/c", "sub/deeper/d", "e", "f"):
        write_grey(masks / f"{stem}.png", label_values(2))
    return images, masks


def test_folder_pairs(tmp_path):
    images, masks = make_folder(tmp_path)
    assert folder_pairs(images, masks) == [
        Pair("B", images / "B.JPG", masks / "B.png"),
        Pair("a", images / "a.jpg", masks / "a.png"),
        Pair("e", images / "e.Jpeg", masks / "e.png"),
        Pair("f", images / "f.webp", masks / "f.png"),
        Pair("sub/c", images / "sub/c.TIF", masks / "sub/c.png"),
        Pair("sub/deeper/d", images / "sub/deeper/d.png", masks / "sub/deeper/d.png"),
    ]


def test_folder_pairs_skip_a_masks_folder_inside_the_images(tmp_path):
    images, _ = make_folder(tmp_path)
    (tmp_path / "masks").rename(images / "masks")
    pairs = folder_pairs(images, images / "masks")
    assert [p.name for p in pairs] == ["B", "a", "e", "f", "sub/c", "sub/deeper/d"]
    with pytest.raises(LayoutError) as info:
        folder_pairs(images, images)
    one_line(info)


def test_folder_pairs_missing_mask(tmp_path):
    images, masks = make_folder(tmp_path)
    (masks / "sub" / "c.png").unlink()
    (masks / "e.png").unlink()
    with pytest.raises(LayoutError) as info:
        folder_pairs(images, masks)
    message = one_line(info)
    assert "2 of 6 images have no mask" in message
    assert str(images / "e.Jpeg") in message and str(masks / "e.png") in message


def test_folder_pairs_duplicate_stems(tmp_path):
    images, masks = make_folder(tmp_path)
    Image.new("RGB", (4, 3)).save(images / "a.png")
    with pytest.raises(LayoutError) as info:
        folder_pairs(images, masks)
    message = one_line(info)
    assert str(images / "a.jpg") in message and str(images / "a.png") in message
    assert "share the mask" in message


def test_folder_pairs_missing_folders_and_no_images(tmp_path):
    images, masks = make_folder(tmp_path)
    with pytest.raises(LayoutError) as info:
        folder_pairs(tmp_path / "nope", masks)
    assert re.search("images folder .*nope does not exist", one_line(info))
    with pytest.raises(LayoutError) as info:
        folder_pairs(images, tmp_path / "nope")
    assert "masks folder" in one_line(info)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LayoutError) as info:
        folder_pairs(empty, masks)
    assert "no images" in one_line(info)


def test_each_method_gets_its_authors_settings_and_name_files():
    from napari_sclip.evaluate.benchmarks import WHOLE

    voc21, coco_object, cityscapes, stuff = (BENCHMARKS[name] for name in ("voc21", "coco-object", "cityscapes",
                                                                          "coco-stuff"))
    sclip = voc21.preset("sclip")
    assert (sclip.short_side, sclip.window, sclip.stride, sclip.logit_scale, sclip.prob_threshold,
            sclip.area_threshold) == (336, 224, 112, 65.0, 0.1, 0.1)
    assert voc21.preset("maskclip") == sclip  # its authors give none: SCLIP's
    naclip = voc21.preset("naclip")
    assert (naclip.window, naclip.stride, naclip.logit_scale, naclip.area_threshold) == (WHOLE, WHOLE, 40.0, None)
    assert stuff.preset("naclip").short_side == 336 and stuff.preset("sclip").short_side == 448
    scclip = coco_object.preset("sc-clip")
    assert (scclip.logit_scale, scclip.prob_threshold) == (55.0, 0.35)
    assert voc21.preset("sc-clip").area_threshold == 0.1
    clear = cityscapes.preset("clearclip")
    assert (clear.short_side, clear.window, clear.stride, clear.logit_scale) == (448, 224, 224, 50.0)
    assert all(BENCHMARKS[name].preset(method).source.endswith(BENCHMARKS[name].config)
               for name in BENCHMARKS for method in ("sclip", "naclip", "sc-clip", "clearclip"))
    # ClearCLIP's own VOC and COCO-Object files: one "background", no person synonyms, "tvmonitor".
    names = voc21.class_names("clearclip")
    assert len(names) == 21 and names[0] == "background" and names[15] == "person" and names[20] == "tvmonitor"
    assert [n for n in voc21.class_names() if n != names[voc21.class_names().index(n)]] == [
        voc21.class_names()[0], voc21.class_names()[15], voc21.class_names()[20]]
    assert coco_object.class_names("clearclip")[:2] == ["background", "person"]
    assert cityscapes.class_names("clearclip") == cityscapes.class_names()
    assert voc21.class_names("naclip") == voc21.class_names("sc-clip") == voc21.class_names()
