"""Exports and documented loaders, read by the real clients: Datumaro, torchvision, Hugging Face
``datasets`` and pycocotools.  The loaders are the code blocks of docs/dataset.md, run as written."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from napari_sclip.classes import ClassRegistry
from napari_sclip.cli import main
from napari_sclip.colors import label_color
from napari_sclip.dataset import format as fmt
from napari_sclip.dataset.reader import read_png, sample_ids
from napari_sclip.dataset.writer import DatasetWriter, Sample
from napari_sclip.io.images import read_image

from conftest import natural_image
from dataset_helpers import cli_command, save_images

DOCS = Path(__file__).resolve().parents[1] / "docs" / "dataset.md"
CLI = [sys.executable, "-m", "napari_sclip.cli"]
#: Class names that labelmap.txt's ``name:r,g,b:parts:actions`` lines cannot carry as they are.
ODD_NAMES = ("a:b", "#tag", "50% cover", "猫 ñ, übel", "x" * 300, "background", "_background")


def documented_code(heading: str) -> str:
    """The ```python blocks under ``heading`` in docs/dataset.md, up to the next heading of the
    same or a higher level, joined."""
    lines = DOCS.read_text(encoding="utf-8").splitlines()
    level = len(heading) - len(heading.lstrip("#"))
    blocks, fence, code = [], None, []
    for line in lines[lines.index(heading) + 1 :]:
        if fence is None and line.startswith("#") and len(line) - len(line.lstrip("#")) <= level:
            break
        if line.strip().startswith("```"):
            if fence == "python":
                blocks.append(textwrap.dedent("\n".join(code)))
            fence, code = (line.strip()[3:] or "text", []) if fence is None else (None, [])
        elif fence is not None:
            code.append(line)
    assert blocks, f"no Python code under {heading!r} in {DOCS}"
    return "\n\n".join(blocks)


def run_documented(heading: str, folder: Path, monkeypatch) -> dict:
    """Run the code under ``heading`` in ``folder``; returns the names it defined."""
    monkeypatch.chdir(folder)
    namespace: dict = {"__name__": "documented"}
    exec(compile(documented_code(heading), f"{DOCS} ({heading})", "exec"), namespace)
    return namespace


def turned_jpeg(path: Path, height: int, width: int) -> Path:
    """A JPEG stored ``width`` x ``height`` whose EXIF orientation (6) shows it turned."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(natural_image(width, height)).save(path, exif=exif)
    return path


def make_dataset(root: Path, registry: ClassRegistry, images: list[tuple[str, np.ndarray, Path | None]], seed: int = 0):
    """A dataset of ``(stem, image, source file or None)`` with random labels over the registry's
    classes and unlabelled pixels; images without a source are stored as PNG."""
    rng = np.random.default_rng(seed)
    values = np.array([0, *registry.active])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "\\d+ classes do not fit 8-bit masks")
        writer = DatasetWriter(root, registry, {"train": 0.5, "val": 0.5})
        for stem, image, source in images:
            labels = values[rng.integers(0, len(values), image.shape[:2])]
            writer.write(Sample(stem, labels, image=image, source=source))
        writer.rebuild_index()
    return root


def stored(root: Path) -> dict[str, tuple[str, Path, np.ndarray]]:
    """``id -> (split, image file, mask)`` of every sample."""
    found = {}
    for split, image_id in sample_ids(root):
        meta = json.loads((root / split / "meta" / f"{image_id}.json").read_text())
        found[image_id] = (split, root / split / meta["image"], read_png(root / split / meta["mask"]))
    return found


def voc_indices(mask: np.ndarray) -> np.ndarray:
    """What a VOC export's palette mask holds for a dataset mask: 0 for ignore, else id + 1."""
    return np.where(mask == fmt.ignore_value(mask.dtype), 0, mask.astype(np.int64) + 1)


@pytest.fixture
def odd_dataset(tmp_path):
    """Odd class names; copied JPEGs, PNGs made from arrays, and JPEGs turned by EXIF (one in
    each split)."""
    registry = ClassRegistry()
    registry.update(tuple((name,) for name in ("cat", *ODD_NAMES)))
    sources = tmp_path / "sources"
    sources.mkdir()
    images = []
    for k in range(3):
        photo = sources / f"photo{k}.jpg"
        Image.fromarray(np.roll(natural_image(24, 32), 7 * k, axis=1)).save(photo)
        images.append((photo.stem, read_image(photo), photo))
        images.append((f"array.{k}", np.roll(natural_image(24, 32), 5 * k, axis=0), None))
    for k in range(2):  # labels in the frame they are shown in
        turned = turned_jpeg(sources / f"turned{k}.jpg", 20 + 2 * k, 30)  # distinct files: distinct samples
        images.append((turned.stem, read_image(turned), turned))
    root = make_dataset(tmp_path / "dataset", registry, images)
    assert {split for split, _, _ in stored(root).values()} == {"train", "val"}
    return root


