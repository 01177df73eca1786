"""The command line: outputs, legends, skipping, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from napari_sclip import Segmenter
from napari_sclip.cli import main
from napari_sclip.colors import label_color

from conftest import TINY_MODEL, natural_image


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(natural_image(120, 160)).save(folder / "a.png")
    Image.fromarray(natural_image(90, 70)).save(folder / "b.jpg")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture
def model_args(tiny_checkpoint):
    return ["--model", TINY_MODEL, "--pretrained", str(tiny_checkpoint), "--device", "cpu", "--quiet"]


def test_segment_folder_writes_label_maps_and_legend(images, model_args, tmp_path):
    out = tmp_path / "out"
    assert main(["segment", str(images), "--classes", "person, astronaut; sky; rocket", "--out", str(out), *model_args]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "classes.json"]

    written = Image.open(out / "a.png")
    assert written.mode == "P"
    palette = np.array(written.getpalette()[: 4 * 3]).reshape(4, 3)
    assert [tuple(c) for c in palette] == [label_color(v) for v in range(4)]

    expected = Segmenter(TINY_MODEL, model_args[3], "cpu").segment(
        np.asarray(Image.open(images / "a.png")), ["person, astronaut", "sky", "rocket"]
    )
    np.testing.assert_array_equal(np.asarray(written), expected.labels)

    legend = json.loads((out / "classes.json").read_text())
    assert [(c["value"], c["name"], c["synonyms"]) for c in legend["classes"]] == [
        (0, "unlabelled", []),
        (1, "person", ["astronaut"]),
        (2, "sky", []),
        (3, "rocket", []),
    ]
    assert legend["params"]["model"] == TINY_MODEL and legend["params"]["window"] == 224


def test_classes_file_and_parameters(images, model_args, tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("person\nsky, clouds\n")
    out = tmp_path / "out"
    code = main(
        ["segment", str(images / "a.png"), "--classes-file", str(vocab), "--out", str(out),
         "--prob-threshold", "0.99", "--short-side", "224", *model_args]
    )
    assert code == 0
    labels = np.asarray(Image.open(out / "a.png"))
    assert labels.shape == (120, 160) and (labels == 0).mean() > 0.5  # a high threshold leaves 0s
    assert json.loads((out / "classes.json").read_text())["params"]["short_side"] == 224


def test_existing_maps_are_kept_unless_overwrite(images, model_args, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["segment", str(images), "--classes", "a; b", "--out", str(out), *model_args]
    assert main(args) == 0
    edited = np.zeros((120, 160), np.uint8)
    Image.fromarray(edited).save(out / "a.png")  # an annotator's correction
    assert main(args) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out / "a.png")), edited)
    assert main([*args, "--overwrite"]) == 0
    assert np.asarray(Image.open(out / "a.png")).any()


def test_another_vocabulary_is_refused_in_the_same_folder(images, model_args, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["segment", str(images), "--classes", "a; b", "--out", str(out), *model_args]) == 0
    capsys.readouterr()
    assert main(["segment", str(images), "--classes", "b; a", "--out", str(out), *model_args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("napari-sclip: error:") and "another vocabulary" in err and "\n" not in err


def test_same_stems_get_distinct_outputs(tmp_path, model_args):
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        Image.fromarray(natural_image(40, 40)).save(tmp_path / sub / "img.png")
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "x"), str(tmp_path / "y"), "--classes", "a; b", "--out", str(out), *model_args]) == 0
    assert sorted(p.name for p in out.glob("img*.png")) == ["img-2.png", "img.png"]


def test_bad_images_are_skipped_with_a_line_each(tmp_path, model_args, capsys):
    import tifffile

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(natural_image(40, 40)).save(folder / "good.png")
    tifffile.imwrite(folder / "stack.tif", np.zeros((4, 32, 32), np.uint16), photometric="minisblack")
    (folder / "broken.png").write_bytes(b"not a png")
    code = main(["segment", str(folder), "--classes", "a; b", "--out", str(tmp_path / "out"), *model_args])
    err = capsys.readouterr().err
    assert code == 2
    assert "broken.png: cannot read image" in err and "stack.tif: image of shape (4, 32, 32)" in err
    assert "Traceback" not in err
    assert (tmp_path / "out" / "good.png").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--classes", " ; "], "the vocabulary is empty"),
        (["--classes", "cat; Cat"], "appears in classes 1 and 2"),
        (["--classes-file", "/no/such/file.txt"], "vocabulary file not found"),
        (["--classes", "a", "--stride", "500"], "must not exceed window"),
        (["--classes", "a", "--device", "tpu"], "unknown device"),
    ],
)
def test_errors_are_one_line(images, model_args, tmp_path, capsys, extra, message):
    code = main(["segment", str(images), "--out", str(tmp_path / "out"), *model_args, *extra])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("napari-sclip: error:") and message in err
    assert "\n" not in err and "Traceback" not in err


def test_missing_input(tmp_path, model_args, capsys):
    assert main(["segment", str(tmp_path / "nothing.png"), "--classes", "a", "--out", str(tmp_path / "o"), *model_args]) == 1
    assert "image not found" in capsys.readouterr().err


def test_bad_weights_path_is_one_line(images, tmp_path, capsys):
    code = main(["segment", str(images), "--classes", "a", "--out", str(tmp_path / "o"), "--model", "ViT-B-16",
                 "--pretrained", str(tmp_path / "missing.pt"), "--device", "cpu", "--quiet"])
    assert code == 1
    assert capsys.readouterr().err.strip().startswith("napari-sclip: error: weights file not found")


def test_info(capsys, monkeypatch):
    monkeypatch.setenv("NAPARI_SCLIP_MODEL", "ViT-B-32")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "devices" in out and "cpu" in out
    assert "ViT-B-32" in out and "text embeddings" in out


def test_usage_errors_exit_with_argparse_status(capsys):
    with pytest.raises(SystemExit) as info:
        main(["segment", "x.png", "--out", "o"])  # neither --classes nor --classes-file
    assert info.value.code == 2
