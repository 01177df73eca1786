"""Writing samples into a dataset folder: layout, ids, splits, atomicity, refusals."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from napari_sclip.classes import ClassRegistry
from napari_sclip.dataset import writer as writer_module
from napari_sclip.dataset.paths import DatasetError
from napari_sclip.dataset.writer import DatasetWriter, Sample

from conftest import natural_image


@pytest.fixture
def registry():
    registry = ClassRegistry()
    registry.update((("person",), ("sky",), ("flag",)))
    return registry


def _sample(stem="astronaut", shape=(40, 50), seed=0, **extra):
    rng = np.random.default_rng(seed)
    return Sample(stem=stem, labels=rng.integers(0, 4, shape).astype(np.uint8), image=natural_image(*shape), **extra)


def test_layout_masks_and_index(tmp_path, registry):
    writer = DatasetWriter(tmp_path / "ds", registry)
    sample = _sample(confidence=np.full((40, 50), 0.5, np.float32))
    sample.edited = np.zeros((40, 50), bool)
    sample.edited[:5, :5] = True
    image_id = writer.write(sample)
    counts = writer.rebuild_index()
    root = tmp_path / "ds"
    split = next(s for s, n in counts.items() if n)
    assert sum(counts.values()) == 1
    for name in ("dataset.json", "classes.txt", "id2label.json", "labelmap.txt", f"{split}/metadata.jsonl"):
        assert (root / name).is_file(), name
    mask = Image.open(root / split / "masks" / f"{image_id}.png")
    assert mask.mode == "L"
    expected = np.where(sample.labels == 0, 255, sample.labels - 1)  # uids 1..3 -> train ids 0..2
    np.testing.assert_array_equal(np.asarray(mask), expected)
    assert np.asarray(Image.open(root / split / "confidence" / f"{image_id}.png")).max() == 128
    provenance = np.asarray(Image.open(root / split / "provenance" / f"{image_id}.png"))
    assert set(np.unique(provenance[:5, :5])) <= {1, 2} and (provenance[5:] == 0).all()
    row = json.loads((root / split / "metadata.jsonl").read_text().splitlines()[0])
    assert row["file_name"] == f"images/{image_id}.png" and row["label_file_name"] == f"masks/{image_id}.png"
    meta = json.loads((root / split / "meta" / f"{image_id}.json").read_text())
    assert meta["review_status"] == "edited" and meta["edits"]["painted_pixels"] + meta["edits"]["ignored_pixels"] == 25


def test_source_files_are_copied_byte_for_byte_and_same_stems_get_distinct_ids(tmp_path, registry):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    Image.fromarray(natural_image(30, 30)).save(a / "img.jpg")
    Image.fromarray(natural_image(30, 40)).save(b / "img.jpg")
    writer = DatasetWriter(tmp_path / "ds", registry)
    labels = np.ones((30, 30), np.uint8)
    first = writer.write(Sample("img", labels, source=a / "img.jpg"))
    again = writer.write(Sample("img", labels, source=a / "img.jpg"))  # the same image: same id
    second = writer.write(Sample("img", np.ones((30, 40), np.uint8), source=b / "img.jpg"))
    assert first == again == "img" and second.startswith("img-") and second != first
    copied = next((tmp_path / "ds").glob("*/images/img.jpg"))
    assert copied.read_bytes() == (a / "img.jpg").read_bytes()


def test_a_turned_photo_is_stored_in_the_frame_of_its_labels(tmp_path, registry):
    """A JPEG whose EXIF turns it: loaders that apply EXIF and those that ignore it must both see
    the mask's frame, so the pixels the labels were made on are stored (as PNG, no EXIF)."""
    from PIL import ImageOps

    pixels = natural_image(30, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to show"
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif)
    shown = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "phone.jpg")))  # (40, 30, 3)
    stored_as_is = np.asarray(Image.open(tmp_path / "phone.jpg"))  # (30, 40, 3), as napari shows it
    # The CLI reads the shown frame; napari's reader the stored one: each labels its own.
    for name, expected in (("cli", shown), ("napari", stored_as_is)):
        with DatasetWriter(tmp_path / name, registry) as writer:
            writer.write(Sample("phone", np.ones(expected.shape[:2], np.uint8), image=expected,
                                source=tmp_path / "phone.jpg"))
            writer.rebuild_index()
        [image_path] = (tmp_path / name).glob("*/images/phone.*")
        assert image_path.suffix == ".png"
        with Image.open(image_path) as stored:
            assert stored.getexif().get(0x0112, 1) == 1
            np.testing.assert_array_equal(np.asarray(stored), expected)
            np.testing.assert_array_equal(np.asarray(ImageOps.exif_transpose(stored)), expected)
        [mask_path] = (tmp_path / name).glob("*/masks/phone.png")
        assert np.asarray(Image.open(mask_path)).shape == expected.shape[:2]


