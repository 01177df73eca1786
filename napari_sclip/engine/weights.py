"""Finding and reading CLIP weights without ever running code from a checkpoint.

``pretrained`` is either an open_clip tag (``"openai"``, ``"laion2b_s34b_b88k"``, ...), downloaded
once into ``<cache_dir>/models``, or a path to a local checkpoint:

* OpenAI's released ``ViT-B-16.pt``, a TorchScript archive.  Its tensors are taken out of the zip
  by :mod:`napari_sclip.engine.torchscript`, which rebuilds only tensors and plain containers and
  never compiles or runs the archive's TorchScript (``torch.jit.load`` would).
* A state dict in OpenAI's or open_clip's layout, saved with ``torch.save`` (read with
  ``torch.load(weights_only=True)``, which refuses pickled Python objects) or as ``.safetensors``.
  Training checkpoints that wrap it in ``{"state_dict": ...}`` or prefix keys with ``module.``
  work too.

Every error is one complete sentence: a cause is summarised (:func:`describe_cause`), never cut.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import shlex
import threading
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

from napari_sclip.engine import config
from napari_sclip.engine._torch import open_clip, torch
from napari_sclip.engine.errors import ModelError
from napari_sclip.engine.progress import Progress, ProgressCallback
from napari_sclip.engine.sources import looks_like_path
from napari_sclip.engine.torchscript import ArchiveError, is_torchscript, read_torchscript

#: Integer entries of OpenAI's state dicts that are not parameters; their presence marks the layout.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
#: Buffers rebuilt by the model itself, present in some TorchScript archives.
_DERIVED_KEYS = ("attn_mask",)
# open_clip's files on the Hugging Face hub; the safetensors copy is preferred when a repo has one.
_HUB_DEFAULT_FILE = "open_clip_pytorch_model.bin"
_HUB_SAFETENSORS_FILE = "open_clip_model.safetensors"


@dataclass(frozen=True)
class WeightsFile:
    """A checkpoint on disk and what we know about it before reading it.

    Attributes
    ----------
    path
        The local file.
    tag
        The open_clip tag it was downloaded for, or ``None`` for a user's file.
    quick_gelu
        Whether the weights were trained with QuickGELU, when the tag says so.
    """

    path: Path
    tag: str | None = None
    quick_gelu: bool = False

    @property
    def identity(self) -> str:
        """A string that changes when the weights change: the tag, or the file's path, size and
        modification time."""
        if self.tag is not None:
            return f"tag:{self.tag}"
        stat = self.path.stat()
        return f"file:{self.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def _hub_file(hub: str) -> tuple[str, str]:
    """``(repo id, file)`` of open_clip's ``hf_hub``: "org/repo/" names the repo's default file,
    "org/repo/file.bin" a given one."""
    repo_id, filename = os.path.split(hub)
    return repo_id, filename or _HUB_DEFAULT_FILE


def _offline_hint(model: str, tag: str, cfg: dict) -> str:
    """Where else to get a tag's file: its URL, or the ``hf download`` of its hub file."""
    if cfg.get("url"):
        where = f" (download it elsewhere from {cfg['url']})"
    elif cfg.get("hf_hub"):
        repo_id, filename = _hub_file(cfg["hf_hub"])
        where = f" (download it elsewhere: hf download {repo_id} {filename} --local-dir FOLDER, then FOLDER/{filename})"
    else:
        where = ""
    return (
        f"could not download the '{tag}' weights for {model}; to work offline, use a local "
        f"checkpoint{where}: the widget's weights field under Advanced, --pretrained PATH in the "
        f"CLI, pretrained='/path/to/{model}.pt' in Python, or NAPARI_SCLIP_PRETRAINED"
    )


_QUIET_LOCK = threading.Lock()
_quiet = {"depth": 0, "level": logging.NOTSET}


@contextlib.contextmanager
def _quiet_hub_logs():
    """huggingface_hub logs every retry of a failed request; our error says it all in one line.
    Downloads in several threads share one quiet period: the first in saves the level, the last
    out restores it."""
    hub_logger = logging.getLogger("huggingface_hub")
    with _QUIET_LOCK:
        if _quiet["depth"] == 0:
            _quiet["level"] = hub_logger.level
            hub_logger.setLevel(logging.ERROR)
        _quiet["depth"] += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _quiet["depth"] -= 1
            if _quiet["depth"] == 0:
                hub_logger.setLevel(_quiet["level"])


