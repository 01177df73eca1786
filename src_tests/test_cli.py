"""The command line: datasets, resuming, edits kept, exports, and one-line errors."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from napari_sclip import Segmenter
from napari_sclip.cli import main

from conftest import TINY_MODEL, natural_image
from dataset_helpers import cli_command, save_images


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


def _dataset_masks(root):
    """{id: mask array} of every sample in a dataset folder."""
    return {path.stem: np.asarray(Image.open(path)) for path in sorted(root.glob("*/masks/*.png"))}


def test_segment_folder_writes_a_dataset(images, model_args, tmp_path):
    out = tmp_path / "out"
    assert main(["segment", str(images), "--classes", "person, astronaut; sky; rocket", "--out", str(out), *model_args]) == 0

    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["format"]["name"] == "napari-sclip-pseudo-labels" and manifest["vocabulary_version"] == 1
    assert [(c["name"], c["synonyms"], c["train_id"]) for c in manifest["classes"]] == [
        ("person", ["astronaut"], 0), ("sky", [], 1), ("rocket", [], 2)
    ]
    assert manifest["models"] == [{
        "model": TINY_MODEL, "pretrained": model_args[3], "quick_gelu": True, "patch_size": 16, "method": "sclip",
        "short_side": 336,
        "window": 224, "stride": 112, "logit_scale": 40.0, "prob_threshold": 0.0, "pamr": False,
    }]
    assert (out / "classes.txt").read_text() == "person\nsky\nrocket\n"

    rows = [json.loads(line) for split in ("train", "val") if (out / split / "metadata.jsonl").exists()
            for line in (out / split / "metadata.jsonl").read_text().splitlines()]
    assert sorted(row["id"] for row in rows) == ["a", "b"]

    split = next(s for s in ("train", "val") if (out / s / "meta" / "a.json").exists())
    assert (out / split / "images" / "a.png").read_bytes() == (images / "a.png").read_bytes()
    mask = Image.open(out / split / "masks" / "a.png")
    assert mask.mode == "L"
    expected = Segmenter(TINY_MODEL, model_args[3], "cpu").segment(
        np.asarray(Image.open(images / "a.png")), ["person, astronaut", "sky", "rocket"]
    )
    np.testing.assert_array_equal(np.asarray(mask), np.where(expected.labels > 0, expected.labels - 1, 255))
    confidence = np.asarray(Image.open(out / split / "confidence" / "a.png"))
    np.testing.assert_array_equal(confidence, np.rint(expected.confidence * 255).astype(np.uint8))
    assert not np.asarray(Image.open(out / split / "provenance" / "a.png")).any()

    meta = json.loads((out / split / "meta" / "a.json").read_text())
    assert meta["source"]["sha256"] == hashlib.sha256((images / "a.png").read_bytes()).hexdigest()
    assert meta["method"] == "sclip" and meta["window"] == 224 and meta["model"] == TINY_MODEL
    assert meta["review_status"] == "unreviewed" and meta["vocabulary_version"] == 1


def test_classes_file_parameters_and_splits(images, model_args, tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("person\nsky, clouds\n")
    out = tmp_path / "out"
    code = main(
        ["segment", str(images / "a.png"), "--classes-file", str(vocab), "--out", str(out),
         "--prob-threshold", "0.99", "--short-side", "224", "--splits", "val=1", *model_args]
    )
    assert code == 0
    mask = np.asarray(Image.open(out / "val" / "masks" / "a.png"))
    assert mask.shape == (120, 160) and (mask == 255).mean() > 0.5  # a high threshold leaves ignore
    assert json.loads((out / "val" / "meta" / "a.json").read_text())["short_side"] == 224
    assert json.loads((out / "dataset.json").read_text())["splits"]["ratios"] == {"val": 1.0}


def test_a_background_class_takes_the_pixels_below_the_threshold(images, model_args, tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("person\nsky, clouds\n")
    out = tmp_path / "out"
    code = main(["segment", str(images / "a.png"), "--classes-file", str(vocab), "--out", str(out), "--prob-threshold",
                 "0.99", "--background-class", "1", "--area-threshold", "0.5", "--splits", "val=1", *model_args])
    assert code == 0
    mask = np.asarray(Image.open(out / "val" / "masks" / "a.png"))
    assert (mask == 1).mean() > 0.5 and not (mask == 255).any()  # sky, never ignore
    meta = json.loads((out / "val" / "meta" / "a.json").read_text())
    assert (meta["background_class"], meta["area_threshold"]) == (1, 0.5)
    assert json.loads((out / "dataset.json").read_text())["models"][0]["background_class"] == 1


def test_resume_after_a_kill_mid_write(images, model_args, tmp_path, monkeypatch, capsys):
    """A kill while the second image's mask is being written leaves a valid dataset holding the
    first; the next run labels only what is missing, and ends as an uninterrupted run does."""
    from napari_sclip.dataset import writer as writer_module
    from napari_sclip.dataset.format import read_manifest

    Image.fromarray(natural_image(64, 80)).save(images / "c.png")
    args = ["segment", str(images), "--classes", "a; b", *model_args]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0

    real_write = writer_module.write_temporary
    masks_written = []

    def killed_on_second_mask(path, write):
        if path.parent.name == "masks":
            masks_written.append(path)
            if len(masks_written) == 2:
                raise KeyboardInterrupt
        return real_write(path, write)

    out = tmp_path / "out"
    monkeypatch.setattr(writer_module, "write_temporary", killed_on_second_mask)
    assert main([*args, "--out", str(out)]) == 130
    monkeypatch.undo()
    read_manifest(out)  # still a dataset
    assert len(_dataset_masks(out)) == 1 and not list(out.rglob("*.tmp"))  # the image written first
    assert len(list(out.glob("*/meta/*.json"))) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "napari-sclip: interrupted; the dataset is valid: run the same command to go on"
    ]

    calls = []
    original = Segmenter.prepare  # once per slice segmented
    monkeypatch.setattr(Segmenter, "prepare", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    assert main([*args, "--out", str(out)]) == 0
    assert len(calls) == 2  # the two missing; the first was kept
    whole, resumed = _dataset_masks(tmp_path / "whole"), _dataset_masks(out)
    assert list(whole) == list(resumed) == ["a", "b", "c"]
    for key in whole:
        np.testing.assert_array_equal(whole[key], resumed[key])
    rows = sum(len(p.read_text().splitlines()) for p in out.glob("*/metadata.jsonl"))
    assert rows == 3


def test_a_real_kill_leaves_a_valid_dataset_and_the_rerun_completes(tmp_path, tiny_dir, tiny_checkpoint):
    """SIGKILL while the CLI writes (no cleanup code runs), then the same command again."""
    import os
    import signal
    import subprocess
    import time

    from napari_sclip.dataset.format import read_manifest
    from napari_sclip.dataset.reader import read_sample, sample_ids

    folder = tmp_path / "in"
    save_images(folder, 8, 200, 260)
    out = tmp_path / "out"
    command = cli_command(tiny_dir, tiny_checkpoint, "segment", str(folder), "--classes", "a; b", "--out", str(out))
    process = subprocess.Popen(command, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list(out.glob("*/meta/*.json"))) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = len(list(out.glob("*/meta/*.json")))
    assert 2 <= done_before < 8, "the kill came too late to test anything"

    _, _, train_ids = read_manifest(out)  # a dataset, whatever the moment of the kill
    for split, image_id in sample_ids(out):
        read_sample(out, split, image_id, train_ids)  # every sample that exists is complete
    for index in out.glob("*/metadata.jsonl"):
        for row in map(json.loads, index.read_text().splitlines()):
            assert (index.parent / row["label_file_name"]).is_file()

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert sorted(_dataset_masks(out)) == [f"im{k}" for k in range(8)]
    assert sum(len(p.read_text().splitlines()) for p in out.glob("*/metadata.jsonl")) == 8
    assert not list(out.rglob("*.tmp"))


def test_overwrite_never_replaces_a_persons_edits(images, model_args, tmp_path, capsys):
    from napari_sclip.dataset.reader import read_sample, sample_ids
    from napari_sclip.dataset.writer import DatasetWriter, Sample
    from napari_sclip.engine.vocabulary import parse_vocabulary

    out = tmp_path / "out"
    args = ["segment", str(images), "--classes", "a; b", "--out", str(out), *model_args[:-1]]  # not --quiet
    assert main(args) == 0
    assert main(args) == 0  # nothing new
    assert "2 already there" in capsys.readouterr().err

    with DatasetWriter(out, vocabulary=parse_vocabulary(["a", "b"]).classes) as writer:
        split, _ = next(s for s in sample_ids(out) if s[1] == "a")
        stored = read_sample(out, split, "a", writer.train_ids)
        painted = stored.labels.copy()
        painted[:20] = 2
        writer.write(Sample("a", painted, image=stored.image, source=images / "a.png", edited=painted != stored.labels))
    before = _dataset_masks(out)

    assert main([*args, "--overwrite", "--prob-threshold", "0.99"]) == 0
    assert "1 kept: edited or reviewed by a person" in capsys.readouterr().err
    after = _dataset_masks(out)
    np.testing.assert_array_equal(after["a"], before["a"])  # the person's edit survives
    assert (after["b"] == 255).mean() > (before["b"] == 255).mean()  # b was labelled again


def test_new_classes_append_training_ids(images, model_args, tmp_path):
    out = tmp_path / "out"
    assert main(["segment", str(images / "a.png"), "--classes", "a; b", "--out", str(out), *model_args]) == 0
    first = _dataset_masks(out)
    assert main(["segment", str(images), "--classes", "b; c; a", "--out", str(out), *model_args]) == 0
    manifest = json.loads((out / "dataset.json").read_text())
    assert {c["name"]: c["train_id"] for c in manifest["classes"]} == {"a": 0, "b": 1, "c": 2}
    assert manifest["vocabulary_version"] == 2
    np.testing.assert_array_equal(_dataset_masks(out)["a"], first["a"])  # untouched
    meta_b = json.loads(next(out.glob("*/meta/b.json")).read_text())
    assert meta_b["vocabulary_version"] == 2
    assert (out / "classes.txt").read_text() == "a\nb\nc\n"


def test_same_stems_get_distinct_ids_and_duplicates_are_skipped(tmp_path, model_args, capsys):
    for sub, seed in (("x", 0), ("y", 1)):
        (tmp_path / sub).mkdir()
        Image.fromarray(np.roll(natural_image(40, 40), seed * 7, axis=1)).save(tmp_path / sub / "img.png")
    (tmp_path / "x" / "z-copy.png").write_bytes((tmp_path / "x" / "img.png").read_bytes())
    out = tmp_path / "out"
    code = main(["segment", str(tmp_path / "x"), str(tmp_path / "y"), "--classes", "a; b", "--out", str(out), *model_args[:-1]])
    assert code == 0
    digest = hashlib.sha256((tmp_path / "y" / "img.png").read_bytes()).hexdigest()
    assert sorted(_dataset_masks(out)) == ["img", f"img-{digest[:8]}"]
    assert "1 already there" in capsys.readouterr().err  # z-copy.png has img.png's bytes


def test_a_folder_that_is_not_a_dataset_is_refused(images, model_args, tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"precious")
    assert main(["segment", str(images), "--classes", "a", "--out", str(out), *model_args]) == 1
    err = capsys.readouterr().err.strip()
    assert "not empty and not a napari-sclip dataset" in err and "\n" not in err
    assert sorted(p.name for p in out.iterdir()) == ["holiday.jpg"]


def test_bad_images_are_skipped_with_a_line_each(tmp_path, model_args, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(natural_image(40, 40)).save(folder / "good.png")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "empty.tif").write_bytes(b"")
    code = main(["segment", str(folder), "--classes", "a; b", "--out", str(tmp_path / "out"), *model_args])
    err = capsys.readouterr().err
    assert code == 2
    assert "broken.png: cannot read image" in err and "empty.tif: empty file" in err
    assert "Traceback" not in err
    assert list(_dataset_masks(tmp_path / "out")) == ["good"]


def test_stacks_become_one_sample_per_slice_and_resume_per_slice(tmp_path, model_args, monkeypatch):
    import tifffile

    folder = tmp_path / "in"
    folder.mkdir()
    stack = (np.stack([natural_image(40, 50)[..., k] for k in range(3)]).astype(np.uint16) * 250)
    tifffile.imwrite(folder / "stack.tif", stack, photometric="minisblack")  # (Z, H, W) 16-bit
    out = tmp_path / "out"
    args = ["segment", str(folder), "--classes", "a; b", "--out", str(out), *model_args]
    assert main(args) == 0
    masks = _dataset_masks(out)
    assert sorted(masks) == ["stack-000", "stack-001", "stack-002"]
    engine = Segmenter(TINY_MODEL, model_args[3], "cpu").segment(stack[1], ["a", "b"])
    np.testing.assert_array_equal(masks["stack-001"], engine.labels - 1)
    stored = Image.open(next(out.glob("*/images/stack-001.png")))
    np.testing.assert_array_equal(np.asarray(stored), stack[1])  # the slice, 16-bit as it was
    meta = json.loads(next(out.glob("*/meta/stack-001.json")).read_text())
    assert meta["slice"] == [1] and meta["source"]["shape"] == [3, 40, 50]
    assert meta["source"]["path"] == str(folder / "stack.tif")

    next(out.glob("*/meta/stack-002.json")).unlink()  # as if killed before the last slice
    calls = []
    original = Segmenter.prepare  # once per slice segmented
    monkeypatch.setattr(Segmenter, "prepare", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    assert main(args) == 0
    assert len(calls) == 1 and sorted(_dataset_masks(out)) == ["stack-000", "stack-001", "stack-002"]
    assert main(args) == 0 and len(calls) == 1  # complete: nothing to do


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
    assert "sc-clip" in out and "512 MB" in out


@pytest.mark.parametrize("argv", [
    ["segment", "x.png", "--out", "o"],  # neither --classes nor --classes-file
    ["segment", "x.png", "--classes", "cat", "--out", "o", "--method", "sclipp"],
    ["export-voc"],
    ["nonsense"],
])
def test_usage_errors_are_one_line_with_the_user_error_status(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "error:" in err and "--help" in err, err


def test_method_choice_is_recorded(images, model_args, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["segment", str(images / "a.png"), "--classes", "a; b", "--out", str(out), *model_args]
    assert main([*args, "--method", "naclip", "--no-pamr", "--window", "112", "--stride", "56"]) == 0
    meta = json.loads(next(out.glob("*/meta/a.json")).read_text())
    assert (meta["method"], meta["pamr"], meta["window"], meta["logit_scale"]) == ("naclip", False, 112, 40.0)
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["models"][0]["method"] == "naclip" and manifest["models"][0]["window"] == 112
    with pytest.raises(SystemExit) as info:
        main([*args, "--method", "fastclip"])
    assert info.value.code == 1 and "invalid choice: 'fastclip'" in capsys.readouterr().err


def test_a_refusal_is_one_line_also_with_the_progress_bar_on(tmp_path):
    """Without --quiet: the bar is for terminals, and an error still leaves one stderr line."""
    import subprocess
    import sys

    (tmp_path / "photo.png").write_bytes(b"")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("not a dataset")
    done = subprocess.run(
        [sys.executable, "-m", "napari_sclip.cli", "segment", str(tmp_path / "photo.png"), "--classes", "cat",
         "--out", str(tmp_path / "notes")],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 1
    assert len(done.stderr.splitlines()) == 1 and "not empty and not a napari-sclip dataset" in done.stderr, done.stderr


@pytest.mark.parametrize(
    "extra, gpus, expected",
    [
        ([], 2, ["cuda:0", "cuda:1"]),  # auto on a machine with two GPUs: every GPU seen
        ([], 1, ["auto"]),
        (["--device", "cuda:1"], 2, ["cuda:1"]),  # a chosen device is kept
        (["--devices", "cuda:1,cuda:0"], 2, ["cuda:1", "cuda:0"]),
        (["--devices", "all"], 0, ["cpu"]),
    ],
)
def test_segment_runs_one_model_per_device(images, tmp_path, monkeypatch, extra, gpus, expected):
    from napari_sclip import cli
    from napari_sclip.dataset import batch

    seen = []
    monkeypatch.setattr(cli, "_gpu_count", lambda: gpus)
    monkeypatch.setattr(batch, "label_images", lambda paths, vocabulary, root, segmenters, **kw: seen.append(
        [model.device_name for model in segmenters]) or iter(()))
    assert main(["segment", str(images), "--classes", "a; b", "--out", str(tmp_path / "out"), "--quiet", *extra]) == 0
    assert seen == [expected]


def _napari_sclip(*argv: str, **kwargs):
    import subprocess
    import sys

    code = f"import sys; from napari_sclip.cli import main; sys.exit(main({list(argv)!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, **kwargs)


def test_models_lists_the_presets_without_loading_the_engine():
    import subprocess
    import sys

    from napari_sclip.engine.presets import PRESETS

    done = _napari_sclip("models")
    assert done.returncode == 0 and done.stderr == ""
    for preset in PRESETS.values():
        assert preset.key in done.stdout and preset.title in done.stdout
    assert "openai-b16 *" in done.stdout and "1.7 GB" in done.stdout and "accept the terms" in done.stdout
    code = "import sys; from napari_sclip.cli import main; main(['models']); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip().endswith("False")


def test_segment_with_a_local_dir_model_of_another_patch_size(tmp_path):
    from test_backbones import open_clip_folder, random_clip, tiny_config

    cfg = tiny_config(14, False)
    folder = open_clip_folder(tmp_path / "model", cfg, random_clip(cfg))
    Image.fromarray(natural_image(100, 130)).save(tmp_path / "a.png")
    done = _napari_sclip("segment", str(tmp_path / "a.png"), "--classes", "person; sky", "--out", str(tmp_path / "out"),
                         "--model", f"local-dir:{folder}", "--device", "cpu", "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # the folder's config says GELU: nothing to warn about
    meta = json.loads(next((tmp_path / "out").glob("*/meta/a.json")).read_text())
    provenance = meta["provenance"] if "provenance" in meta else meta
    assert f"local-dir:{folder.resolve()}" in json.dumps(provenance) and '"patch_size": 14' in json.dumps(provenance)


@pytest.mark.parametrize("argv, expected", [
    (["--model", "bioclip"], "could not download hf-hub:imageomics/bioclip"),
    # A tag with no URL names its hub file (open_clip's pretrained config) and how to use it.
    (["--model", "ViT-B-16", "--pretrained", "laion2b_s34b_b88k"],
     "hf download laion/CLIP-ViT-B-16-laion2B-s34B-b88K open_clip_pytorch_model.bin --local-dir FOLDER, "
     "then FOLDER/open_clip_pytorch_model.bin): the widget's weights field"),
    (["--model", "hf-hub:org"], "is not a Hugging Face repo"),
    (["--model", "RN50", "--pretrained", "x.pt"], "is a ResNet, not a ViT"),
    (["--model", "local-dir:/nonexistent/model"], "not found"),
    (["--model", "ViT-B-32", "--pretrained", "hf-hub:org/repo"], "could not download hf-hub:org/repo"),
    (["--model", "hf-hub:org/repo", "--pretrained", "openai"], "brings its own weights"),
    (["--model", "ViT-B-32", "--pretrained", "/tmp/a\nb\x1b[31m.pt"], "weights file not found"),  # still one line
])
def test_model_errors_are_one_line(tmp_path, argv, expected):
    import os

    Image.fromarray(natural_image(40, 40)).save(tmp_path / "a.png")
    done = _napari_sclip("segment", str(tmp_path / "a.png"), "--classes", "a; b", "--out", str(tmp_path / "out"),
                         *argv, "--device", "cpu", "--quiet",
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "NAPARI_SCLIP_CACHE_DIR": str(tmp_path / "c")})
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1 and expected in done.stderr, done.stderr


def test_recursive_folders_and_file_lists(tmp_path, tiny_dir, tiny_checkpoint):
    """`-r` takes subfolders (not hidden ones, nor the dataset itself when it lies inside the
    folder), and `--files-from` a list too long for a command line; a listed file that is missing
    fails on its own."""
    from dataset_helpers import cli_command, run

    source = tmp_path / "in"
    for relative in ("a.png", "sub/b.png", "sub/deeper/c.png", ".hidden/d.png", "sub/.cache/e.png", "sub/._b.png"):
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.roll(natural_image(64, 80), len(relative), axis=1)).save(source / relative)
    flat = run(cli_command(tiny_dir, tiny_checkpoint, "segment", str(source / "sub"), "--classes", "a; b",
                           "--out", str(tmp_path / "flat")))
    assert flat.returncode == 0 and sorted(_dataset_masks(tmp_path / "flat")) == ["b"]
    nested = source / "labels"  # the dataset inside the folder it labels
    for attempt in range(2):  # the second run finds every image there already, and no new input
        done = run(cli_command(tiny_dir, tiny_checkpoint, "segment", str(source), "-r", "--classes", "a; b",
                               "--out", str(nested)))
        assert done.returncode == 0 and done.stderr == "", done.stderr
        assert sorted(_dataset_masks(nested)) == ["a", "b", "c"]
    empty = tmp_path / "only-subfolders"
    (empty / "x").mkdir(parents=True)
    Image.fromarray(natural_image(64, 80)).save(empty / "x" / "f.png")
    refused = run(cli_command(tiny_dir, tiny_checkpoint, "segment", str(empty), "--classes", "a", "--out",
                              str(tmp_path / "no")))
    assert refused.returncode == 1 and "--recursive takes subfolders too" in refused.stderr

    listing = tmp_path / "list.txt"
    listing.write_text("# made by find\nin/a.png\n\nin/sub/deeper/c.png\nin/missing.png\n")
    listed = run(cli_command(tiny_dir, tiny_checkpoint, "segment", "--files-from", str(listing), "--classes", "a; b",
                             "--out", str(tmp_path / "listed")), cwd=tmp_path)
    assert listed.returncode == 2, listed.stderr  # some failed
    lines = listed.stderr.strip().splitlines()
    assert lines == [f"napari-sclip: skipped {source / 'missing.png'}: no such file"], lines
    assert sorted(_dataset_masks(tmp_path / "listed")) == ["a", "c"]
    for bad, message in (("nonexistent.txt", "no such file"), (str(tmp_path), "not a text file")):
        done = run(cli_command(tiny_dir, tiny_checkpoint, "segment", "--files-from", bad, "--classes", "a",
                               "--out", str(tmp_path / "bad")))
        assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1 and message in done.stderr


def test_a_batch_log_gets_progress_lines(tmp_path, tiny_dir, tiny_checkpoint):
    """With stderr in a file (a SLURM job's log), no bar: a progress line every --log-every
    seconds, then the summary."""
    import re

    from dataset_helpers import cli_command, run, save_images

    save_images(tmp_path / "in", 100, 32, 128)  # over a second on any machine: several lines
    done = run(cli_command(tiny_dir, tiny_checkpoint, "segment", str(tmp_path / "in"), "--classes", "a; b",
                           "--out", str(tmp_path / "ds"), "--log-every", "0.1", quiet=False))
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == f"100 image(s) labelled into {tmp_path / 'ds'}"
    progress = lines[:-1]
    assert progress and all(
        re.fullmatch(r"napari-sclip: (0 of 100 done so far \(reading and planning, loading the model, or waiting "
                     r"for Dask workers\)"
                     r"|[0-9]+ of 100 done, [0-9.]+/s, about ([0-9]+ h )?[0-9]+ (s|min) left)", line) for line in progress), progress
    assert "\r" not in done.stderr  # no bar drawn into the log
    refused = run(cli_command(tiny_dir, tiny_checkpoint, "segment", str(tmp_path / "in"), "--classes", "a",
                              "--out", str(tmp_path / "x"), "--log-every", "0.01"))
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert "a number of seconds from 0.1 to 86400" in refused.stderr


def test_hostile_lists_and_datasets_inside_their_input(tmp_path, tiny_dir, tiny_checkpoint):
    """Found by the attacker's pass: devices and pipes in a list fail alone instead of being read
    for ever; a device as the list is refused; the dataset's own files are never input, whatever
    links the paths go through; lines keep their spaces and odd bytes; lists add up."""
    import os

    from dataset_helpers import cli_command, run

    real = tmp_path / "real"
    real.mkdir()
    for name in ("a.png", " spaced .png", os.fsdecode(b"caf\xe9.png")):
        Image.fromarray(np.roll(natural_image(64, 80), len(name), axis=1)).save(real / name)
    (tmp_path / "link").symlink_to(real)
    os.mkfifo(tmp_path / "pipe.png")

    def segment(*argv, out="ds"):
        return run(cli_command(tiny_dir, tiny_checkpoint, "segment", *argv, "--classes", "a; b",
                               "--out", str(real / out)), cwd=tmp_path)

    assert segment("-r", str(real)).returncode == 0
    again = segment("-r", str(tmp_path / "link"))  # the same folder through a link: nothing new
    assert again.returncode == 0 and again.stderr == "", again.stderr
    assert len(_dataset_masks(real / "ds")) == 3
    inside = segment(str(real / "ds"))
    assert inside.returncode == 1 and "is in the dataset being written" in inside.stderr

    own = next((real / "ds").glob("*/masks/*.png"))
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join([b"real/ spaced .png", b"real/caf\xe9.png", b"/dev/zero",
                                                         b"pipe.png", str(own).encode()]) + b"\r\n")
    (tmp_path / "more.txt").write_text("real/a.png\n")
    listed = segment("--files-from", str(listing), "--files-from", "more.txt")  # into the same dataset
    lines = listed.stderr.strip().splitlines()
    # The spaced and Latin-1 names and a.png were found (and are there already): no other line.
    assert listed.returncode == 2 and len(lines) == 3, listed.stderr
    assert "/dev/zero: not a regular file" in lines[0] and "pipe.png: not a regular file" in lines[1]
    assert "a file of the dataset being written" in lines[2]
    fresh = segment("--files-from", str(listing), "--files-from", "more.txt", out="fresh")
    assert fresh.returncode == 2 and len(_dataset_masks(real / "fresh")) == 4  # ds's mask is input to another
    device = segment("--files-from", "/dev/zero", out="z")
    assert device.returncode == 1 and device.stderr.strip() == "napari-sclip: error: --files-from /dev/zero: not a text file"
