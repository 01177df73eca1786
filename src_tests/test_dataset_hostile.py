"""Hostile dataset folders: a stale owner writing late, FIFOs and folders where files belong,
hand-edited meta files, malformed manifests, meta files and locks, hidden names.  Each ends in one
line naming the file (exit 1 from the CLI), never a hang, a crash or another sample's file lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_sclip._files import this_host
from napari_sclip.classes import ClassRegistry
from napari_sclip.dataset import format as fmt
from napari_sclip.dataset import lock as lock_module
from napari_sclip.dataset.lock import LOCK_NAME, DatasetLock
from napari_sclip.dataset.paths import DatasetError
from napari_sclip.dataset.reader import read_sample, sample_ids
from napari_sclip.dataset.writer import DatasetWriter, Sample, read_meta

from dataset_helpers import assert_consistent, cli_command, run, save_images

CLASSES = ["--classes", "grass; sky; tree"]


def _registry(*names: str) -> ClassRegistry:
    registry = ClassRegistry()
    registry.update(tuple((name,) for name in names))
    return registry


def _sample(stem: str, uids: tuple[int, ...], seed: int = 0) -> Sample:
    rng = np.random.default_rng(seed)
    return Sample(stem, rng.choice((0, *uids), (20, 30)).astype(np.uint8),
                  image=rng.integers(0, 255, (20, 30, 3), np.uint8))


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A dataset of two samples (classes grass, sky, tree) whose images are files in ``in/``."""
    root = tmp_path / "ds"
    registry = _registry("grass", "sky", "tree")
    with DatasetWriter(root, registry) as writer:
        for k, path in enumerate(save_images(tmp_path / "in", 2, 40, 50)):
            image = np.asarray(Image.open(path))
            labels = np.random.default_rng(k).integers(0, 4, image.shape[:2]).astype(np.uint8)
            writer.write(Sample(path.stem, labels, image=image, source=path))
    return root


def _cli(*argv: str) -> subprocess.CompletedProcess:
    """A model-free CLI command in a fresh process; a hang fails the test instead of blocking it."""
    return subprocess.run([sys.executable, "-m", "napari_sclip.cli", *argv], capture_output=True, text=True,
                          timeout=120)