def test_a_non_dataset_folder_is_never_written_into(tmp_path, registry):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(DatasetError, match="not empty and not a napari-sclip dataset"):
        DatasetWriter(folder, registry)
    assert [p.name for p in folder.iterdir()] == ["holiday.jpg"]


def test_reopening_keeps_ratios_and_class_ids(tmp_path, registry):
    with DatasetWriter(tmp_path / "ds", registry, ratios={"train": 0.5, "val": 0.5}) as writer:
        writer.write(_sample())
    grown = ClassRegistry.from_json(registry.to_json())
    grown.update((("person",), ("sky",), ("flag",), ("rocket",)))
    reopened = DatasetWriter(tmp_path / "ds", grown, ratios={"train": 0.9, "val": 0.1})
    assert reopened.ratios == {"train": 0.5, "val": 0.5}
    reopened.rebuild_index()
    assert (tmp_path / "ds" / "classes.txt").read_text() == "person\nsky\nflag\nrocket\n"


def test_a_kill_mid_write_leaves_no_partial_sample(tmp_path, registry, monkeypatch):
    writer = DatasetWriter(tmp_path / "ds", registry)
    writer.write(_sample("first"))

    def killed(array, handle):
        raise KeyboardInterrupt("killed while encoding a PNG")

    monkeypatch.setattr(writer_module, "_encode_png", killed)
    with pytest.raises(KeyboardInterrupt):
        writer.write(_sample("second", seed=1))
    monkeypatch.undo()
    assert not list((tmp_path / "ds").rglob("*.tmp"))  # no temporary files left behind
    assert not list((tmp_path / "ds").rglob("meta/second.json"))  # the sample does not exist
    counts = writer.rebuild_index()
    assert sum(counts.values()) == 1  # still a valid dataset with the first sample


def test_unwritable_location_fails_clearly(tmp_path, registry):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DatasetError, match="file/ds: a part of the path is not a folder; choose another folder"):
        DatasetWriter(blocker / "ds", registry)


def test_opening_refuses_meta_files_that_point_outside(tmp_path, registry):
    with DatasetWriter(tmp_path / "ds", registry) as writer:
        image_id = writer.write(_sample())
    meta_path = next((tmp_path / "ds").glob(f"*/meta/{image_id}.json"))
    meta = json.loads(meta_path.read_text())
    meta["mask"] = "../../../etc/passwd"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="astronaut.json is malformed: its mask must be masks/astronaut.png"):
        DatasetWriter(tmp_path / "ds", registry)


def test_hugging_face_imagefolder_loads_image_and_label(tmp_path, registry):
    datasets = pytest.importorskip("datasets")
    writer = DatasetWriter(tmp_path / "ds", registry, ratios={"train": 1.0})
    for k in range(3):
        writer.write(_sample(f"img{k}", seed=k))
    writer.rebuild_index()
    loaded = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "ds"))
    assert {"image", "label"} <= set(loaded["train"].column_names)
    row = loaded["train"][0]
    mask_path = tmp_path / "ds" / "train" / "masks" / f"{row['id']}.png"
    np.testing.assert_array_equal(np.asarray(row["label"]), np.asarray(Image.open(mask_path)))
    assert row["image"].size == (50, 40)


