"""Labelling large folders: the pipelined batch equals the one-image-at-a-time path file for
file, the index costs the same per sample at 20k samples as at the start, kills at random
moments resume, and a Dask cluster of worker processes gives the same dataset, also when a worker
is killed mid-run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_sclip.dataset import writer as writer_module
from napari_sclip.dataset.batch import label_images
from napari_sclip.dataset.export import plane_stem
from napari_sclip.dataset.writer import JOURNAL, DatasetWriter, Sample, sha256_of
from napari_sclip.engine.vocabulary import parse_vocabulary

from conftest import TINY_MODEL, natural_image, same_files_apart_from_timestamps
from dataset_helpers import assert_consistent, cli_command, dataset_masks, run, save_images

try:
    from distributed.diagnostics.plugin import WorkerPlugin as _WorkerPlugin
except ImportError:  # the cluster tests skip
    _WorkerPlugin = object

CLASSES = ["grass", "sky, clouds", "person"]


def _mixed_folder(folder):
    """RGB JPEG and PNG, grayscale, 16-bit, RGBA, a stack, a duplicate and a bad file."""
    folder.mkdir()
    base = natural_image(90, 120)
    Image.fromarray(base).save(folder / "rgb.png")
    Image.fromarray(np.roll(base, 17, axis=1)).save(folder / "photo.jpg", quality=90)
    Image.fromarray(base[..., 1]).save(folder / "gray.png")
    tifffile.imwrite(folder / "deep.tif", base[..., 0].astype(np.uint16) * 200)
    rgba = np.dstack([np.roll(base, 31, axis=0), np.full(base.shape[:2], 200, np.uint8)])
    Image.fromarray(rgba).save(folder / "alpha.png")
    tifffile.imwrite(folder / "stack.tif", np.stack([np.roll(base[..., k], 9 * k, axis=1) for k in range(3)]),
                     photometric="minisblack")
    Image.fromarray(base).save(folder / "same-as-rgb.png")  # the same pixels and bytes as rgb.png
    Image.fromarray(natural_image(200, 60)).save(folder / "tall.png")
    (folder / "broken.png").write_bytes(b"not a png")
    return sorted(folder.iterdir())


def _one_at_a_time(paths, root, segmenter, vocabulary):
    """The plain reference: each file read, each slice segmented alone and written with
    DatasetWriter.write, in order (what the batch did before it was pipelined)."""
    from napari_sclip.engine.errors import ImageError
    from napari_sclip.io.images import read_with_layout

    with DatasetWriter(root, vocabulary=vocabulary.classes) as writer:
        active = [0, *writer.registry.active]
        uids = np.array(active, np.uint8)
        seen = set()
        for path in paths:
            sha = sha256_of(path)
            if sha in seen:
                continue
            seen.add(sha)
            try:
                image, layout = read_with_layout(path)
            except ImageError:
                continue
            for index in layout.indices():
                plane = layout.plane(image, index or ())
                result = segmenter.segment(plane, vocabulary)
                labels = uids[result.labels]
                if index is None:
                    sample = Sample(path.stem, labels, image=plane, source=path, source_sha256=sha,
                                    confidence=result.confidence, meta=dict(result.params))
                else:
                    source = {"path": str(path), "sha256": sha, "shape": list(image.shape), "dtype": str(image.dtype)}
                    sample = Sample(plane_stem(path.stem, index), labels, image=plane, confidence=result.confidence,
                                    meta={"source": source, "slice": list(index), **result.params})
                writer.write(sample)


def test_the_pipeline_writes_what_one_image_at_a_time_writes(tmp_path, tiny_checkpoint):
    """Readers, writers and batches of windows that straddle images change no file."""
    from napari_sclip import Segmenter

    paths = _mixed_folder(tmp_path / "in")
    vocabulary = parse_vocabulary(CLASSES)
    _one_at_a_time(paths, tmp_path / "reference", Segmenter(TINY_MODEL, str(tiny_checkpoint), "cpu"), vocabulary)
    pipelined = Segmenter(TINY_MODEL, str(tiny_checkpoint), "cpu", batch_size=5, feature_cache=False)
    items = list(label_images(paths, vocabulary, tmp_path / "pipelined", pipelined, readers=3, writers=3))

    same_files_apart_from_timestamps(tmp_path / "reference", tmp_path / "pipelined")
    statuses = {item.path.name: item.status for item in items}
    assert statuses.pop("broken.png") == "failed"
    assert sorted(statuses.values()).count("written") == 7 and statuses.get("same-as-rgb.png") == "skipped"
    assert len(items) == len(paths)


def test_files_are_planned_in_the_given_order_whichever_hash_finishes_first(tmp_path, tiny_checkpoint,
                                                                              monkeypatch):
    """Of two files with the same bytes the first is labelled, and of two with the same name the
    first gets the plain id, even when their readers finish hashing in the other order."""
    from napari_sclip import Segmenter
    from napari_sclip.dataset import batch

    folder = tmp_path / "in"
    for sub in ("one", "two"):
        (folder / sub).mkdir(parents=True)
    image = natural_image(64, 64)
    Image.fromarray(image).save(folder / "one" / "first.png")
    Image.fromarray(image).save(folder / "two" / "copy.png")
    Image.fromarray(np.roll(image, 5, axis=0)).save(folder / "one" / "pic.png")
    Image.fromarray(np.roll(image, 9, axis=1)).save(folder / "two" / "pic.png")
    paths = [folder / "one" / "first.png", folder / "two" / "copy.png", folder / "one" / "pic.png",
             folder / "two" / "pic.png"]
    slow = {paths[0], paths[2]}

    def hash_slowly(path):
        if path in slow:  # the other readers hash their files meanwhile
            time.sleep(0.5)
        return sha256_of(path)

    monkeypatch.setattr(batch, "sha256_of", hash_slowly)
    model = Segmenter(TINY_MODEL, str(tiny_checkpoint), "cpu", feature_cache=False)
    items = {item.path: item for item in label_images(paths, parse_vocabulary(CLASSES), tmp_path / "ds", model,
                                                      readers=4)}
    assert [items[path].status for path in paths] == ["written", "skipped", "written", "written"]
    assert items[paths[1]].image_ids == items[paths[0]].image_ids == ("first",)
    assert items[paths[2]].image_ids == ("pic",) and items[paths[3]].image_ids != ("pic",)


def test_two_devices_write_what_one_writes(tmp_path, tiny_checkpoint):
    """One model per device, pulling from one queue (two CPU 'devices' here)."""
    from napari_sclip import Segmenter

    paths = save_images(tmp_path / "in", 10, 64, 80)
    vocabulary = parse_vocabulary(CLASSES)
    models = [Segmenter(TINY_MODEL, str(tiny_checkpoint), "cpu", batch_size=3, feature_cache=False) for _ in range(2)]
    list(label_images(paths, vocabulary, tmp_path / "two", models))
    list(label_images(paths, vocabulary, tmp_path / "one", models[0]))
    same_files_apart_from_timestamps(tmp_path / "one", tmp_path / "two")


def test_memory_between_stages_is_bounded(tmp_path, tiny_checkpoint, monkeypatch):
    """Decoded images held at once stay within the budget (one image always passes)."""
    from napari_sclip import Segmenter
    from napari_sclip.dataset import batch

    paths = save_images(tmp_path / "in", 12, 64, 64)
    held, most = [0], [0]
    lock = threading.Lock()
    original_take, original_give = batch._Budget.take, batch._Budget.give

    def take(self, size, stopped):
        taken = original_take(self, size, stopped)
        with lock:
            held[0] += size
            most[0] = max(most[0], held[0])
        return taken

    def give(self, size):
        with lock:
            held[0] -= size
        original_give(self, size)

    monkeypatch.setattr(batch._Budget, "take", take)
    monkeypatch.setattr(batch._Budget, "give", give)
    monkeypatch.setattr(batch, "IMAGE_BUDGET_BYTES", 2 * 64 * 64 * 3)
    items = list(label_images(paths, parse_vocabulary(CLASSES), tmp_path / "out",
                              Segmenter(TINY_MODEL, str(tiny_checkpoint), "cpu"), readers=3, writers=2))
    assert [item.status for item in items] == ["written"] * 12
    assert most[0] == 2 * 64 * 64 * 3  # two images at most, though three readers and two writers
    assert held[0] == 0


# -- the index -----------------------------------------------------------------------------------


def test_the_index_costs_the_same_per_sample_at_20k_samples(tmp_path, monkeypatch):
    """A loop plans and records 20,000 samples: each record writes one journal line and reads no
    meta file and no index, however many samples came before; closing consolidates once; the
    next open reads the journal instead of 20,000 meta files."""
    from napari_sclip.classes import ClassRegistry

    root = tmp_path / "ds"
    registry = ClassRegistry()
    registry.update((("a",), ("b",)))
    count = 20_000
    written_bytes: list[int] = []
    reads = []
    real_write = os.write

    def counting_write(fd, data):
        written_bytes.append(len(data))
        return real_write(fd, data)

    with DatasetWriter(root, registry) as writer:
        writer.write(Sample("first", np.ones((8, 8), np.uint8), image=natural_image(8, 8)))  # makes the split
        monkeypatch.setattr(writer_module, "read_meta", lambda path: reads.append(path) or pytest.fail("meta read"))
        monkeypatch.setattr(writer_module, "atomic_write_bytes", lambda *a: pytest.fail("a rewrite during the run"))
        monkeypatch.setattr(writer_module.os, "write", counting_write)
        for split in ("train", "val"):
            (root / split / "meta").mkdir(parents=True, exist_ok=True)
        for k in range(count):
            target = writer.plan(f"s{k}", (f"{k:064x}", None))
            meta = {"id": target.image_id, "split": target.split, "image": f"images/{target.image_id}.png",
                    "mask": f"masks/{target.image_id}.png", "source": {"sha256": f"{k:064x}", "path": f"/x/s{k}.png"},
                    "review_status": "unreviewed", "model": "m"}
            (root / target.split / "meta" / f"{target.image_id}.json").write_text(json.dumps(meta))
            writer.record(target, meta)
        monkeypatch.undo()
        first, last = written_bytes[:1000], written_bytes[-1000:]
        assert len(written_bytes) == count  # one write per sample: its journal line
        assert max(last) <= max(first) + 16 and not reads  # lines grow only with the digits of ids and times
        for split in ("train", "val"):  # not indexed until consolidation
            index = root / split / "metadata.jsonl"
            assert not index.exists() or len(index.read_text().splitlines()) <= 1
    rows = sum(len((root / split / "metadata.jsonl").read_text().splitlines()) for split in ("train", "val"))
    assert rows == count + 1

    # The next open reads the journal, not the meta files (they would fail: they name no files).
    for k in range(count):  # give each sample its image and mask, as real ones have
        split = "train" if (root / "train" / "meta" / f"s{k}.json").exists() else "val"
        (root / split / "images").mkdir(exist_ok=True)
        (root / split / "masks").mkdir(exist_ok=True)
        (root / split / "images" / f"s{k}.png").touch()
        (root / split / "masks" / f"s{k}.png").touch()
    monkeypatch.setattr(writer_module, "read_meta", lambda path: reads.append(path) or pytest.fail("meta read"))
    with DatasetWriter(root, registry) as again:
        assert len(again._samples) == count + 1
    assert not reads


def test_a_journal_row_stands_for_its_meta_file_only_while_the_file_is_unchanged(tmp_path):
    """A meta file edited after the journal was written (by hand, by another program) is read
    again; damaged journal lines are ignored."""
    from napari_sclip.classes import ClassRegistry

    registry = ClassRegistry()
    registry.update((("a",), ("b",)))
    root = tmp_path / "ds"
    with DatasetWriter(root, registry) as writer:
        for name in ("x", "y"):
            writer.write(Sample(name, np.ones((8, 8), np.uint8), image=natural_image(8, 8 + len(name))))
        split = writer.stored("x").split
    meta_path = root / split / "meta" / "x.json"
    meta = json.loads(meta_path.read_text())
    meta["review_status"] = "reviewed"
    meta_path.write_text(json.dumps(meta, indent=2))
    with open(root / JOURNAL, "a") as journal:
        journal.write('{"id": "y", "split": "train", "ima')  # a killed append
    with DatasetWriter(root, registry) as writer:
        assert writer.stored("x").review_status == "reviewed" and writer.stored("x").edited
        assert writer.stored("y") is not None
    rows = [json.loads(line) for line in (root / JOURNAL).read_text().splitlines()]
    assert sorted(row["id"] for row in rows) == ["x", "y"]  # compacted on open


# -- kills ---------------------------------------------------------------------------------------


def test_kills_at_random_moments_resume_to_the_uninterrupted_dataset(tmp_path, tiny_dir, tiny_checkpoint):
    """SIGKILL during a pipelined run, several times: each run leaves a valid dataset; the last
    completes it with every image once and the same masks as an uninterrupted run."""
    images = save_images(tmp_path / "in", 16, 64, 80)
    command = {
        out: cli_command(tiny_dir, tiny_checkpoint, "segment", str(tmp_path / "in"), "--classes", "a; b; c",
                         "--out", str(tmp_path / out))
        for out in ("whole", "killed")
    }
    assert run(command["whole"]).returncode == 0
    rng = np.random.default_rng(11)
    for _ in range(4):
        process = subprocess.Popen(command["killed"], stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 4.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
        if (tmp_path / "killed" / "dataset.json").exists():
            assert_consistent_apart_from_leftovers(tmp_path / "killed")
    done = run(command["killed"])
    assert done.returncode == 0, done.stderr
    assert_consistent(tmp_path / "killed")
    whole, killed = dataset_masks(tmp_path / "whole"), dataset_masks(tmp_path / "killed")
    assert sorted(killed) == sorted(path.stem for path in images)
    for key in whole:
        np.testing.assert_array_equal(whole[key], killed[key])


def assert_consistent_apart_from_leftovers(root) -> None:
    """A killed run's lock and temporary files are its only leftovers: readers see a dataset."""
    from napari_sclip.dataset.format import read_manifest
    from napari_sclip.dataset.reader import read_sample, sample_ids

    _, _, train_ids = read_manifest(root)
    for split, image_id in sample_ids(root):
        read_sample(root, split, image_id, train_ids)