def _one_line_error(done: subprocess.CompletedProcess, *fragments: str) -> None:
    err = done.stderr.strip()
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "\n" not in err and err.startswith("napari-sclip: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def _meta_path(root: Path, image_id: str) -> Path:
    return next(root.glob(f"*/meta/{image_id}.json"))


# -- a stale owner that writes late -----------------------------------------------------------------


def test_a_stale_owner_writing_late_keeps_the_classes_of_the_one_that_took_over(tmp_path, monkeypatch):
    """Owner A (grass, sky) is paused inside rebuild_index() after its lock check; B (cat, dog)
    takes the lock over as stale and finishes; A resumes and writes its manifest: cat and dog, and
    their training ids, which B's masks hold, are all still declared."""
    root = tmp_path / "ds"
    first = DatasetWriter(root, _registry("grass", "sky"))
    first.write(_sample("a", (1, 2)))
    with monkeypatch.context() as patch:  # A looks gone (e.g. its heartbeat is 120 s old, seen from another host)
        patch.setattr(lock_module, "is_gone", lambda *args, **kwargs: True)
        with DatasetWriter(root, vocabulary=(("cat",), ("dog",))) as second:
            second.write(_sample("b", (3, 4), seed=1))
    assert not first._lock.holds()
    monkeypatch.setattr(first._lock, "check", lambda: None)  # A passed its check before the pause
    first.rebuild_index()
    _, registry, train_ids = fmt.read_manifest(root)
    assert {registry.display_name(uid): train_ids[uid] for uid in train_ids} == {"grass": 0, "sky": 1, "cat": 2, "dog": 3}
    assert (root / "classes.txt").read_text().split() == ["grass", "sky", "cat", "dog"]
    first._release()
    assert_consistent(root)  # B's masks hold only declared ids


def test_a_late_write_that_contradicts_the_manifest_on_disk_writes_nothing(tmp_path):
    root = tmp_path / "ds"
    with DatasetWriter(root, _registry("grass", "sky")) as writer:
        writer.write(_sample("a", (1, 2)))
        manifest = json.loads((root / fmt.MANIFEST).read_text())
        manifest["classes"][0]["name"] = "zebra"  # another owner meanwhile: uid 1 is another class
        (root / fmt.MANIFEST).write_text(json.dumps(manifest))
        before = (root / fmt.MANIFEST).read_bytes()
        with pytest.raises(DatasetError, match=r"dataset.json was changed by another program .*label 1 is 'zebra'"):
            writer.rebuild_index()
        assert (root / fmt.MANIFEST).read_bytes() == before
        writer._unindexed = 0  # nothing more to write on close


# -- FIFOs and folders where files belong -----------------------------------------------------------


@pytest.mark.parametrize("name", [LOCK_NAME, fmt.MANIFEST])
def test_a_fifo_in_place_of_the_lock_or_manifest_is_refused_by_segment(dataset, tmp_path, tiny_dir, tiny_checkpoint,
                                                                         name):
    (dataset / name).unlink(missing_ok=True)
    os.mkfifo(dataset / name)
    done = run(cli_command(tiny_dir, tiny_checkpoint, "segment", str(tmp_path / "in"), *CLASSES, "--out", str(dataset)))
    _one_line_error(done, str(dataset / name), "not a plain file")


@pytest.mark.parametrize("relative", [fmt.MANIFEST, "mask", "image"])
def test_a_fifo_in_place_of_a_dataset_file_is_refused_by_the_exports_and_the_reader(dataset, tmp_path, relative):
    from napari_sclip.plugin.review import hold_dataset

    if relative != fmt.MANIFEST:
        split, image_id = sample_ids(dataset)[0]
        relative = f"{split}/{read_meta(_meta_path(dataset, image_id))[relative]}"
    (dataset / relative).unlink()
    os.mkfifo(dataset / relative)
    _one_line_error(_cli("export-coco", str(dataset), str(tmp_path / "coco.json"), "--quiet"), relative, "not a plain file")
    _one_line_error(_cli("export-voc", str(dataset), str(tmp_path / "voc"), "--quiet"), relative, "not a plain file")
    if relative != fmt.MANIFEST:  # napari's reader, a review (a FIFO manifest is no dataset to it)
        with pytest.raises(DatasetError, match="not a plain file"):
            hold_dataset(dataset)


def test_a_lock_that_is_a_folder_is_named_with_what_to_do(tmp_path):
    (tmp_path / LOCK_NAME).mkdir()
    with pytest.raises(DatasetError) as raised:
        DatasetLock(tmp_path)
    assert str(raised.value).startswith(f"{tmp_path / LOCK_NAME} is not a plain file; remove it")


# -- hand-edited and malformed meta files -----------------------------------------------------------


def test_a_meta_file_naming_another_samples_file_stops_segment_overwrite(dataset, tmp_path, tiny_dir, tiny_checkpoint):
    meta_path = _meta_path(dataset, "im0")
    meta = json.loads(meta_path.read_text())
    meta["image"] = "meta/im1.json"
    meta_path.write_text(json.dumps(meta))
    other = _meta_path(dataset, "im1")
    if other.parent != meta_path.parent:  # the two samples' splits differ: point at a file beside it
        other = meta_path.parent / "im1.json"
        other.write_text(json.dumps({**meta, "id": "im1"}))
    before = other.read_bytes()
    done = run(cli_command(tiny_dir, tiny_checkpoint, "segment", str(tmp_path / "in"), *CLASSES, "--out", str(dataset),
                           "--overwrite"))
    _one_line_error(done, str(meta_path), "its image must be images/im0.<ext>")
    assert other.read_bytes() == before


@pytest.mark.parametrize(
    "change, message",
    [
        ({"source": "x"}, "its source must be an object"),
        ({"slice": 5}, "its slice must be a list of whole numbers"),
        ({"slice": [1, "a"]}, "its slice must be a list of whole numbers"),
        ({"mask": "masks/im1.png"}, "its mask must be masks/im0.png"),
        ({"image": "images/im0.x/../../y.png"}, "its image must be images/im0.<ext>"),
        ({"id": "im1"}, "its id must be 'im0'"),
        ({"edits": [1]}, "its edits must be an object"),
        ([], "it is not a JSON object"),
        ("deep", "nested too deeply"),
    ],
)
def test_malformed_meta_files_are_one_line_naming_the_file(dataset, tmp_path, change, message):
    meta_path = _meta_path(dataset, "im0")
    if change == "deep":
        meta_path.write_text("[" * 100_000 + "]" * 100_000)
    elif isinstance(change, dict):
        meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), **change}))
    else:
        meta_path.write_text(json.dumps(change))
    with pytest.raises(DatasetError, match=message) as raised:
        DatasetWriter(dataset)
    assert str(meta_path) in str(raised.value)
    _one_line_error(_cli("export-coco", str(dataset), str(tmp_path / "coco.json"), "--quiet"), str(meta_path), message)


# -- malformed manifests and locks ------------------------------------------------------------------


def _class_change(field, value):
    def change(manifest):
        manifest["classes"][0][field] = value

    return change