def test_export_images_writes_stacks_as_slices_and_updates_in_place(tmp_path, registry):
    from napari_sclip.dataset.export import LabelledImage, export_images

    stack_labels = np.ones((3, 20, 30), np.uint8)
    stack = LabelledImage("stack", np.zeros((3, 20, 30), np.uint16), stack_labels, registry)
    params = {"model": "ViT-B-16", "pretrained": "openai", "quick_gelu": True, "device": "cuda:0",
              "precision": "fp16", "method": "sclip", "window": 224}
    photo = LabelledImage("photo", natural_image(20, 30), np.full((20, 30), 2, np.uint8), registry, rgb=True,
                          meta=params)
    steps = []
    ids = export_images(tmp_path / "ds", [stack, photo], progress=lambda d, t: steps.append((d, t)))
    assert ids == ["stack-000", "stack-001", "stack-002", "photo"] and steps[-1] == (4, 4)
    manifest = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    # How labels were made (the activation included) reaches the manifest; where they were made
    # (device, precision) stays with each sample.
    assert manifest["models"] == [{"model": "ViT-B-16", "pretrained": "openai", "quick_gelu": True, "method": "sclip",
                                   "window": 224}]
    meta = json.loads(next((tmp_path / "ds").glob("*/meta/photo.json")).read_text())
    assert {key: meta[key] for key in params} == params
    photo.labels = np.full((20, 30), 3, np.uint8)
    export_images(tmp_path / "ds", [photo])  # re-export: same id, new mask
    mask = next((tmp_path / "ds").glob("*/masks/photo.png"))
    assert (np.asarray(Image.open(mask)) == 2).all()  # uid 3 = flag = train id 2
    assert sum(manifest["splits"]["counts"].values()) == 4


def test_manifest_models_carry_patch_size_and_sc_clip_layers_through_the_journal(tmp_path, registry):
    """The manifest's ``models`` say which patch size and which SC-CLIP blocks labelled the
    samples, and say it again, unchanged, when a reopened dataset rebuilds them from its journal."""
    layers = {"similarity": 16, "post": 6, "fuse_start": 8, "fuse_end": 19, "cls_weight": 0.1,
              "rule": "authors' ViT-L/14 setting"}
    large = {"model": "ViT-L-14", "pretrained": "openai", "quick_gelu": True, "patch_size": 14, "method": "sc-clip",
             "sc_clip_layers": layers, "window": 224, "device": "cpu"}
    small = {**large, "model": "ViT-B-32", "patch_size": 32, "method": "sclip"}
    del small["sc_clip_layers"]
    root = tmp_path / "ds"
    with DatasetWriter(root, registry) as writer:
        writer.write(_sample("a", meta=large))
        writer.write(_sample("b", seed=1, meta=small))
        writer.write(_sample("c", seed=2, meta=dict(large)))  # the same setting again: one entry
    expected = [{key: value for key, value in params.items() if key != "device"} for params in (large, small)]
    assert json.loads((root / "dataset.json").read_text())["models"] == expected
    with DatasetWriter(root) as reopened:  # its entries come from the journal
        reopened.write(_sample("d", seed=3, meta=dict(small)))
    assert json.loads((root / "dataset.json").read_text())["models"] == expected


def test_training_ids_survive_a_removed_class_and_a_new_one(tmp_path, registry):
    with DatasetWriter(tmp_path / "ds", registry) as writer:
        first = writer.write(_sample("first"))
    old_mask = np.asarray(Image.open(next((tmp_path / "ds").glob(f"*/masks/{first}.png"))))
    later = ClassRegistry.from_json(registry.to_json())
    later.update((("person",), ("flag",), ("rocket",)))  # sky removed in napari, rocket added
    again = DatasetWriter(tmp_path / "ds", later)
    again.write(Sample("second", np.full((40, 50), 4, np.uint8), image=natural_image(40, 50)))
    again.rebuild_index()
    assert (tmp_path / "ds" / "classes.txt").read_text() == "person\nsky\nflag\nrocket\n"
    np.testing.assert_array_equal(np.asarray(Image.open(next((tmp_path / "ds").glob(f"*/masks/{first}.png")))), old_mask)
    assert (np.asarray(Image.open(next((tmp_path / "ds").glob("*/masks/second.png")))) == 3).all()