@pytest.fixture
def wide_dataset(tmp_path):
    """300 classes (16-bit masks, ignore 65535); 16-bit grayscale images, an RGB PNG and a JPEG
    turned by EXIF."""
    registry = ClassRegistry()
    registry.update(tuple((f"class {i}",) for i in range(300)))
    rng = np.random.default_rng(3)
    images = [(f"deep{k}", rng.integers(0, 65536, (24, 32), dtype=np.uint16), None) for k in range(4)]
    images.append(("colour", natural_image(24, 32), None))
    turned = turned_jpeg(tmp_path / "turned.jpg", 20, 30)
    images.append(("turned", read_image(turned), turned))
    root = make_dataset(tmp_path / "my-dataset", registry, images)
    masks = [mask for _, _, mask in stored(root).values()]
    assert all(mask.dtype == np.uint16 for mask in masks) and max(int(m[m < 300].max()) for m in masks) > 255
    return root


# -- VOC through Datumaro -------------------------------------------------------------------------


def datumaro_voc(out: Path):
    dm = pytest.importorskip("datumaro")
    return dm, dm.Dataset.import_from(str(out), "voc_segmentation")


def check_datumaro_reads(root: Path, out: Path, class_names: list[str]) -> None:
    """Datumaro sees each sample once, in its split, with its classes by name and every pixel."""
    dm, dataset = datumaro_voc(out)
    samples = stored(root)
    assert len(dataset) == len(samples)
    assert sorted((item.id, item.subset) for item in dataset) == sorted((i, s[0]) for i, s in samples.items())
    labels = dataset.categories()[dm.AnnotationType.label]
    names = [unquote(label.name) for label in labels]
    assert names[1:] == class_names and names[0].strip("_") == "background" and names[0] not in class_names
    for item in dataset:
        split, image_path, mask = samples[item.id]
        read = np.full(mask.shape, -1)
        for annotation in item.annotations:
            read[annotation.image] = annotation.label
        np.testing.assert_array_equal(read, voc_indices(mask))
        pixels = item.media.data  # BGR, as Datumaro decodes it (no EXIF)
        assert pixels.shape[:2] == mask.shape
        if image_path.suffix == ".png" or item.id.startswith("turned"):
            np.testing.assert_array_equal(pixels[..., ::-1], read_image(image_path))


def test_datumaro_reads_every_image_once_with_odd_class_names_and_every_pixel(odd_dataset, tmp_path):
    out = tmp_path / "voc"
    assert main(["export-voc", str(odd_dataset), str(out), "--quiet"]) == 0
    check_datumaro_reads(odd_dataset, out, ["cat", *ODD_NAMES])
    assert sorted(p.name for p in (out / "JPEGImages").iterdir()) == sorted(
        ["photo0.jpg", "photo1.jpg", "photo2.jpg", "array.0.png", "array.1.png", "array.2.png", "turned0.png", "turned1.png"]
    )
    for k in range(3):  # JPEGs keep their bytes
        assert (out / "JPEGImages" / f"photo{k}.jpg").read_bytes() == (tmp_path / "sources" / f"photo{k}.jpg").read_bytes()


def test_updating_an_older_export_removes_its_default_list_and_renamed_images(odd_dataset, tmp_path):
    out = tmp_path / "voc"
    assert main(["export-voc", str(odd_dataset), str(out), "--quiet"]) == 0
    lists = out / "ImageSets" / "Segmentation"
    (lists / "default.txt").write_text("".join(f"{i}\n" for i in stored(odd_dataset)))  # as older versions wrote
    (lists / "test.txt").write_text("photo0\n")
    (out / "JPEGImages" / "photo0.jpg").rename(out / "JPEGImages" / "photo0.jpeg")
    (out / "JPEGImages" / "turned0.jpg").write_bytes(b"stale")
    assert main(["export-voc", str(odd_dataset), str(out), "--quiet"]) == 0
    assert sorted(p.name for p in lists.iterdir()) == ["train.txt", "val.txt"]
    assert not (out / "JPEGImages" / "photo0.jpeg").exists() and not (out / "JPEGImages" / "turned0.jpg").exists()
    check_datumaro_reads(odd_dataset, out, ["cat", *ODD_NAMES])


def test_classes_sharing_a_colour_stay_apart_in_datumaro(tmp_path):
    assert label_color(3) == label_color(990)  # the golden-angle hues meet again
    registry = ClassRegistry(names={3: ("early",), 990: ("late",)}, active=[3, 990])
    root = make_dataset(tmp_path / "dataset", registry, [(f"im{k}", natural_image(24, 32), None) for k in range(4)])
    out = tmp_path / "voc"
    assert main(["export-voc", str(root), str(out), "--quiet"]) == 0
    check_datumaro_reads(root, out, ["early", "late"])