# -- Dask ----------------------------------------------------------------------------------------


def _dask_command(tiny_dir, checkpoint, source, out, *extra):
    return cli_command(tiny_dir, checkpoint, "segment", str(source), "--classes", "a; b; c", "--out", str(out), *extra)


@pytest.mark.cluster
def test_a_local_dask_cluster_writes_what_one_process_writes(tmp_path, tiny_dir, tiny_checkpoint):
    """`segment --workers 2` (two worker processes) gives the single-process dataset, file for
    file (one torch thread each side: float sums split over threads round differently)."""
    pytest.importorskip("distributed")
    paths = _mixed_folder(tmp_path / "in")
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = run(_dask_command(tiny_dir, tiny_checkpoint, tmp_path / "in", tmp_path / "single"), env=environment)
    dask = run(_dask_command(tiny_dir, tiny_checkpoint, tmp_path / "in", tmp_path / "dask", "--workers", "2"),
               env=environment)
    assert single.returncode == dask.returncode == 2, (single.stderr, dask.stderr)  # broken.png
    assert dask.stderr.strip().splitlines() == single.stderr.strip().splitlines()
    assert dask.stderr.strip().startswith(f"napari-sclip: skipped {tmp_path / 'in' / 'broken.png'}: ")
    same_files_apart_from_timestamps(tmp_path / "single", tmp_path / "dask")
    assert len(list((tmp_path / "dask").glob("*/meta/*.json"))) == len(paths) - 2 + 2  # no broken, no copy; 3 slices