def test_conflicting_layers_refuse_to_share_a_dataset(tmp_path, registry):
    from napari_sclip.dataset.export import LabelledImage, export_images

    other = ClassRegistry()
    other.update((("tree",),))
    items = [LabelledImage("a", natural_image(8, 8), np.ones((8, 8), np.uint8), registry, rgb=True),
             LabelledImage("b", natural_image(8, 8), np.ones((8, 8), np.uint8), other, rgb=True)]
    with pytest.raises(DatasetError, match="label 1 is 'person' in one layer and 'tree'"):
        export_images(tmp_path / "ds", items)
    assert not (tmp_path / "ds").exists()


def test_opening_a_dataset_removes_a_killed_writers_temporaries(tmp_path, registry):
    import subprocess
    import sys

    from napari_sclip._files import this_host

    with DatasetWriter(tmp_path / "ds", registry) as writer:
        writer.write(Sample("a", np.ones((8, 8), np.uint8), image=natural_image(8, 8)))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    masks = next((tmp_path / "ds").glob("*/masks"))
    leftover = masks / f".a.png.{this_host()}.{int(dead.stdout)}.0123abcd.tmp"  # its writer has ended
    leftover.write_bytes(b"half a png")
    live = masks / f".b.png.{this_host()}.{os.getpid()}.0123abcd.tmp"  # a running writer's
    live.write_bytes(b"being written")
    keep = masks / "notes.tmp"  # not one of ours
    keep.write_text("mine")
    DatasetWriter(tmp_path / "ds", registry).close()
    assert not leftover.exists() and live.exists() and keep.exists()


@pytest.mark.parametrize(
    "image, mode",
    [
        (np.linspace(0, 1, 8 * 8 * 3, dtype=np.float32).reshape(8, 8, 3), "RGB"),  # float colour
        (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000, "I;16"),  # 16-bit grey kept as is
        (np.full((8, 8, 3), 40000, np.uint16), "RGB"),  # 16-bit colour: the engine's 8-bit rule
        (np.zeros((8, 8, 2), np.uint8), "RGB"),  # two channels
        (np.zeros((8, 8, 4), np.uint8), "RGBA"),
    ],
)
def test_odd_images_are_stored_as_pngs_trainers_read(tmp_path, registry, image, mode):
    writer = DatasetWriter(tmp_path / "ds", registry)
    writer.write(Sample("odd", np.ones((8, 8), np.uint8), image=image))
    stored = Image.open(next((tmp_path / "ds").glob("*/images/odd.png")))
    assert stored.mode == mode and stored.size == (8, 8)
    if mode == "I;16":
        np.testing.assert_array_equal(np.asarray(stored), image)
    meta = json.loads(next((tmp_path / "ds").glob("*/meta/odd.json")).read_text())
    assert meta["source"]["dtype"] == str(image.dtype) and meta["source"]["shape"] == list(image.shape)