def _hub_files(repo_id: str, names: list[str], cache: Path, progress: ProgressCallback | None) -> Path:
    """Download the first of ``names`` that the repo has.  Only a file missing from the repo moves
    on to the next name; a network failure ends the search at once."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    tqdm_class = _progress_tqdm(progress) if progress else None
    for i, name in enumerate(names):
        try:
            with _quiet_hub_logs():
                return Path(hf_hub_download(repo_id, name, cache_dir=str(cache), tqdm_class=tqdm_class))
        except EntryNotFoundError as exc:
            if isinstance(exc, LocalEntryNotFoundError) or i == len(names) - 1:
                raise
    raise AssertionError("unreachable")


def hub_download(repo_id: str, names: list[str], label: str, progress: ProgressCallback | None = None,
                 offline: str | None = None) -> Path:
    """The first of ``names`` that Hugging Face repo ``repo_id`` has, downloaded once into
    ``<cache_dir>/models``; every failure is one line that says what to do (``label`` names
    what was asked for; ``offline``, how to do without the download)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    cache = config.models_dir()
    if progress:
        progress(Progress("download", 0, 0))  # size unknown until the server answers
    offline = offline or (f"could not download {label}; to work offline, download the repo elsewhere "
                          f"(hf download {repo_id} --local-dir FOLDER) and use local-dir:FOLDER")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        return _hub_files(repo_id, names, cache, progress)
    except GatedRepoError:
        raise ModelError(
            f"{label} is gated on Hugging Face: accept its terms at https://huggingface.co/{repo_id} "
            f"while logged in, then log in here (hf auth login, or set HF_TOKEN); or download it "
            f"elsewhere (hf download {repo_id} --local-dir FOLDER) and use local-dir:FOLDER"
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(f"{label}: Hugging Face has no public repo {repo_id} (check the name, or log in "
                         "if it is private)") from None
    except EntryNotFoundError as exc:
        if isinstance(exc, LocalEntryNotFoundError):  # offline, or not in the local cache
            raise ModelError(f"{offline} ({describe_cause(exc)})") from None
        raise ModelError(f"{label}: repo {repo_id} has none of {', '.join(names[:3])}"
                         f"{', ...' if len(names) > 3 else ''}") from None
    except Exception as exc:  # network, proxy, hub and disk errors all mean "not available"
        raise ModelError(f"{offline} ({describe_cause(exc)})") from None


def _download_tag(model: str, tag: str, cfg: dict, progress: ProgressCallback | None) -> Path:
    hub = cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = _hub_file(hub)
        names = [_HUB_SAFETENSORS_FILE, filename] if filename == _HUB_DEFAULT_FILE else [filename]
        return hub_download(repo_id, names, f"the '{tag}' weights for {model}", progress,
                            offline=_offline_hint(model, tag, cfg))
    if cfg.get("url"):
        from open_clip.pretrained import download_pretrained_from_url

        if progress:
            progress(Progress("download", 0, 0))
        try:
            cache = config.models_dir()
            cache.mkdir(parents=True, exist_ok=True)
            return Path(download_pretrained_from_url(cfg["url"], cache_dir=str(cache)))
        except Exception as exc:
            raise ModelError(f"{_offline_hint(model, tag, cfg)} ({describe_cause(exc)})") from None
    raise ModelError(f"the '{tag}' weights for {model} have no download location in open_clip")


def _progress_tqdm(progress: ProgressCallback):
    """A tqdm class that forwards byte counts to ``progress`` (huggingface_hub's hook)."""
    from tqdm.auto import tqdm

    class _Forwarding(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self._done = 0
            self._total = int(kwargs.get("total") or 0)

        def update(self, n=1):
            self._done += int(n or 0)
            progress(Progress("download", self._done, max(self._total, self._done)))
            return super().update(n)

    return _Forwarding


def resolve_weights(
    model: str, pretrained: str, progress: ProgressCallback | None = None, activation_hint: str = ""
) -> WeightsFile:
    """Turn a tag or a path into a local :class:`WeightsFile`, downloading a tag if needed
    (``activation_hint`` ends the offline advice for a hub file, e.g. " --quick-gelu")."""
    if pretrained.startswith("hf-hub:"):
        from napari_sclip.engine.sources import split_hub

        repo_id, filename = split_hub(pretrained[len("hf-hub:"):])
        if not filename:
            raise ModelError(f"{pretrained} is a whole repo; give it as the model (--model {pretrained})")
        offline = (f"could not download {pretrained}; to work offline, download the file elsewhere (hf download "
                   f"{repo_id} {shlex.quote(filename)} --local-dir FOLDER) and give it as the weights: --model "
                   f"{model} --pretrained {shlex.quote('FOLDER/' + filename)}{activation_hint}")
        return WeightsFile(hub_download(repo_id, [filename], pretrained, progress, offline=offline))
    try:
        candidate = Path(pretrained).expanduser().absolute()
        if candidate.is_file():
            return WeightsFile(candidate)
        exists = candidate.exists()
    except (OSError, ValueError, RuntimeError) as exc:  # a name too long, a NUL byte
        shown = pretrained[:80] + ("..." if len(pretrained) > 80 else "")
        raise ModelError(f"cannot use weights path {shown!r} ({type(exc).__name__})") from None
    if exists:
        raise ModelError(f"weights path {candidate} is not a file")
    if looks_like_path(pretrained):
        raise ModelError(f"weights file not found: {candidate}")
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model)
        known = f"known tags for {model}: {', '.join(tags)}" if tags else f"{model} has no tags"
        raise ModelError(
            f"unknown pretrained weights {pretrained!r} for {model} ({known}); "
            "or give the path of a checkpoint file"
        )
    path = _download_tag(model, pretrained, cfg, progress)
    return WeightsFile(path, tag=pretrained, quick_gelu=bool(cfg.get("quick_gelu", False)))


def describe_cause(exc: BaseException) -> str:
    """``Type: first sentence`` of an exception for a one-line message, or only ``Type`` when that
    sentence is long: complete either way, never cut mid-way."""
    text = " ".join(str(exc).split())
    sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0].rstrip(".!?: ")
    return f"{type(exc).__name__}: {sentence}" if 0 < len(sentence) <= 120 else type(exc).__name__


