"""Shared dataset folders: one owner at a time across processes (real CLI runs at once, an
export from napari racing a CLI run), stale locks, others' temporary files, and same-stem images."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from napari_sclip.classes import ClassRegistry
from napari_sclip.dataset.export import LabelledImage, export_images
from napari_sclip.dataset.lock import LOCK_NAME, STALE_SECONDS, DatasetLock, Owner
from napari_sclip.dataset.paths import DatasetError
from napari_sclip.dataset.writer import DatasetWriter, Sample

from conftest import TINY_MODEL, natural_image
from dataset_helpers import assert_consistent, cli_command, dataset_masks, run, save_images

#: One line: who holds the dataset (command, pid, host, since when) and what to do.
BUSY = re.compile(r"napari-sclip: error: .+ is in use by '.+' \(pid (\d+) on \S+, since \S+\); wait for it to finish")


def _dead_pid() -> int:
    """The pid of a process that has ended (and been collected)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def _plant_lock(root, *, host: str, pid: int, age: float = 0.0) -> None:
    """A lock file as another process would have left it, last touched ``age`` seconds ago."""
    owner = Owner(host, pid, "2026-01-01T00:00:00+00:00", "napari-sclip segment old", "feedc0de", None)
    (root / LOCK_NAME).write_bytes(owner.to_bytes())
    then = time.time() - age
    os.utime(root / LOCK_NAME, (then, then))


def _registry(*names):
    registry = ClassRegistry()
    registry.update(tuple((name,) for name in names))
    return registry


def _item(name, seed=0, classes=("grass", "tree")):
    image = np.roll(natural_image(40, 50), 7 * seed, axis=1)
    labels = np.random.default_rng(seed).integers(0, len(classes) + 1, (40, 50)).astype(np.uint8)
    return LabelledImage(name, image, labels, _registry(*classes), rgb=True)


def test_two_cli_runs_at_once_never_lose_a_class(tmp_path, tiny_dir, tiny_checkpoint):
    """'tree' and 'sky' added at the same moment: one run holds the folder, the other is refused
    in one line naming it; run again, it merges. No class is lost, no mask id is undeclared."""
    images = save_images(tmp_path / "in", 6)
    out = tmp_path / "ds"
    commands = {
        cls: cli_command(tiny_dir, tiny_checkpoint, "segment", str(tmp_path / "in"), "--classes", f"grass; {cls}",
                         "--out", str(out))
        for cls in ("tree", "sky")
    }
    processes = {cls: subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for cls, command in commands.items()}
    results = {cls: (process.wait(timeout=600), process.stderr.read().strip()) for cls, process in processes.items()}

    assert sorted(code for code, _ in results.values()) in ([0, 0], [0, 1]), results
    for cls, (code, err) in results.items():
        if code == 1:
            assert "\n" not in err, err
            holder = next(other for other in processes if other != cls)
            assert int(BUSY.match(err).group(1)) == processes[holder].pid and err.endswith("then run again"), err
            assert run(commands[cls]).returncode == 0  # once the folder is free
    names = assert_consistent(out)
    assert set(names) == {"grass", "tree", "sky"} and names["grass"] == 0
    assert sorted(dataset_masks(out)) == sorted(path.stem for path in images)