@pytest.mark.cluster
def test_a_worker_killed_mid_run_loses_and_duplicates_nothing(tmp_path, tiny_checkpoint, tiny_dir):
    """One of two workers is SIGKILLed while chunks are being labelled: the scheduler runs its
    chunk again elsewhere; every image is in the dataset once, equal to a run without the kill."""
    pytest.importorskip("distributed")
    from napari_sclip import Segmenter
    from napari_sclip.dataset.cluster import open_client

    paths = save_images(tmp_path / "in", 24, 64, 80)
    vocabulary = parse_vocabulary(["a", "b", "c"])
    segmenter = Segmenter(TINY_MODEL, str(tiny_checkpoint), "cpu")
    with open_client(workers=2) as client:
        list(label_images(paths, vocabulary, tmp_path / "whole", segmenter, client=client, chunk_size=2))
        pids = client.run(os.getpid)
        killed = []

        def kill_when_labelling() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and len(list((tmp_path / "killed").glob("*/meta/*.json"))) < 3:
                time.sleep(0.01)
            victim = sorted(pids.values())[0]
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

        killer = threading.Thread(target=kill_when_labelling)
        killer.start()
        items = list(label_images(paths, vocabulary, tmp_path / "killed", segmenter, client=client, chunk_size=2))
        killer.join()
    assert killed
    assert sorted(item.status for item in items) == ["written"] * 24
    assert sorted(path.stem for path in (tmp_path / "killed").glob("*/meta/*.json")) == sorted(p.stem for p in paths)
    assert_consistent(tmp_path / "killed")
    whole, again = dataset_masks(tmp_path / "whole"), dataset_masks(tmp_path / "killed")
    assert whole.keys() == again.keys()
    for key in whole:
        np.testing.assert_array_equal(whole[key], again[key])