def _unreadable(path: Path, exc: Exception) -> ModelError:
    """The one-line error for a checkpoint that cannot be read, by what went wrong."""
    if isinstance(exc, ArchiveError):
        return ModelError(
            f"cannot read weights file {path}: {exc}; pass OpenAI's original file or a state dict "
            "saved with torch.save or as .safetensors"
        )
    # torch.load(weights_only=True) met a pickled object, which its message names after GLOBAL.
    named = re.search(r"\bGLOBAL ([\w.]{1,120}) ", str(exc)) if isinstance(exc, pickle.UnpicklingError) else None
    if named:
        return ModelError(
            f"cannot read weights file {path}: it contains pickled Python objects ({named.group(1)}), "
            "which are never loaded; save the weights as a state dict (torch.save(model.state_dict(), "
            "path)) or as .safetensors"
        )
    if isinstance(exc, _InflatedArchive):
        return ModelError(f"cannot read weights file {path}: {exc}; save the weights again with torch.save "
                          "or as .safetensors")
    if isinstance(exc, PermissionError):
        return ModelError(f"cannot read weights file {path}: permission denied; make it readable or pass a copy")
    return ModelError(
        f"cannot read weights file {path}: it is not a valid PyTorch, TorchScript or safetensors "
        f"checkpoint ({describe_cause(exc)}); download it again or pass another file"
    )


class _InflatedArchive(ValueError):
    pass


def _check_zip_records(path: Path) -> None:
    """``torch.save`` stores its records uncompressed; a compressed one could unpack to any size
    (2 MB to 2 GB), so a zip checkpoint whose records are compressed or declare more bytes than
    the file holds is refused before ``torch.load`` reads it."""
    if not zipfile.is_zipfile(path):
        return
    with zipfile.ZipFile(path) as archive:
        records = archive.infolist()
    if any(record.compress_type != zipfile.ZIP_STORED for record in records):
        raise _InflatedArchive("it holds compressed records, which torch.save never writes")
    if sum(record.file_size for record in records) > path.stat().st_size:
        raise _InflatedArchive("its records declare more bytes than the file holds")


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Read a checkpoint's tensors.

    Returns the state dict (``module.`` prefixes removed, OpenAI's integer entries dropped) and
    whether it is in OpenAI's layout (a TorchScript archive or a dict with OpenAI's extra keys).
    """
    torchscript = False
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path), device="cpu")
        elif is_torchscript(path):
            torchscript = True
            raw = read_torchscript(path)
        else:
            _check_zip_records(path)
            with warnings.catch_warnings():  # e.g. torch's notes on sparse tensors, refused below
                warnings.simplefilter("ignore")
                raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"weights file not found: {path}") from None
    except Exception as exc:
        raise _unreadable(path, exc) from None

    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not raw:
        raise ModelError(f"weights file {path} holds no state dict; pass a checkpoint of a CLIP model")
    if not all(isinstance(k, str) for k in raw):  # a state dict names its tensors
        raise ModelError(f"weights file {path} holds entries whose names are not text; pass a state dict of a CLIP model")
    openai_layout = torchscript or any(k in raw for k in _OPENAI_EXTRA_KEYS)
    state = {
        key.removeprefix("module."): value
        for key, value in raw.items()
        if key not in _OPENAI_EXTRA_KEYS + _DERIVED_KEYS
    }
    if len(state) < len([k for k in raw if k not in _OPENAI_EXTRA_KEYS + _DERIVED_KEYS]):
        raise ModelError(f"weights file {path} holds some tensors twice, with and without 'module.'; "
                         "pass a state dict of one model")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"weights file {path} holds entries that are not tensors; pass a state dict of a CLIP model")
    if not all(v.layout == torch.strided and v.device.type == "cpu" and v.is_floating_point() for v in state.values()):
        raise ModelError(f"weights file {path} holds tensors that are not dense floating-point numbers "
                         "(integer, complex, sparse or without data); pass a state dict of a CLIP model")
    broken = next((key for key, value in state.items() if not bool(torch.isfinite(value).all())), None)
    if broken is not None:  # every label would be the same, with no error anywhere
        raise ModelError(f"weights file {path} holds values that are not finite numbers (NaN or infinite) in "
                         f"{broken}; download it again or pass another file")
    return state, openai_layout