@pytest.mark.parametrize(
    "name", ["a:b", "a::b:", "#tag", " lead", "\tlead", "50%", "%3A", "a\nb", "a\rb", "a\u2028b", "x\x00y", "猫:ñ", "a, b", "y" * 1000]
)
def test_labelmap_lines_parse_back_to_the_names_with_datumaros_parser(name, tmp_path):
    pytest.importorskip("datumaro")
    from datumaro.plugins.data_formats.voc.format import parse_label_map

    registry = ClassRegistry()
    registry.update(((name,), ("plain",), ("%3A" if name != "%3A" else "%",)))
    train_ids = fmt.extend_train_ids({}, registry)
    fmt.write_class_files(tmp_path, registry, train_ids)  # the dataset's own labelmap.txt
    parsed = parse_label_map(str(tmp_path / "labelmap.txt"))
    assert [unquote(key) for key in parsed] == [registry.display_name(uid) for uid in fmt.by_train_id(train_ids)]
    assert [color for color, _, _ in parsed.values()] == [label_color(uid) for uid in fmt.by_train_id(train_ids)]


# -- VOC through torchvision ----------------------------------------------------------------------


def check_voc_segmentation(voc, root: Path, split: str) -> None:
    samples = {i: s for i, s in stored(root).items() if s[0] == split}
    assert len(voc) == len(samples) > 0
    for index in range(len(voc)):
        image, target = voc[index]
        _, image_path, mask = samples[Path(voc.masks[index]).stem]
        np.testing.assert_array_equal(np.asarray(image), read_image(image_path))
        np.testing.assert_array_equal(np.asarray(target), voc_indices(mask))


def test_torchvision_reads_an_export_of_jpegs_as_it_is(tmp_path):
    from torchvision.datasets import VOCSegmentation

    sources = tmp_path / "sources"
    sources.mkdir()
    images = []
    for k in range(6):
        photo = sources / f"photo{k}.jpeg"  # stored as .jpeg in the dataset, .jpg in the export
        Image.fromarray(np.roll(natural_image(24, 32), 7 * k, axis=1)).save(photo)
        images.append((photo.stem, read_image(photo), photo))
    registry = ClassRegistry()
    registry.update((("cat",), ("dog",)))
    root = make_dataset(tmp_path / "dataset", registry, images)
    assert main(["export-voc", str(root), str(tmp_path / "voc" / "VOCdevkit" / "VOC2012"), "--quiet"]) == 0
    for split in ("train", "val"):
        check_voc_segmentation(VOCSegmentation(str(tmp_path / "voc"), year="2012", image_set=split), root, split)


def test_the_documented_torchvision_snippet_reads_png_and_turned_images(odd_dataset, tmp_path, monkeypatch):
    assert main(["export-voc", str(odd_dataset), str(tmp_path / "voc" / "VOCdevkit" / "VOC2012"), "--quiet"]) == 0
    names = run_documented("## COCO and VOC / CVAT exports", tmp_path, monkeypatch)
    assert {Path(p).suffix for p in names["voc"].images} == {".jpg", ".png"}
    check_voc_segmentation(names["voc"], odd_dataset, "train")


# -- the documented loaders, on 16-bit images and masks ------------------------------------------


def test_documented_hugging_face_loading_keeps_16_bit_images_and_masks(wide_dataset, monkeypatch):
    pytest.importorskip("datasets")
    names = run_documented("### Hugging Face `datasets` (SegFormer, ...)", wide_dataset.parent, monkeypatch)
    assert names["id2label"] == {i: f"class {i}" for i in range(300)}
    samples = stored(wide_dataset)
    rows = [row for split in names["ds"].values() for row in split]
    assert sorted(row["id"] for row in rows) == sorted(samples)
    for row in rows:
        _, image_path, mask = samples[row["id"]]
        np.testing.assert_array_equal(np.asarray(row["label"]), mask)
        np.testing.assert_array_equal(np.asarray(row["image"]), read_image(image_path))
    assert any(np.asarray(row["image"]).max() > 255 for row in rows)


def test_documented_torchvision_loader_keeps_16_bit_images_and_masks(wide_dataset, monkeypatch):
    names = run_documented("### torchvision-style", wide_dataset.parent, monkeypatch)
    samples = stored(wide_dataset)
    seen = []
    for split in ("train", "val"):
        loader = names["train"] if split == "train" else names["SclipSegmentation"]("my-dataset", split)
        for index in range(len(loader)):
            image, mask = loader[index]
            sample_id = loader.rows[index]["id"]
            _, image_path, stored_mask = samples[sample_id]
            np.testing.assert_array_equal(mask, stored_mask)
            np.testing.assert_array_equal(image, read_image(image_path))
            assert image.dtype == (np.uint16 if sample_id.startswith("deep") else np.uint8)
            seen.append(sample_id)
    assert sorted(seen) == sorted(samples)


