"""What the dataset sharing and fault tests share: the CLI as a subprocess, and the invariants
every dataset folder must keep whatever happened to it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import TINY_MODEL, natural_image


def cli_command(tiny_dir: Path, checkpoint: Path | None, *argv: str, quiet: bool = True) -> list[str]:
    """``napari-sclip ARGV --model <tiny> ...`` as a fresh interpreter (which must register the
    tiny model with open_clip first); no ``--pretrained`` where ``checkpoint`` is ``None``."""
    weights = ["--pretrained", str(checkpoint)] if checkpoint is not None else []
    args = [*argv, "--model", TINY_MODEL, *weights, "--device", "cpu", *(["--quiet"] if quiet else [])]
    code = (
        f"import sys; from pathlib import Path; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        f"from conftest import register_tiny_model; register_tiny_model(Path({str(tiny_dir)!r})); "
        f"from napari_sclip.cli import main; sys.exit(main({args!r}))"
    )
    return [sys.executable, "-c", code]


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)


def save_images(folder: Path, count: int, height: int = 96, width: int = 128, prefix: str = "im") -> list[Path]:
    """``count`` different PNG images."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(count):
        path = folder / f"{prefix}{k}.png"
        Image.fromarray(np.roll(natural_image(height, width), 11 * k, axis=1)).save(path)
        paths.append(path)
    return paths


def dataset_masks(root: Path) -> dict[str, np.ndarray]:
    return {path.stem: np.asarray(Image.open(path)) for path in sorted(root.glob("*/masks/*.png"))}


def assert_consistent(root: Path) -> dict[str, int]:
    """Whatever happened, ``root`` is a dataset whose every sample is complete, whose masks hold
    only declared training ids (or ignore), whose class files list every class, and whose
    indexes list only complete samples; no temporary file is left.  Returns {class name: id}."""
    from napari_sclip.dataset.format import read_manifest
    from napari_sclip.dataset.reader import read_sample, sample_ids

    manifest, registry, train_ids = read_manifest(root)
    declared = set(train_ids.values()) | {manifest["label_encoding"]["ignore_index"]}
    ids = sample_ids(root)
    for split, image_id in ids:
        read_sample(root, split, image_id, train_ids)  # complete and readable
        mask = np.asarray(Image.open(root / split / "masks" / f"{image_id}.png"))
        assert set(np.unique(mask)) <= declared, (image_id, set(np.unique(mask)) - declared)
    for split in {split for split, _ in ids}:
        rows = [json.loads(line) for line in (root / split / "metadata.jsonl").read_text().splitlines()]
        assert {row["id"] for row in rows} <= {i for s, i in ids if s == split}
        for row in rows:
            assert (root / split / row["file_name"]).is_file() and (root / split / row["label_file_name"]).is_file()
    names = {registry.display_name(uid): train_id for uid, train_id in train_ids.items()}
    assert (root / "classes.txt").read_text().splitlines() == sorted(names, key=names.get)
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp") or p.name == ".napari-sclip.lock"]
    return names