@pytest.mark.parametrize(
    "change, message",
    [
        (_class_change("uid", 10**12), "class uid 1000000000000 is not a distinct label value 1..65535"),
        (_class_change("uid", 70000), "class uid 70000 is not"),
        (_class_change("uid", -3), "class uid -3 is not"),
        (_class_change("uid", 0), "class uid 0 is not"),
        (_class_change("uid", 2), "class uid 2 is not a distinct"),
        (_class_change("uid", True), "class uid True is not"),
        (_class_change("name", 5), "class 1 needs a text name"),
        (_class_change("position", "x"), "class 1 needs"),
        (lambda m: m["splits"].update(ratios={"train": "x"}), "split ratios must be non-negative numbers"),
        (lambda m: m["splits"].update(ratios={"train": float("nan")}), "split ratios must be non-negative numbers"),
        (lambda m: m.update(vocabulary_version="x"), "vocabulary_version must be a positive whole number"),
        (lambda m: m.update(vocabulary_version=float("nan")), "vocabulary_version must be a positive whole number"),
        (lambda m: m.update(vocabulary_version=0), "vocabulary_version must be a positive whole number"),
        (lambda m: m.update(classes={"uid": 1}), "'classes' must be a list"),
        ("deep", "nested too deeply"),
    ],
)
def test_malformed_manifests_are_one_line_naming_the_file(dataset, tmp_path, change, message):
    path = dataset / fmt.MANIFEST
    if change == "deep":
        path.write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)
    else:
        manifest = json.loads(path.read_text())
        change(manifest)
        path.write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=message) as raised:
        fmt.read_manifest(dataset)
    assert str(raised.value).startswith(f"cannot read {path}" if change == "deep" else f"{path} is malformed")
    _one_line_error(_cli("export-coco", str(dataset), str(tmp_path / "coco.json"), "--quiet"), str(path))


@pytest.mark.parametrize("pid", [2**70, -1, 0, "12", True, 1.5])
def test_a_lock_with_an_impossible_pid_is_an_unreadable_lock(tmp_path, pid):
    record = {"host": this_host(), "pid": pid, "since": "x", "command": "c", "token": "t"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(DatasetError, match=r"is in use by another process \(its lock .* is unreadable\)"):
        DatasetLock(tmp_path)


def test_a_deeply_nested_lock_is_an_unreadable_lock(tmp_path):
    (tmp_path / LOCK_NAME).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DatasetError, match="is unreadable"):
        DatasetLock(tmp_path)


# -- hidden names -----------------------------------------------------------------------------------


def test_every_reader_skips_hidden_meta_files(dataset, tmp_path):
    from napari_sclip.dataset.review import QueueOptions, queue

    meta_path = _meta_path(dataset, "im0")
    (meta_path.parent / ".h.json").write_bytes(meta_path.read_bytes())
    (meta_path.parent / "._im0.json").write_bytes(b"\x00\x05\x16\x07")  # what macOS leaves on shared folders
    ids = sample_ids(dataset)
    assert sorted(image_id for _, image_id in ids) == ["im0", "im1"]
    with DatasetWriter(dataset) as writer:
        assert sorted(writer._samples) == ["im0", "im1"]
        assert sorted(queue(writer.entries(), QueueOptions())) == ["im0", "im1"]  # what a review shows
    done = _cli("export-coco", str(dataset), str(tmp_path / "coco.json"), "--quiet")
    assert done.returncode == 0, done.stderr
    assert len(json.loads((tmp_path / "coco.json").read_text())["images"]) == 2
    _, _, train_ids = fmt.read_manifest(dataset)
    for split, image_id in ids:
        read_sample(dataset, split, image_id, train_ids)


# -- many classes ---------------------------------------------------------------------------------


def test_class_positions_and_plans_agree_with_plain_list_lookups_for_many_classes():
    rng = np.random.default_rng(0)
    names = [f"class {k}" for k in range(3000)]
    registry = _registry(*names)
    vocabulary = [(names[k],) for k in rng.permutation(3000)[:2000]] + [("new",), ("CLASS 5",)]
    uids, retired = registry.plan(tuple(vocabulary))
    by_name = {n[0].casefold(): uid for uid, n in registry.names.items()}
    assert uids[:2000] == [by_name[n[0].casefold()] for n in vocabulary[:2000]]
    assert uids[2000] == 3001 and uids[2001] == by_name["class 5"]
    assert retired == [uid for uid in registry.active if uid not in uids]
    registry.update(tuple(vocabulary))
    for entry in registry.to_json():
        expected = registry.active.index(entry["uid"]) if entry["uid"] in registry.active else None
        assert entry["position"] == expected


def test_postscript_named_png_is_never_handed_to_ghostscript(tmp_path, monkeypatch):
    """Pillow picks its decoder from the content: a ".png" holding PostScript would go to
    Ghostscript (EPS).  Images, and a dataset's masks, are opened without that decoder."""
    from PIL import EpsImagePlugin

    from napari_sclip.dataset.reader import read_png
    from napari_sclip.engine.errors import ImageError
    from napari_sclip.io.images import exif_orientation, read_image

    called = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: called.append(a))
    fake = tmp_path / "photo.png"
    fake.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(ImageError, match="not an image format"):
        read_image(fake)
    with pytest.raises(DatasetError, match="cannot read"):
        read_png(fake)
    assert exif_orientation(fake) == 1 and called == []