# -- COCO through pycocotools ---------------------------------------------------------------------


def test_pycocotools_gives_each_class_mask_of_16_bit_masks(wide_dataset, tmp_path):
    from pycocotools.coco import COCO

    out = tmp_path / "coco.json"
    assert main(["export-coco", str(wide_dataset), str(out), "--quiet"]) == 0
    coco = COCO(str(out))
    assert sorted(coco.getCatIds()) == list(range(1, 301))
    assert [coco.cats[i]["name"] for i in range(1, 301)] == [f"class {i}" for i in range(300)]
    samples = stored(wide_dataset)
    assert sorted(image["sample_id"] for image in coco.imgs.values()) == sorted(samples)
    for image in coco.imgs.values():
        _, _, mask = samples[image["sample_id"]]
        assert (image["height"], image["width"]) == mask.shape
        rebuilt = np.full(mask.shape, 65535)
        for annotation in coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]])):
            pixels = coco.annToMask(annotation).astype(bool)
            assert (rebuilt[pixels] == 65535).all()  # annotations never overlap
            rebuilt[pixels] = coco.cats[annotation["category_id"]]["train_id"]
        np.testing.assert_array_equal(rebuilt, mask)


# -- values no class declares ---------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)


def corrupt(root: Path, sample_id: str, value: int) -> tuple[Path, bytes]:
    """Write ``value`` into a few pixels of the sample's stored mask; returns the mask file and
    its bytes before."""
    split, _, mask = stored(root)[sample_id]
    path = root / split / "masks" / f"{sample_id}.png"
    before = path.read_bytes()
    mask = mask.copy()
    mask[2:4, 5:9] = value
    Image.fromarray(mask).save(path)
    return path, before


@pytest.mark.parametrize("value", [9, 254])
def test_exports_stop_at_a_mask_value_no_class_declares(odd_dataset, tmp_path, value):
    path, before = corrupt(odd_dataset, "array.1", value)
    coco, voc = tmp_path / "coco.json", tmp_path / "voc"
    exports = (["export-coco", str(odd_dataset), str(coco)], ["export-voc", str(odd_dataset), str(voc)])
    for args in exports:
        result = run_cli(*args, "--quiet")
        assert result.returncode == 1, result.stderr
        assert result.stderr.count("\n") == 1 and str(path) in result.stderr and f" {value} " in result.stderr
    assert not coco.exists()
    path.write_bytes(before)  # repaired: the same commands complete
    assert all(run_cli(*args, "--quiet").returncode == 0 for args in exports)
    check_datumaro_reads(odd_dataset, voc, ["cat", *ODD_NAMES])


def test_exports_stop_at_a_16_bit_value_no_class_declares(wide_dataset, tmp_path):
    path, _ = corrupt(wide_dataset, "deep1", 300)
    result = run_cli("export-coco", str(wide_dataset), str(tmp_path / "coco.json"), "--quiet")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert str(path) in result.stderr and " 300 " in result.stderr and "65535 = ignore" in result.stderr


def test_exports_stop_at_a_mask_of_another_size_than_its_image(odd_dataset, tmp_path):
    split, _, mask = stored(odd_dataset)["photo1"]
    path = odd_dataset / split / "masks" / "photo1.png"
    Image.fromarray(mask[:, :-1]).save(path)
    result = run_cli("export-coco", str(odd_dataset), str(tmp_path / "coco.json"), "--quiet")
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and str(path) in result.stderr


# -- the command line, end to end -----------------------------------------------------------------


def test_cli_labels_a_class_with_a_colon_and_datumaro_reads_the_export(tmp_path, tiny_dir, tiny_checkpoint):
    folder = tmp_path / "in"
    save_images(folder, 3, 64, 80)
    out = tmp_path / "dataset"
    command = cli_command(tiny_dir, tiny_checkpoint, "segment", str(folder), "--classes", "a:b; c", "--out", str(out))
    segmented = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert segmented.returncode == 0, segmented.stderr[-2000:]
    assert (out / "classes.txt").read_text(encoding="utf-8") == "a:b\nc\n"
    assert "a%3Ab:" in (out / "labelmap.txt").read_text(encoding="utf-8")
    exported = run_cli("export-voc", str(out), str(tmp_path / "voc"), "--quiet")
    assert exported.returncode == 0 and exported.stderr == ""
    check_datumaro_reads(out, tmp_path / "voc", ["a:b", "c"])
