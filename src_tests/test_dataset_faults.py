"""Files and faults: the umask, read-only, full and vanished folders (a tmpfs the test mounts),
symbolic links in a dataset, kills at random moments read back by Hugging Face `datasets`, and
the CLI's memory on a 12000 x 12000 image."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_sclip.classes import ClassRegistry
from napari_sclip.cli import main
from napari_sclip.dataset.export import LabelledImage, export_images
from napari_sclip.dataset.paths import DatasetError

from conftest import TINY_MODEL, natural_image, same_files_apart_from_timestamps
from dataset_helpers import assert_consistent, cli_command, dataset_masks, run, save_images

CLASSES = ["--classes", "grass; sky; tree"]


class SmallDisk:
    """A tmpfs of a few MB mounted by the test: it fills up, and turns read-only on demand."""

    def __init__(self, path: Path, size: str):
        self.path = path
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode:
            reason = f"cannot mount a tmpfs (run as root, as CI does): {done.stderr.strip()}"
            if os.environ.get("CI"):
                pytest.fail(reason)
            pytest.skip(reason)

    def read_only(self, read_only: bool = True) -> None:
        subprocess.run(["mount", "-o", f"remount,{'ro' if read_only else 'rw'}", str(self.path)], check=True)

    def fill(self, leave: int = 0) -> None:
        """Leave about ``leave`` bytes free."""
        stat = os.statvfs(self.path)
        size = max(0, stat.f_bavail * stat.f_frsize - leave)
        with open(self.path / "filler", "wb") as handle:
            try:
                for _ in range(size // (1 << 16)):
                    handle.write(bytes(1 << 16))
                handle.write(bytes(size % (1 << 16)))
                handle.flush()
            except OSError:
                pass

    def free(self) -> None:
        (self.path / "filler").unlink()

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def disk(tmp_path):
    made = SmallDisk(tmp_path / "disk", "4m")
    yield made
    made.unmount()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(err: str, *fragments: str) -> None:
    err = err.strip()
    assert "\n" not in err and err.startswith("napari-sclip: error: "), err
    assert "Traceback" not in err and "Errno" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.fixture
def segment(tiny_dir, tiny_checkpoint):
    """``segment IMAGES... --out OUT`` in a fresh process."""

    def segment(*argv, **kwargs):
        return run(cli_command(tiny_dir, tiny_checkpoint, "segment", *map(str, argv), *CLASSES), **kwargs)

    return segment


# -- the umask -------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_and_folders_honour_the_umask(tmp_path, tiny_dir, tiny_checkpoint, umask):
    save_images(tmp_path / "in", 2)
    out = tmp_path / "new" / "ds"
    commands = [
        ["segment", str(tmp_path / "in"), *CLASSES, "--out", str(out), "--model", TINY_MODEL, "--pretrained",
         str(tiny_checkpoint), "--device", "cpu", "--quiet"],
        ["export-coco", str(out), str(tmp_path / "coco" / "ds.json"), "--quiet"],
        ["export-voc", str(out), str(tmp_path / "voc"), "--quiet"],
    ]
    code = (
        f"import sys; from pathlib import Path; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        f"from conftest import register_tiny_model; register_tiny_model(Path({str(tiny_dir)!r})); "
        f"from napari_sclip.cli import main; sys.exit(max(main(argv) for argv in {commands!r}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          preexec_fn=lambda: os.umask(umask))
    assert done.returncode == 0, done.stderr
    made = [tmp_path / "new", *(tmp_path / "new").rglob("*"), tmp_path / "coco", *(tmp_path / "coco").rglob("*"),
            tmp_path / "voc", *(tmp_path / "voc").rglob("*")]
    assert len(made) > 30
    for path in made:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == expected, (path, oct(path.stat().st_mode & 0o777))


# -- read-only, full and vanished folders ----------------------------------------------------------


def test_a_read_only_folder_is_refused_in_one_line_and_left_as_it_was(disk, tmp_path, segment):
    images = save_images(tmp_path / "in", 4)
    for image in images[2:]:
        image.rename(tmp_path / image.name)  # two later images
    (disk.path / "empty").mkdir()
    assert segment(tmp_path / "in", "--out", disk.path / "ds").returncode == 0
    before = _snapshot(disk.path)
    disk.read_only()
    for out in ("ds", "new", "new/deeper", "empty"):
        done = segment(tmp_path / "in", *[tmp_path / image.name for image in images[2:]], "--out", disk.path / out)
        assert done.returncode == 1, done.stderr
        _one_line_error(done.stderr, str(disk.path / out.split("/")[0]), "read-only; choose a writable folder")
    disk.read_only(False)
    assert _snapshot(disk.path) == before and sorted(os.listdir(disk.path)) == ["ds", "empty"]
    assert not os.listdir(disk.path / "empty")

    # Still valid, and it resumes as if nothing had happened.
    assert_consistent(disk.path / "ds")
    everything = [tmp_path / "in", *[tmp_path / image.name for image in images[2:]]]
    assert segment(*everything, "--out", disk.path / "ds").returncode == 0
    assert segment(*everything, "--out", tmp_path / "whole").returncode == 0
    same_files_apart_from_timestamps(tmp_path / "whole", disk.path / "ds")


def test_a_full_disk_leaves_no_new_folder_and_no_skeleton(disk, tmp_path, segment):
    save_images(tmp_path / "in", 2)
    (disk.path / "empty").mkdir()
    disk.fill(leave=0)
    for out in ("ds", "new/deeper", "empty"):
        done = segment(tmp_path / "in", "--out", disk.path / out)
        assert done.returncode == 1, done.stderr
        _one_line_error(done.stderr, str(disk.path / out), "no space left on the device; free some space")
    assert sorted(os.listdir(disk.path)) == ["empty", "filler"] and not os.listdir(disk.path / "empty")


def test_a_disk_filling_up_mid_run_leaves_a_valid_dataset_that_resumes(disk, tmp_path, segment):
    save_images(tmp_path / "in", 8, height=120, width=160)
    out = disk.path / "ds"
    disk.fill(leave=300_000)
    done = segment(tmp_path / "in", "--out", out)
    assert done.returncode == 1, done.stderr
    _one_line_error(done.stderr, str(out), "no space left on the device; free some space")
    written = len(dataset_masks(out))
    assert 1 <= written < 8, "the disk filled up too early or too late to test anything"
    assert_consistent(out)

    disk.free()
    assert segment(tmp_path / "in", "--out", out).returncode == 0
    assert segment(tmp_path / "in", "--out", tmp_path / "whole").returncode == 0
    same_files_apart_from_timestamps(tmp_path / "whole", out)


def test_a_dataset_that_vanishes_mid_run_is_not_made_again(tmp_path, tiny_dir, tiny_checkpoint):
    save_images(tmp_path / "in", 12)
    out = tmp_path / "ds"
    process = subprocess.Popen(cli_command(tiny_dir, tiny_checkpoint, "segment", str(tmp_path / "in"), *CLASSES,
                                           "--out", str(out)), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(out.glob("*/meta/*.json")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    while out.exists() and process.poll() is None:
        shutil.rmtree(out, ignore_errors=True)  # the run may be adding files meanwhile
    assert process.wait(timeout=600) == 1, "the run ended before its folder vanished"
    _one_line_error(process.stderr.read(), str(out), "vanished")
    assert not out.exists()


def test_exports_to_a_full_or_read_only_disk_leave_nothing(disk, tmp_path, capsys):
    registry = ClassRegistry()
    registry.update((("grass",), ("sky",)))
    items = [LabelledImage(f"im{k}", natural_image(60, 80), np.full((60, 80), 1 + k % 2, np.uint8), registry, rgb=True)
             for k in range(3)]
    export_images(tmp_path / "ds", items)
    (disk.path / "empty").mkdir()
    for fault in ("full", "read-only"):
        if fault == "full":
            disk.fill(leave=0)
        else:
            disk.free()
            disk.read_only()
        for command, target in [("export-coco", "out.json"), ("export-coco", "new/out.json"),
                                ("export-voc", "voc"), ("export-voc", "empty")]:
            assert main([command, str(tmp_path / "ds"), str(disk.path / target), "--quiet"]) == 1
            _one_line_error(capsys.readouterr().err, str(disk.path), "free some space" if fault == "full" else "read-only")
        for target in ("ds", "empty"):
            with pytest.raises(DatasetError) as failed:
                export_images(disk.path / target, items)
            assert "\n" not in str(failed.value) and str(disk.path / target) in str(failed.value)
        assert sorted(os.listdir(disk.path)) == (["empty", "filler"] if fault == "full" else ["empty"])
        assert not os.listdir(disk.path / "empty")
    disk.read_only(False)


# -- symbolic links --------------------------------------------------------------------------------


def _link_out(root: Path, relative: str, outside: Path) -> Path:
    """Move ``root/relative`` to ``outside`` and put a link to it in its place."""
    target = outside / relative.replace("/", "_")
    shutil.move(root / relative, target)
    os.symlink(target, root / relative)
    return target


@pytest.mark.parametrize(
    "relative",
    ["train", "train/meta", "train/metadata.jsonl", "dataset.json", "train/meta/im0.json", "train/masks/im0.png",
     "train/images/im0.png"],
)
def test_nothing_is_read_written_or_deleted_through_a_symlink(tmp_path, model_args, capsys, relative):
    from napari_sclip._files import this_host

    registry = ClassRegistry()
    registry.update((("grass",), ("sky",)))
    items = [LabelledImage(f"im{k}", natural_image(30, 40), np.full((30, 40), 1, np.uint8), registry, rgb=True)
             for k in range(2)]
    root = tmp_path / "ds"
    export_images(root, items, ratios={"train": 1.0})
    outside = tmp_path / "outside"
    outside.mkdir()
    _link_out(root, relative, outside)
    # A file in the outside folder named like a killed writer's temporary (a pid that has ended).
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (outside / f".x.png.{this_host()}.{int(dead.stdout)}.00000000.tmp").write_bytes(b"someone's")
    before = {str(p): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns) for p in outside.rglob("*")}
    save_images(tmp_path / "in", 1, prefix="new")

    runs = [["segment", str(tmp_path / "in"), "--classes", "grass; sky", "--out", str(root), *model_args]]
    if relative != "train/metadata.jsonl":  # which exports never read
        runs += [["export-coco", str(root), str(tmp_path / "out.json"), "--quiet"],
                 ["export-voc", str(root), str(tmp_path / "voc"), "--quiet"]]
    for argv in runs:
        assert main(argv) == 1, argv
        _one_line_error(capsys.readouterr().err, "is a symbolic link")
    with pytest.raises(DatasetError, match="is a symbolic link"):
        export_images(root, items)
    after = {str(p): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns) for p in outside.rglob("*")}
    assert after == before
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "voc").exists()


@pytest.fixture
def model_args(tiny_checkpoint):
    return ["--model", TINY_MODEL, "--pretrained", str(tiny_checkpoint), "--device", "cpu", "--quiet"]


def test_a_split_folder_linked_elsewhere_is_refused_by_a_cli_run(tmp_path, segment):
    save_images(tmp_path / "in", 2)
    root = tmp_path / "ds"
    assert segment(tmp_path / "in", "--out", root, "--splits", "train=1").returncode == 0
    (tmp_path / "elsewhere").mkdir()
    target = _link_out(root, "train", tmp_path / "elsewhere")
    before = _snapshot(target)
    save_images(tmp_path / "more", 2, prefix="more")
    done = segment(tmp_path / "in", tmp_path / "more", "--out", root)
    assert done.returncode == 1
    _one_line_error(done.stderr, f"{root / 'train'} is a symbolic link")
    assert _snapshot(target) == before


# -- kills at random moments -----------------------------------------------------------------------


def test_no_kill_leaves_a_folder_that_hugging_face_misreads(tmp_path, tiny_dir, tiny_checkpoint):
    """SIGKILL at random moments (from the folder's first appearance on): the folder is absent,
    empty, or a dataset whose every split has its index, and `datasets` loads exactly the indexed
    samples with their masks as labels (never masks or confidence maps as images)."""
    datasets = pytest.importorskip("datasets")
    from napari_sclip.dataset.lock import LOCK_NAME

    save_images(tmp_path / "in", 6)
    rng = np.random.default_rng(7)

    def segment(out):
        return cli_command(tiny_dir, tiny_checkpoint, "segment", str(tmp_path / "in"), *CLASSES, "--splits",
                           "train=0.5,val=0.5", "--out", str(out))

    def load(root):
        """{split: rows} as `datasets` loads them, checked against the indexes."""
        splits = [split for split in root.iterdir() if split.is_dir() and not split.name.startswith(".")]
        for split in splits:
            assert (split / "metadata.jsonl").is_file(), split  # never a split without its index
        indexed = {split.name: len((split / "metadata.jsonl").read_text().splitlines()) for split in splits}
        if not indexed:
            return {}
        loaded = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=str(tmp_path / "hf"))
        names = {"train": "train", "validation": "val"}
        counts = {names[split]: rows.num_rows for split, rows in loaded.items()}
        assert counts == indexed
        for rows in loaded.values():
            assert {"image", "label", "id"} <= set(rows.column_names)
            for row in rows:
                assert row["label"].mode == "L" and row["label"].size == row["image"].size
        return counts

    for attempt, samples_before_kill in enumerate([0, 0, 1, 2, 4]):
        out = tmp_path / f"ds{attempt}"
        process = subprocess.Popen(segment(out), stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None and (
            not out.exists() or len(list(out.glob("*/meta/*.json"))) < samples_before_kill
        ):
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.5))
        process.kill()
        process.wait()
        if out.exists() and not (out / "dataset.json").exists():
            assert set(os.listdir(out)) <= {LOCK_NAME}, os.listdir(out)  # empty (but for a dead run's lock)
            continue
        assert (out / "dataset.json").is_file()
        load(out)
        done = run(segment(out))
        assert done.returncode == 0, done.stderr
        assert sum(load(out).values()) == 6
        assert_consistent(out)


# -- memory ----------------------------------------------------------------------------------------


def test_the_cli_labels_a_12000_pixel_square_image_in_under_3_gb(tmp_path, tiny_dir, tiny_checkpoint):
    """Peak resident memory of `napari-sclip segment` on a 12000 x 12000 RGB JPEG with 20 classes
    (the engine alone stays under 3 GB; the writer must not add to it)."""
    image = np.tile(natural_image(1000, 1200), (12, 10, 1))
    Image.fromarray(image).save(tmp_path / "big.jpg", quality=90)
    del image
    classes = "; ".join(f"class {k}" for k in range(20))
    command = cli_command(tiny_dir, tiny_checkpoint, "segment", str(tmp_path / "big.jpg"), "--classes", classes,
                          "--out", str(tmp_path / "ds"))
    # A fresh parent, so that the children's peak is this command's alone.
    measured = run([sys.executable, "-c", "import resource, subprocess, sys; "
                    f"code = subprocess.run({command!r}).returncode; "
                    "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"])
    code, peak_kb = map(int, measured.stdout.split())
    assert code == 0, measured.stderr[-2000:]
    assert peak_kb * 1024 < 3 * 2**30, f"peak RSS {peak_kb / 2**20:.2f} GiB"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # it is ours, and big on purpose
        mask = np.asarray(Image.open(next((tmp_path / "ds").glob("*/masks/big.png"))))
    assert mask.shape == (12000, 12000) and mask.dtype == np.uint8 and mask.max() < 20
    assert json.loads(next((tmp_path / "ds").glob("*/meta/big.json")).read_text())["source"]["shape"] == [12000, 12000, 3]