@pytest.mark.cluster
def test_a_dask_run_and_a_local_run_at_once_never_lose_a_class(tmp_path, tiny_dir, tiny_checkpoint):
    """The trust issue's two concurrent runs, one of them on a Dask cluster: one owner at a time,
    the other refused in one line, then merged; no class lost, no undeclared mask id."""
    pytest.importorskip("distributed")
    images = save_images(tmp_path / "in", 6)
    out = tmp_path / "ds"
    commands = {
        "tree": cli_command(tiny_dir, tiny_checkpoint, "segment", str(tmp_path / "in"), "--classes", "grass; tree",
                            "--out", str(out), "--workers", "2"),
        "sky": cli_command(tiny_dir, tiny_checkpoint, "segment", str(tmp_path / "in"), "--classes", "grass; sky",
                           "--out", str(out)),
    }
    processes = {cls: subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for cls, command in commands.items()}
    results = {cls: (process.wait(timeout=600), process.stderr.read().strip()) for cls, process in processes.items()}
    assert sorted(code for code, _ in results.values()) in ([0, 0], [0, 1]), results
    for cls, (code, err) in results.items():
        if code == 1:
            assert "\n" not in err and "is in use by" in err, err
            assert run(commands[cls]).returncode == 0
    names = assert_consistent(out)
    assert set(names) == {"grass", "tree", "sky"}
    assert sorted(dataset_masks(out)) == sorted(path.stem for path in images)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--workers", "0"], "expected a positive whole number"),
        (["--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "not both"),
        (["--scheduler", "tcp://127.0.0.1:1"], "cannot reach the Dask scheduler at tcp://127.0.0.1:1: connection refused"),
        # An unset variable in a job script: an error, never a quiet run on the login node.
        (["--scheduler", ""], "the Dask scheduler address is empty"),
        (["--scheduler", "tcp://nosuchhost.invalid:8786"], "unknown host 'nosuchhost.invalid'"),
        (["--devices", "cpu,cpu"], "names a device twice"),
        (["--devices", "cpu,cpu:0"], "names a device twice"),
    ],
)
def test_cluster_and_device_errors_are_one_line(tmp_path, tiny_dir, tiny_checkpoint, extra, message):
    save_images(tmp_path / "in", 1)
    done = run(cli_command(tiny_dir, tiny_checkpoint, "segment", str(tmp_path / "in"), "--classes", "a; b",
                           "--out", str(tmp_path / "ds"), *extra))
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert message in done.stderr
    assert not (tmp_path / "ds").exists()