def test_each_sample_records_its_classes_and_confidence_summary(tmp_path, registry):
    """The summary a reviewer orders by equals plain computations on the stored mask and
    confidence, and the journal carries it, so a reopened dataset knows it without reading files."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, (40, 50)).astype(np.uint8)  # 0 (unlabelled), person, sky: no flag
    confidence = rng.random((40, 50)).astype(np.float32)
    confidence[0, :4] = (0.2, 51 / 255, 0.1, 0.9)  # on and around the thresholds
    with DatasetWriter(tmp_path / "ds", registry) as writer:
        image_id = writer.write(Sample("a", labels, image=natural_image(40, 50), confidence=confidence))
        uncertain = writer.write(Sample("b", labels, image=natural_image(40, 50)))
    root = tmp_path / "ds"
    split = next(p.parent.parent.name for p in root.glob("*/meta/a.json"))
    meta = json.loads((root / split / "meta" / f"{image_id}.json").read_text())
    mask = np.asarray(Image.open(root / split / "masks" / f"{image_id}.png"))
    levels = np.asarray(Image.open(root / split / "confidence" / f"{image_id}.png")).astype(int)
    assert meta["summary"]["classes"] == sorted(int(v) for v in np.unique(mask) if v != 255)
    assert len(meta["summary"]["classes"]) == 2
    assert meta["summary"]["mean_confidence"] == pytest.approx(levels.mean() / 255, abs=1e-4)
    expected = [np.mean(levels / 255 < k / 10) for k in range(1, 10)]
    assert meta["summary"]["confidence_below"] == pytest.approx(expected, abs=1e-4)
    assert json.loads((root / split / "meta" / f"{uncertain}.json").read_text())["summary"]["mean_confidence"] is None

    reopened = DatasetWriter(root)
    try:
        entry = reopened.stored(image_id)
        assert entry.summary.to_json() == meta["summary"]
    finally:
        reopened.close()


@pytest.mark.parametrize("statuses", ["all unreviewed", "reviewed then edited then unreviewed", "no unreviewed",
                                      "all reviewed"])
def test_a_review_finds_where_it_opens_in_the_journals_first_rows(tmp_path, registry, monkeypatch, statuses):
    from napari_sclip.dataset.review import REVIEWED, QueueOptions, first_to_review, queue

    count = 240

    def status_of(k: int) -> str:
        if statuses == "all unreviewed":
            return "unreviewed"
        if statuses == "all reviewed":
            return "reviewed"
        if statuses == "no unreviewed":
            return "edited" if k % 7 == 3 else "reviewed"
        return "reviewed" if k < 200 else "edited" if k < 220 or k % 2 else "unreviewed"

    root = tmp_path / "ds"
    with DatasetWriter(root, registry, {"train": 0.5, "val": 0.3, "test": 0.2}) as writer:
        for k in range(count):
            labels = np.full((4, 4), k % 4, np.uint8)
            writer.write(Sample(f"s{(k * 37) % count:03d}", labels, image=np.full((4, 4, 3), k % 256, np.uint8),
                                meta={"review_status": status_of(k)}))
    rows = [json.loads(line) for line in (root / writer_module.JOURNAL).read_text().splitlines()]
    from napari_sclip.dataset.splits import SPLIT_NAMES

    order = [(SPLIT_NAMES.index(row["split"]), row["id"]) for row in rows]
    assert order == sorted(order) and len(rows) == count  # consolidated in the queue's tie order

    parsed = []
    real = writer_module._journal_row
    monkeypatch.setattr(writer_module, "_journal_row", lambda line: parsed.append(line) or real(line))
    found = first_to_review(root)
    monkeypatch.setattr(writer_module, "_journal_row", real)
    with DatasetWriter(root) as owner:  # the reference: the queue the review builds from the index
        entries = dict(owner.entries())
    ids = queue(entries, QueueOptions())
    first = next((i for i in ids if entries[i].review_status != REVIEWED), ids[0])
    assert found == (entries[first].split, first)
    assert len(parsed) <= 3  # one row parsed per status: the rest are skipped unparsed

    (root / writer_module.JOURNAL).unlink()
    assert first_to_review(root) is None
    (root / writer_module.JOURNAL).write_bytes(b'{"id": "s001", "review_status": "unreviewed", bro\n\x00\xff\n')
    assert first_to_review(root) is None  # damaged rows are no answer
    row = json.loads(json.dumps(rows[0]))
    row.update(id="../../outside", image="images/../../outside.png")
    (root / writer_module.JOURNAL).write_text(json.dumps(row) + "\n")
    assert first_to_review(root) is None  # nor are rows naming a path
