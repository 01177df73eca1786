"""COCO and VOC/CVAT exports: decoded back, they give the dataset's masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from napari_sclip.classes import ClassRegistry
from napari_sclip.cli import main
from napari_sclip.colors import label_color
from napari_sclip.dataset.writer import DatasetWriter, Sample

from conftest import natural_image


@pytest.fixture
def dataset(tmp_path):
    """Three samples: two components of one class, a hole of ignore, an unused class."""
    registry = ClassRegistry()
    registry.update((("cat",), ("dog", "puppy"), ("grass",), ("unused",)))
    root = tmp_path / "dataset"
    writer = DatasetWriter(root, registry, {"train": 0.5, "val": 0.5})
    rng = np.random.default_rng(0)
    for k in range(3):
        labels = np.full((48, 64), 3, np.uint8)  # grass
        labels[5:15, 5:20] = 1  # cat, component 1
        labels[30:40, 40:60] = 1  # cat, component 2
        labels[20:28, 10 + k : 30] = 2  # dog
        labels[0:3, :] = 0  # unlabelled -> ignore
        labels[rng.random(labels.shape) < 0.01] = 2  # scattered single dog pixels
        source = tmp_path / f"img{k}.png"
        Image.fromarray(natural_image(48, 64)).save(source)
        writer.write(Sample(f"img{k}", labels, image=np.asarray(Image.open(source)), source=source))
    writer.rebuild_index()
    return root


def _masks(root):
    return {p.stem: np.asarray(Image.open(p)) for p in root.glob("*/masks/*.png")}


def test_coco_rle_decodes_to_the_masks_one_annotation_per_component(dataset, tmp_path):
    from pycocotools import mask as rle_codec
    from pycocotools.coco import COCO

    out = tmp_path / "coco" / "annotations.json"
    assert main(["export-coco", str(dataset), str(out), "--quiet"]) == 0
    document = json.loads(out.read_text())
    assert [(c["id"], c["name"], c["train_id"]) for c in document["categories"]] == [
        (1, "cat", 0), (2, "dog", 1), (3, "grass", 2), (4, "unused", 3)
    ]
    coco = COCO(str(out))  # pycocotools reads it
    masks = _masks(dataset)
    assert sorted(image["sample_id"] for image in document["images"]) == sorted(masks)
    for image in document["images"]:
        mask = masks[image["sample_id"]]
        assert (dataset / image["file_name"]).is_file()
        assert (image["height"], image["width"]) == mask.shape
        rebuilt = np.full(mask.shape, 255, np.uint8)
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        for annotation in annotations:
            assert isinstance(annotation["segmentation"]["counts"], str)  # compressed RLE
            decoded = rle_codec.decode(annotation["segmentation"]).astype(bool)
            assert decoded.sum() == annotation["area"]
            assert (rebuilt[decoded] == 255).all()  # components never overlap
            rebuilt[decoded] = annotation["category_id"] - 1
            assert ndimage.label(decoded, structure=np.ones((3, 3)))[1] == 1
        np.testing.assert_array_equal(rebuilt, mask)
        for train_id in range(3):
            expected = ndimage.label(mask == train_id, structure=np.ones((3, 3)))[1]
            assert sum(a["category_id"] == train_id + 1 for a in annotations) == expected
    assert not any(a["category_id"] == 4 for a in document["annotations"])


def test_coco_refuses_to_replace_a_file_unless_asked(dataset, tmp_path, capsys):
    out = tmp_path / "mine.json"
    out.write_text("{}")
    assert main(["export-coco", str(dataset), str(out), "--quiet"]) == 1
    assert "exists" in capsys.readouterr().err and out.read_text() == "{}"
    assert main(["export-coco", str(dataset), str(out), "--quiet", "--overwrite"]) == 0
    assert json.loads(out.read_text())["images"]


def test_voc_layout_palette_and_labelmap(dataset, tmp_path):
    out = tmp_path / "voc"
    assert main(["export-voc", str(dataset), str(out), "--quiet"]) == 0
    labelmap = (out / "labelmap.txt").read_text().splitlines()
    assert labelmap[1:] == [
        "background:0,0,0::",
        *(f"{name}:{','.join(map(str, label_color(uid)))}::" for uid, name in
          ((1, "cat"), (2, "dog"), (3, "grass"), (4, "unused"))),
    ]
    masks = _masks(dataset)
    lists = {f.stem: f.read_text().split() for f in (out / "ImageSets" / "Segmentation").glob("*.txt")}
    assert set(lists) <= {"train", "val", "test"}  # no default.txt: every image is listed once
    assert sorted(i for ids in lists.values() for i in ids) == sorted(masks)
    for sample_id, mask in masks.items():
        png = Image.open(out / "SegmentationClass" / f"{sample_id}.png")
        assert png.mode == "P"
        indices = np.asarray(png)
        np.testing.assert_array_equal(indices, np.where(mask == 255, 0, mask.astype(np.int64) + 1))
        palette = np.array(png.getpalette()[: 5 * 3]).reshape(5, 3)
        assert [tuple(c) for c in palette] == [(0, 0, 0), *(label_color(uid) for uid in (1, 2, 3, 4))]
        original = next(dataset.glob(f"*/images/{sample_id}.png"))
        assert (out / "JPEGImages" / f"{sample_id}.png").read_bytes() == original.read_bytes()

    assert main(["export-voc", str(dataset), str(out), "--quiet"]) == 0  # an earlier export is updated


def test_voc_refuses_an_unrelated_folder(dataset, tmp_path, capsys):
    out = tmp_path / "documents"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    assert main(["export-voc", str(dataset), str(out), "--quiet"]) == 1
    assert "not a VOC export" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


def test_exports_of_a_non_dataset_fail_in_one_line(tmp_path, capsys):
    for command in (["export-coco", str(tmp_path), str(tmp_path / "a.json")], ["export-voc", str(tmp_path), str(tmp_path / "v")]):
        assert main([*command, "--quiet"]) == 1
        err = capsys.readouterr().err.strip()
        assert "dataset.json is missing" in err and "\n" not in err


def test_voc_never_writes_or_deletes_through_a_symlinked_folder_of_an_earlier_export(dataset, tmp_path, capsys):
    """An "earlier export" whose JPEGImages or image-list folder links elsewhere: refused in one
    line, and what is elsewhere stays as it was."""
    elsewhere = tmp_path / "photos"
    elsewhere.mkdir()
    (elsewhere / "precious.jpeg").write_text("precious")
    (elsewhere / "train.txt").write_text("keep")
    for linked in ("JPEGImages", "ImageSets/Segmentation"):
        out = tmp_path / f"voc-{linked.replace('/', '-')}"
        (out / "SegmentationClass").mkdir(parents=True)
        (out / "labelmap.txt").touch()
        (out / linked).parent.mkdir(parents=True, exist_ok=True)
        (out / linked).symlink_to(elsewhere)
        assert main(["export-voc", str(dataset), str(out), "--quiet"]) == 1
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "symbolic link" in err, err
    assert sorted(p.name for p in elsewhere.iterdir()) == ["precious.jpeg", "train.txt"]
    assert (elsewhere / "train.txt").read_text() == "keep"