def test_the_cli_runs_as_a_module_in_a_fresh_interpreter_with_workers(tmp_path):
    """The cluster options are in `--help` (the documented entry point)."""
    done = subprocess.run([sys.executable, "-m", "napari_sclip.cli", "segment", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for flag in ("--workers", "--scheduler", "--devices"):
        assert flag in done.stdout


@pytest.mark.cluster
def test_a_killed_client_leaves_a_dataset_the_next_run_completes(tmp_path, tiny_dir, tiny_checkpoint):
    """SIGKILL of `segment --workers 2` mid-run: its workers go with it (nothing is written after),
    the folder is a dataset, and the same command completes it with every image once."""
    pytest.importorskip("distributed")
    images = save_images(tmp_path / "in", 16, 64, 80)
    out = tmp_path / "ds"
    command = _dask_command(tiny_dir, tiny_checkpoint, tmp_path / "in", out, "--workers", "2")
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None and len(list(out.glob("*/meta/*.json"))) < 3:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    time.sleep(3)
    written = sorted(out.glob("*/meta/*.json"))
    time.sleep(3)
    assert sorted(out.glob("*/meta/*.json")) == written  # no orphaned worker goes on writing
    assert_consistent_apart_from_leftovers(out)
    done = run(command)
    assert done.returncode == 0 and not done.stderr, done.stderr
    assert_consistent(out)
    assert sorted(dataset_masks(out)) == sorted(path.stem for path in images)


@pytest.mark.cluster
def test_segment_on_an_existing_cluster_by_its_scheduler_address(tmp_path, tiny_dir, tiny_checkpoint):
    """`--scheduler ADDRESS`: a cluster started elsewhere (here: by the test) labels the folder,
    its workers load the model the command names, and it keeps running afterwards."""
    pytest.importorskip("distributed")
    from napari_sclip.dataset.cluster import open_client

    images = save_images(tmp_path / "in", 6, 64, 80)
    with open_client(workers=1) as client:
        address = client.scheduler.address
        done = run(_dask_command(tiny_dir, tiny_checkpoint, tmp_path / "in", tmp_path / "ds", "--scheduler", address))
        assert done.returncode == 0 and not done.stderr, done.stderr
        assert client.run(lambda: 1)  # still up
    assert_consistent(tmp_path / "ds")
    assert sorted(dataset_masks(tmp_path / "ds")) == sorted(path.stem for path in images)


@pytest.mark.cluster
def test_relative_paths_and_worker_side_weights_reach_workers_started_elsewhere(tmp_path, tiny_dir, tiny_checkpoint):
    """Run from its own folder with relative images, dataset and weights, the command labels on
    workers whose working folder is another; and with no weights named, each worker takes its
    own environment's default (NAPARI_SCLIP_PRETRAINED set for the workers, not the client)."""
    pytest.importorskip("distributed")
    from napari_sclip.dataset.cluster import open_client

    job = tmp_path / "job"
    images = save_images(job / "in", 4, 64, 80)
    shutil.copy(tiny_checkpoint, job / "tiny.pt")
    client_env = {key: value for key, value in os.environ.items() if key != "NAPARI_SCLIP_PRETRAINED"}
    client_env["HF_HUB_OFFLINE"] = "1"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NAPARI_SCLIP_PRETRAINED", str(tiny_checkpoint))
        patch.setenv("HF_HUB_OFFLINE", "1")
        cluster = open_client(workers=1)
        client = cluster.__enter__()
    try:
        assert os.getcwd() != str(job)
        address = client.scheduler.address
        relative = run(cli_command(tiny_dir, Path("tiny.pt"), "segment", "in", "--classes", "a; b", "--out", "ds",
                                   "--scheduler", address), cwd=job, env=client_env)
        assert relative.returncode == 0 and not relative.stderr, relative.stderr
        defaults = run(cli_command(tiny_dir, None, "segment", "in", "--classes", "a; b", "--out", "ds2",
                                   "--scheduler", address), cwd=job, env=client_env)
        assert defaults.returncode == 0 and not defaults.stderr, defaults.stderr
    finally:
        cluster.__exit__(None, None, None)
    for name in ("ds", "ds2"):
        assert sorted(dataset_masks(job / name)) == sorted(path.stem for path in images)
    meta = json.loads(next((job / "ds").glob("*/meta/im0.json")).read_text())
    assert meta["source"]["path"] == str(job / "in" / "im0.png")  # absolute, links kept
    meta = json.loads(next((job / "ds2").glob("*/meta/im0.json")).read_text())
    assert (meta.get("provenance") or meta)["pretrained"] == str(tiny_checkpoint)


@pytest.mark.cluster
def test_a_lost_scheduler_is_one_line_and_the_rerun_completes(tmp_path, tiny_dir, tiny_checkpoint):
    pytest.importorskip("distributed")
    from napari_sclip.dataset.cluster import open_client

    images = save_images(tmp_path / "in", 24, 64, 80)
    out = tmp_path / "ds"
    with open_client(workers=1) as client:
        command = _dask_command(tiny_dir, tiny_checkpoint, tmp_path / "in", out, "--scheduler", client.scheduler.address)
        process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None and len(list(out.glob("*/meta/*.json"))) < 2:
            time.sleep(0.01)
        client.shutdown()  # the scheduler and its worker go away mid-run
        code, err = process.wait(timeout=120), process.stderr.read().strip()
    assert code == 1 and len(err.splitlines()) == 1 and "lost the Dask scheduler" in err, err
    done = run(_dask_command(tiny_dir, tiny_checkpoint, tmp_path / "in", out))
    assert done.returncode == 0 and not done.stderr, done.stderr
    assert sorted(dataset_masks(out)) == sorted(path.stem for path in images)


class _PoisonReader(_WorkerPlugin):
    """Makes a worker process die (as from running out of memory) when it reads a file whose
    name starts with "poison"; the nanny's new worker gets it again."""

    name = "poison-reader"

    def setup(self, worker):
        from napari_sclip.io import images

        real = images.read_with_layout

        def read(path, *args, **kwargs):
            if Path(path).name.startswith("poison"):
                os._exit(1)
            return real(path, *args, **kwargs)

        images.read_with_layout = read


@pytest.mark.cluster
def test_a_file_that_kills_workers_fails_alone(tmp_path, tiny_dir, tiny_checkpoint):
    """A task whose file kills every worker that reads it is split: its other files are written,
    and only that file fails, saying why."""
    pytest.importorskip("distributed")
    import dask

    from napari_sclip import Segmenter
    from napari_sclip.dataset.cluster import open_client

    paths = save_images(tmp_path / "in", 3, 64, 80)
    poison = tmp_path / "in" / "poison.png"
    shutil.copy(paths[0], poison)
    Image.fromarray(np.roll(np.asarray(Image.open(poison)), 5, axis=0)).save(poison)  # other bytes
    segmenter = Segmenter(TINY_MODEL, str(tiny_checkpoint), "cpu")
    # One task at a time on the one worker: a dying worker takes no bystander task with it.
    settings = {"distributed.scheduler.allowed-failures": 1, "distributed.scheduler.worker-saturation": 1.0}
    with dask.config.set(settings), open_client(workers=1) as client:
        client.register_plugin(_PoisonReader())
        items = list(label_images([paths[0], poison, *paths[1:]], parse_vocabulary(["a", "b"]), tmp_path / "ds",
                                  segmenter, client=client, chunk_size=4))
    statuses = {item.path.name: item.status for item in items}
    assert statuses == {"im0.png": "written", "im1.png": "written", "im2.png": "written", "poison.png": "failed"}
    failed = next(item for item in items if item.status == "failed")
    assert "a Dask worker died each time it labelled this file" in failed.reason
    assert sorted(dataset_masks(tmp_path / "ds")) == ["im0", "im1", "im2"]


@pytest.mark.cluster
def test_a_worker_that_cannot_run_napari_sclip_is_named(tmp_path, tiny_checkpoint):
    pytest.importorskip("distributed")
    from napari_sclip import Segmenter
    from napari_sclip.dataset.cluster import ClusterError, open_client

    paths = save_images(tmp_path / "in", 2, 64, 80)
    with open_client(workers=1) as client:
        client.run(lambda: sys.modules.__setitem__("napari_sclip.dataset.cluster", None))  # as if not installed
        address, info = next(iter(client.scheduler_info()["workers"].items()))
        with pytest.raises(ClusterError) as caught:
            list(label_images(paths, parse_vocabulary(["a", "b"]), tmp_path / "ds",
                              Segmenter(TINY_MODEL, str(tiny_checkpoint), "cpu"), client=client))
    message = str(caught.value)
    assert message.startswith(f"Dask worker {info['name']} ({address}) cannot run napari-sclip (") and "\n" not in message
    assert "No module named" in message or "ModuleNotFoundError" in message
    assert "every worker needs napari-sclip" in message


# -- found by the attacker's pass ----------------------------------------------------------------


def _registry_ab():
    from napari_sclip.classes import ClassRegistry

    registry = ClassRegistry()
    registry.update((("a",), ("b",)))
    return registry


def test_a_new_dataset_that_others_wrote_samples_into_keeps_its_manifest_on_failure(tmp_path):
    """Workers placed a sample the owner never recorded (Ctrl+C, a full disk): the manifest stays,
    and the next open finds the sample (the folder was refused as 'not a dataset' before)."""
    from napari_sclip.dataset.writer import write_sample_files

    root = tmp_path / "ds"
    with pytest.raises(KeyboardInterrupt):
        with DatasetWriter(root, _registry_ab()) as writer:
            sample = Sample("x", np.ones((8, 8), np.uint8), image=natural_image(8, 8))
            target = writer.plan("x", ("0" * 64, None))
            write_sample_files(root, target, sample)
            raise KeyboardInterrupt
    assert (root / "dataset.json").is_file()
    with DatasetWriter(root, _registry_ab()) as writer:
        assert writer.stored("x") is not None
    assert_consistent(root)


def test_a_dataset_that_got_no_sample_is_not_left_behind(tmp_path, tiny_dir, tiny_checkpoint):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"")
    (tmp_path / "in" / "b.png").write_bytes(b"not a png")
    done = run(cli_command(tiny_dir, tiny_checkpoint, "segment", str(tmp_path / "in"), "--classes", "a; b",
                           "--out", str(tmp_path / "ds")))
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 2, done.stderr
    assert not (tmp_path / "ds").exists()


def test_a_journal_row_cannot_name_another_samples_files(tmp_path):
    """A row for 'a' naming images/a.b.png (sample 'a.b''s) is ignored: the meta file decides,
    and an overwrite of 'a' never deletes 'a.b''s image."""
    root = tmp_path / "ds"
    with DatasetWriter(root, _registry_ab()) as writer:
        for stem, seed in (("a", 0), ("a.b", 1)):
            writer.write(Sample(stem, np.ones((8, 8), np.uint8), image=np.roll(natural_image(8, 8), seed, axis=1)))
        split = writer.stored("a").split
    journal = root / JOURNAL
    journal.write_text(journal.read_text().replace('"image": "images/a.png"', '"image": "images/a.b.png"'))
    with DatasetWriter(root, _registry_ab()) as writer:
        assert writer.stored("a").image == "images/a.png"
        writer.write(Sample("a", np.zeros((8, 8), np.uint8), image=natural_image(8, 8)))
    assert (root / writer.stored("a.b").split / "images" / "a.b.png").is_file()
    assert json.loads((root / split / "meta" / "a.json").read_text())["image"] == "images/a.png"
    assert_consistent(root)


def test_an_edit_that_keeps_size_and_modification_time_is_still_seen(tmp_path):
    """'unreviewed' -> 'reviewed  ' (same length) with the old modification time put back: the
    status-change time gives it away, so the sample stays a person's."""
    root = tmp_path / "ds"
    with DatasetWriter(root, _registry_ab()) as writer:
        writer.write(Sample("a", np.ones((8, 8), np.uint8), image=natural_image(8, 8)))
        split = writer.stored("a").split
    path = root / split / "meta" / "a.json"
    before = path.stat()
    text = path.read_text()
    path.write_text(text.replace('"review_status": "unreviewed"', '"review_status": "reviewed"  '))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    with DatasetWriter(root, _registry_ab()) as writer:
        assert writer.stored("a").edited


def test_a_file_name_that_is_not_utf8_is_labelled(tmp_path, tiny_dir, tiny_checkpoint):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(natural_image(48, 64)[::-1]).save(os.fsdecode(bytes(folder) + b"/bad\xff\xfename.png"))
    save_images(folder, 2, 48, 64)
    done = run(cli_command(tiny_dir, tiny_checkpoint, "segment", str(folder), "--classes", "a; b",
                           "--out", str(tmp_path / "ds")))
    assert done.returncode == 0, done.stderr
    assert len(dataset_masks(tmp_path / "ds")) == 3
    assert_consistent(tmp_path / "ds")


def test_a_source_that_changes_before_it_is_copied_fails_its_item(tmp_path, tiny_checkpoint, monkeypatch):
    """The stored copy must be the bytes the labels were made from: a file rewritten between its
    reading and its copy fails in one line, and no sample is left for it."""
    from napari_sclip import Segmenter
    from napari_sclip.dataset import batch

    paths = save_images(tmp_path / "in", 3, 48, 64)
    original = batch._Pipeline._write

    def rewrite_first(self, model, prepared, canvas):
        if prepared.tag.job.path == paths[0]:
            Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(paths[0])
        return original(self, model, prepared, canvas)

    monkeypatch.setattr(batch._Pipeline, "_write", rewrite_first)
    items = {item.path: item for item in label_images(paths, parse_vocabulary(["a", "b"]), tmp_path / "ds",
                                                      Segmenter(TINY_MODEL, str(tiny_checkpoint), "cpu"))}
    assert items[paths[0]].status == "failed"
    assert items[paths[0]].reason == f"{paths[0]}: the file changed while it was being labelled; run again"
    assert sorted(dataset_masks(tmp_path / "ds")) == ["im1", "im2"]
    assert_consistent(tmp_path / "ds")


def test_a_server_that_is_not_a_dask_scheduler_is_one_line(tmp_path, tiny_dir, tiny_checkpoint):
    """A port that accepts and never answers, and one that answers with something else: one line
    each, within the connection timeout (neither hangs nor crashes)."""
    import socket

    from napari_sclip.dataset.cluster import ClusterError, open_client

    pytest.importorskip("distributed")
    silent, talker = socket.socket(), socket.socket()
    for server in (silent, talker):
        server.bind(("127.0.0.1", 0))
        server.listen()
    stop = threading.Event()

    def answer_garbage():
        talker.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = talker.accept()
            except OSError:
                continue
            connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n" * 4)
            connection.close()

    thread = threading.Thread(target=answer_garbage, daemon=True)
    thread.start()
    try:
        start = time.monotonic()
        with pytest.raises(ClusterError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:"):
            with open_client(scheduler=f"tcp://127.0.0.1:{silent.getsockname()[1]}", connect_timeout=2):
                pass
        assert time.monotonic() - start < 15
        address = f"tcp://127.0.0.1:{talker.getsockname()[1]}"
        save_images(tmp_path / "in", 1)
        done = run(cli_command(tiny_dir, tiny_checkpoint, "segment", str(tmp_path / "in"), "--classes", "a",
                               "--out", str(tmp_path / "ds"), "--scheduler", address))
        assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
        assert f"cannot reach the Dask scheduler at {address}" in done.stderr
    finally:
        stop.set()
        thread.join()
        silent.close()
        talker.close()


@pytest.mark.cluster
def test_ctrl_c_with_workers_is_one_line_and_the_rerun_completes(tmp_path, tiny_dir, tiny_checkpoint):
    """SIGINT to the terminal's process group (what Ctrl+C sends): exit 130 and one line; the
    worker processes print nothing; the same command completes the dataset."""
    pytest.importorskip("distributed")
    images = save_images(tmp_path / "in", 16, 64, 80)
    out = tmp_path / "ds"
    command = _dask_command(tiny_dir, tiny_checkpoint, tmp_path / "in", out, "--workers", "2")
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None and len(list(out.glob("*/meta/*.json"))) < 2:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    if process.returncode != 0:  # it may have finished first
        assert process.returncode == 130, err
        assert err.strip().splitlines() == [
            "napari-sclip: interrupted; the dataset is valid: run the same command to go on"
        ], err
    done = run(command)
    assert done.returncode == 0 and not done.stderr, done.stderr
    assert_consistent(out)
    assert sorted(dataset_masks(out)) == sorted(path.stem for path in images)


@pytest.mark.cluster
def test_a_run_with_nothing_left_to_label_loads_no_model_on_the_cluster(tmp_path, tiny_checkpoint):
    pytest.importorskip("distributed")
    from napari_sclip import Segmenter
    from napari_sclip.dataset.cluster import PLUGIN_NAME, open_client

    paths = save_images(tmp_path / "in", 3, 48, 64)
    vocabulary = parse_vocabulary(["a", "b"])
    segmenter = Segmenter(TINY_MODEL, str(tiny_checkpoint), "cpu")
    with open_client(workers=1) as client:
        assert [item.status for item in label_images(paths, vocabulary, tmp_path / "ds", segmenter, client=client)] \
            == ["written"] * 3
        client.unregister_worker_plugin(PLUGIN_NAME)
        again = list(label_images(paths, vocabulary, tmp_path / "ds", segmenter, client=client))
        assert [item.status for item in again] == ["skipped"] * 3
        assert not any(client.run(lambda dask_worker: PLUGIN_NAME in dask_worker.plugins).values())