def test_an_export_from_napari_racing_a_cli_run(tmp_path, tiny_dir, tiny_checkpoint):
    """While `segment` runs, an export into its folder is refused (one line naming the run) and
    deletes nothing of the run's; afterwards it merges its classes in."""
    save_images(tmp_path / "in", 8)
    out = tmp_path / "ds"
    command = cli_command(tiny_dir, tiny_checkpoint, "segment", str(tmp_path / "in"), "--classes", "grass; sky",
                          "--out", str(out))
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(out.glob("*/meta/*.json")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before the export could race it"
    with pytest.raises(DatasetError) as refused:
        export_images(out, [_item("painted", classes=("grass", "sky", "tree"))])
    assert process.poll() is None, "the run ended before the export was refused"
    message = str(refused.value)
    assert "\n" not in message and f"(pid {process.pid} on " in message and "wait for it to finish" in message
    assert process.wait(timeout=600) == 0, process.stderr.read()

    assert len(dataset_masks(out)) == 8  # the refused export removed nothing of the run's
    export_images(out, [_item("painted", classes=("grass", "sky", "tree"))])  # a new class 'tree'

    names = assert_consistent(out)
    assert names == {"grass": 0, "sky": 1, "tree": 2}
    assert len(dataset_masks(out)) == 9


def test_stale_locks_are_taken_over_and_live_ones_respected(tmp_path, tiny_dir, tiny_checkpoint):
    save_images(tmp_path / "in", 1)
    out = tmp_path / "ds"
    export_images(out, [_item("first")])
    from napari_sclip._files import this_host

    # A killed run on this host: taken over at once, by the CLI.
    _plant_lock(out, host=this_host(), pid=_dead_pid())
    done = run(cli_command(tiny_dir, tiny_checkpoint, "segment", str(tmp_path / "in"), "--classes", "grass; tree",
                           "--out", str(out)))
    assert done.returncode == 0, done.stderr
    assert not (out / LOCK_NAME).exists()

    # A run on another machine that still beats: refused, naming that machine.
    _plant_lock(out, host="node-7", pid=4242, age=STALE_SECONDS / 4)
    with pytest.raises(DatasetError, match=r"in use by 'napari-sclip segment old' \(pid 4242 on node-7, since "
                                           r"2026-01-01T00:00:00\+00:00\); wait for it to finish.*120 s after its last"):
        export_images(out, [_item("second")])
    assert (out / LOCK_NAME).read_bytes().startswith(b'{"host": "node-7"')

    # Its heartbeat stopped long ago: taken over.
    _plant_lock(out, host="node-7", pid=4242, age=STALE_SECONDS * 2)
    export_images(out, [_item("second")])
    assert sorted(dataset_masks(out)) == ["first", "im0", "second"]
    assert_consistent(out)

    # A lock that is not a record (half-written by a file system without hard links, or junk):
    # judged by its age alone.
    (out / LOCK_NAME).write_bytes(b"\x00garbage")
    with pytest.raises(DatasetError, match=r"in use by another process \(its lock .*\.napari-sclip\.lock is unreadable"):
        export_images(out, [_item("third")])
    old = time.time() - 2 * STALE_SECONDS
    os.utime(out / LOCK_NAME, (old, old))
    export_images(out, [_item("third")])

    # A lock that is a link to a file elsewhere: refused, and the file is neither read nor touched.
    elsewhere = tmp_path / "precious.txt"
    elsewhere.write_text("mine")
    os.utime(elsewhere, (old, old))
    os.symlink(elsewhere, out / LOCK_NAME)
    with pytest.raises(DatasetError, match=r"\.napari-sclip\.lock is a symbolic link; remove it"):
        export_images(out, [_item("fourth")])
    assert elsewhere.read_text() == "mine" and elsewhere.stat().st_mtime == old
    assert sorted(dataset_masks(out)) == ["first", "im0", "second", "third"]


def test_processes_recovering_a_stale_lock_at_once_end_with_one_owner(tmp_path):
    """Six processes find the same dead owner's lock at the same moment, several times over:
    each time exactly one becomes the owner, the others are told who it is."""
    root = tmp_path / "ds"
    root.mkdir()
    code = (
        "import sys, time; from pathlib import Path\n"
        "from napari_sclip.dataset.lock import DatasetLock\n"
        "from napari_sclip.dataset.paths import DatasetError\n"
        "start = float(sys.argv[1])\n"
        "while time.time() < start: pass\n"  # all try at the same instant
        "try:\n"
        "    lock = DatasetLock(Path(sys.argv[2]))\n"
        "except DatasetError as exc:\n"
        "    print('refused', exc)\n"
        "else:\n"
        "    print('owner', lock.owner.token, flush=True); time.sleep(4); lock.check(); lock.release()\n"
    )
    from napari_sclip._files import this_host

    for round_, stale in enumerate([dict(host=this_host(), pid=_dead_pid()), dict(host="gone-host", pid=1, age=1e4)] * 2):
        _plant_lock(root, **stale)
        start = time.time() + 3
        racers = [subprocess.Popen([sys.executable, "-c", code, str(start), str(root)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for _ in range(6)]
        outputs = [racer.communicate(timeout=120) for racer in racers]
        assert all(racer.returncode == 0 for racer in racers), outputs
        owners = [out for out, _ in outputs if out.startswith("owner")]
        assert len(owners) == 1, (round_, outputs)
        token = owners[0].split()[1]
        for out, _ in outputs:
            if not out.startswith("owner"):
                assert out.startswith("refused") and "is in use by" in out, out
        assert not (root / LOCK_NAME).exists(), "the owner released it"
        assert token and not list(root.glob(".*.tmp"))


def test_an_owner_that_lost_its_lock_stops_writing(tmp_path):
    registry = _registry("grass", "tree")
    sample = Sample("a", np.ones((8, 8), np.uint8), image=natural_image(8, 8))
    writer = DatasetWriter(tmp_path / "ds", registry)
    (tmp_path / "ds" / LOCK_NAME).unlink()  # someone deleted it
    with pytest.raises(DatasetError, match="vanished .* or its lock file .napari-sclip.lock was removed"):
        writer.write(sample)
    _plant_lock(tmp_path / "ds", host="node-7", pid=4242)  # ... and another machine took the folder
    with pytest.raises(DatasetError, match=r"was taken over by 'napari-sclip segment old' \(pid 4242 on node-7"):
        writer.write(sample)
    writer.close()
    assert (tmp_path / "ds" / LOCK_NAME).exists()  # not ours: left alone
    assert not list((tmp_path / "ds").glob("*/meta/*.json"))


def test_a_lock_is_refreshed_while_held(tmp_path, monkeypatch):
    from napari_sclip.dataset import lock as lock_module

    monkeypatch.setattr(lock_module, "HEARTBEAT_SECONDS", 0.05)
    lock = DatasetLock(tmp_path)
    try:
        path = tmp_path / LOCK_NAME
        old = time.time() - 1000
        os.utime(path, (old, old))
        deadline = time.monotonic() + 30
        while path.stat().st_mtime < old + 500 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert path.stat().st_mtime > old + 500  # the heartbeat touched it
        record = json.loads(path.read_text())
        assert record["pid"] == os.getpid() and record["host"] and record["since"] and record["command"]
        assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    finally:
        lock.release()
    assert not path.exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_only_gone_writers_temporaries_are_removed(tmp_path):
    """Opening a dataset removes what dead writers left, never what live ones are writing, here
    or on another machine."""
    from napari_sclip._files import this_host

    registry = _registry("grass", "tree")
    with DatasetWriter(tmp_path / "ds", registry) as writer:
        writer.write(Sample("a", np.ones((8, 8), np.uint8), image=natural_image(8, 8)))
    masks = next((tmp_path / "ds").glob("*/masks"))
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        old = time.time() - 2 * STALE_SECONDS
        leftovers = {
            f".a.png.{this_host()}.{_dead_pid()}.00000001.tmp": False,  # killed writer here
            f".b.png.{this_host()}.{live.pid}.00000002.tmp": True,  # running writer here
            ".c.png.node-7.99.00000003.tmp": True,  # another machine, recent
            ".d.png.node-7.99.00000004.tmp": False,  # another machine, silent for long
        }
        for name in leftovers:
            (masks / name).write_bytes(b"half a png")
        os.utime(masks / ".d.png.node-7.99.00000004.tmp", (old, old))
        staging = tmp_path / "ds" / f".test.{this_host()}.{_dead_pid()}.0000000a.tmp"  # a split being made
        (staging / "images").mkdir(parents=True)
        DatasetWriter(tmp_path / "ds", registry).close()
        assert {name: (masks / name).exists() for name in leftovers} == leftovers
        assert not staging.exists()
    finally:
        live.kill()
        live.wait()


def test_same_stem_images_never_swap_files_through_the_cli(tmp_path, tiny_dir, tiny_checkpoint):
    """Two a.png from different folders (and an image already named as the second one's id
    would be), and a stack whose slice x-001 meets an image x-001.png: every sample keeps its own
    image and mask, also when labelled again in the other order."""
    import tifffile

    from napari_sclip import Segmenter

    first, second, third = tmp_path / "one", tmp_path / "two", tmp_path / "three"
    for folder in (first, second, third):
        folder.mkdir()
    Image.fromarray(natural_image(48, 64)).save(first / "a.png")
    Image.fromarray(np.roll(natural_image(48, 64), 20, axis=0)).save(second / "a.png")
    stack = np.stack([np.roll(natural_image(40, 56)[..., 0], 9 * k, axis=1) for k in range(3)])
    tifffile.imwrite(first / "x.tif", stack, photometric="minisblack")
    Image.fromarray(natural_image(40, 56)[..., 1]).save(second / "x-001.png")

    def sha(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    taken = third / f"a-{sha(second / 'a.png')[:8]}.png"
    Image.fromarray(np.roll(natural_image(48, 64), 30, axis=1)).save(taken)
    out = tmp_path / "ds"
    args = ["--classes", "grass; sky", "--out", str(out)]
    done = run(cli_command(tiny_dir, tiny_checkpoint, "segment", str(first), str(third), str(second), *args))
    assert done.returncode == 0, done.stderr

    sources = {  # what each sample must hold: (image as stored, the engine's labels for it)
        "a": np.asarray(Image.open(first / "a.png")),
        taken.stem: np.asarray(Image.open(taken)),
        f"a-{sha(second / 'a.png')[:16]}": np.asarray(Image.open(second / "a.png")),
        "x-000": stack[0], "x-001": stack[1], "x-002": stack[2],
        f"x-001-{sha(second / 'x-001.png')[:8]}": np.asarray(Image.open(second / "x-001.png")),
    }
    engine = Segmenter(TINY_MODEL, str(tiny_checkpoint), "cpu")

    def check():
        masks = dataset_masks(out)
        assert sorted(masks) == sorted(sources)
        for image_id, image in sources.items():
            stored = np.asarray(Image.open(next(out.glob(f"*/images/{image_id}.png"))))
            np.testing.assert_array_equal(stored, image, err_msg=image_id)
            np.testing.assert_array_equal(masks[image_id], engine.segment(image, ["grass", "sky"]).labels - 1,
                                          err_msg=image_id)
        assert_consistent(out)

    check()
    again = run(cli_command(tiny_dir, tiny_checkpoint, "segment", str(second), str(third), str(first), *args,
                            "--overwrite"))
    assert again.returncode == 0, again.stderr
    check()


def test_same_named_layers_never_overwrite_each_other_in_an_export(tmp_path):
    """Images from no file with the same name (two 'a' layers; a stack 'x' whose slice x-001
    meets a layer 'x-001') are different samples; exporting again, in any order, updates each
    in place."""
    registry = _registry("grass", "tree")
    rng = np.random.default_rng(3)

    def layer(name, image, rgb):
        labels = rng.integers(0, 3, image.shape[:-1] if rgb else image.shape).astype(np.uint8)
        return LabelledImage(name, image, labels, registry, rgb=rgb)

    items = [
        layer("a", natural_image(30, 40), True),
        layer("a", np.roll(natural_image(30, 40), 5, axis=1), True),
        layer("x", np.stack([np.full((30, 40), 50 * k, np.uint8) for k in range(3)]), False),
        layer("x-001", natural_image(30, 40)[..., 2], False),
    ]
    ids = export_images(tmp_path / "ds", items)
    assert len(set(ids)) == 6 and ids[0] == "a" and ids[2:5] == ["x-000", "x-001", "x-002"]
    expected = {
        image_id: (image, labels)
        for image_id, (image, labels) in zip(ids, [(items[0].image, items[0].labels), (items[1].image, items[1].labels),
                                                   *zip(items[2].image, items[2].labels),
                                                   (items[3].image, items[3].labels)])
    }

    def check():
        masks = dataset_masks(tmp_path / "ds")
        assert sorted(masks) == sorted(expected)
        for image_id, (image, labels) in expected.items():
            stored = np.asarray(Image.open(next((tmp_path / "ds").glob(f"*/images/{image_id}.png"))))
            np.testing.assert_array_equal(stored, image, err_msg=image_id)
            np.testing.assert_array_equal(masks[image_id], np.where(labels == 0, 255, labels - 1), err_msg=image_id)

    check()
    assert export_images(tmp_path / "ds", items[::-1]) == [ids[5], *ids[2:5], ids[1], ids[0]]
    check()
    assert_consistent(tmp_path / "ds")
