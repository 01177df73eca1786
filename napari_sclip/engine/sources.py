"""Where a model comes from: an architecture (open_clip's model config) and the weights for it.

A model is named by ``model`` and ``pretrained``, as in open_clip:

==============================  =================================================================
``model``, ``pretrained``       what is loaded
==============================  =================================================================
``ViT-B-16``, ``openai``        an open_clip config and one of its tags (downloaded once)
``ViT-B-16``, ``/path/w.pt``    an open_clip config and a checkpoint file
``ViT-B-32``, ``hf-hub:o/r/f``  an open_clip config and the file ``f`` of Hugging Face repo ``o/r``
``hf-hub:org/repo``             the repo's ``open_clip_config.json`` and weights (downloaded once)
``local-dir:/path``             a folder holding ``open_clip_config.json`` and weights
``bioclip`` (a preset)          a preset's model and weights (:mod:`~napari_sclip.engine.presets`)
==============================  =================================================================

``hf-hub:`` and ``local-dir:`` may be given as ``pretrained`` too (and a folder path means
``local-dir:``); the folder's or repo's config then names the architecture.  Before any weights
are downloaded the config is checked (:func:`check_config`): a model the engine cannot run gets
one line saying why.
"""

from __future__ import annotations

import json
import os
import re
import stat
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from napari_sclip.engine import config
from napari_sclip.engine.errors import ModelError
from napari_sclip.engine.progress import ProgressCallback

HF_HUB = "hf-hub:"
LOCAL_DIR = "local-dir:"
#: Weights named with one of these endings are a file, never an open_clip tag.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
CONFIG_FILE = "open_clip_config.json"
#: The weights file a folder or repo is read from: the first of these that it has.
WEIGHTS_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
)
#: A config file is a few kB, nested four levels deep; nothing larger or deeper is one.
_CONFIG_LIMIT = 1 << 20
_CONFIG_DEPTH = 16
#: Hugging Face's repo names: letters, digits, ".", "_" and "-".
_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
#: CLIP's normalisation in 0-255 units, as in the SCLIP authors' configs (OpenAI's mean and std).
OPENAI_MEAN = (122.771, 116.746, 104.094)
OPENAI_STD = (68.501, 66.632, 70.323)


@dataclass(frozen=True)
class ModelSource:
    """A model to build: its open_clip config, its weights and how to read its inputs.

    Attributes
    ----------
    name
        What results record as the model: an open_clip name, ``hf-hub:org/repo`` or
        ``local-dir:/absolute/path``.
    pretrained
        What results record as the weights: a tag, a path, or the schema of ``name``.
    model_config
        open_clip's ``model_cfg`` (``embed_dim``, ``vision_cfg``, ``text_cfg``, ``quick_gelu``).
    weights
        The weights: an open_clip tag to download, or a local file (see :func:`resolve_weights`).
    tokenizer
        The name :func:`open_clip.get_tokenizer` takes for this model (never one that downloads).
    mean, std
        Pixel normalisation in 0-255 units.
    quick_gelu
        The activation where the source decides it (a preset does), else ``None``.
    activation_declared
        Whether the config itself is the final word on QuickGELU (a repo's or folder's config is,
        as it is for open_clip); otherwise :mod:`~napari_sclip.engine.model` decides.
    """

    name: str
    pretrained: str
    model_config: dict
    tokenizer: str
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    quick_gelu: bool | None = None
    activation_declared: bool = False


def normalise_choice(model: str | None, pretrained: str | None) -> tuple[str, str | None]:
    """``model`` and ``pretrained`` with the defaults filled in as :func:`resolve_source` fills
    them: ``pretrained`` stays ``None`` where the model brings its own weights (a preset, a
    repo, a folder)."""
    from napari_sclip.engine.presets import find_preset

    model = _anchored(str(model or config.default_model()).strip(), weights=False)
    pretrained = str(pretrained or "").strip() or None
    if pretrained is None and find_preset(model) is None and not model.startswith((HF_HUB, LOCAL_DIR)):
        pretrained = config.default_pretrained()
    return model, None if pretrained is None else _anchored(pretrained, weights=True)


def looks_like_path(pretrained: str) -> bool:
    """Whether weights named ``pretrained`` are meant as a file rather than an open_clip tag."""
    return (
        os.sep in pretrained
        or "/" in pretrained
        or pretrained.lower().endswith(CHECKPOINT_SUFFIXES)
        or pretrained.startswith("~")
    )


def _anchored(choice: str, weights: bool) -> str:
    """A local path in a model choice made absolute (``~`` expanded, links kept): another
    process, such as a Dask worker started in another folder, reads the same file.  A model is
    a path only as ``local-dir:``; weights also as a file or folder."""
    if choice.startswith(LOCAL_DIR):
        folder = choice[len(LOCAL_DIR):].strip()
        return f"{LOCAL_DIR}{os.path.abspath(os.path.expanduser(folder))}" if folder not in ("", ".") else choice
    if not weights or choice.startswith(HF_HUB):
        return choice
    try:
        local = looks_like_path(choice) or os.path.exists(os.path.expanduser(choice))
    except (OSError, ValueError):  # a NUL byte: the loader says so in its own words
        return choice
    return os.path.abspath(os.path.expanduser(choice)) if local else choice


def _depth(value, level: int = 0) -> int:
    if level > _CONFIG_DEPTH:
        return level
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return max((_depth(child, level + 1) for child in children), default=level)


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)


def split_hub(identifier: str) -> tuple[str, str]:
    """``"org/repo"`` -> ``("org/repo", "")``; ``"org/repo/dir/file.pt"`` -> ``("org/repo", "dir/file.pt")``."""
    parts = identifier.strip().removesuffix("/").split("/")
    if len(parts) < 2 or not all(_HUB_NAME.fullmatch(part) for part in parts[:2]) \
            or not all(parts[2:]) or any(part in (".", "..") or not part.isprintable() for part in parts[2:]):
        raise ModelError(f"'{_printable(HF_HUB + identifier)[:200]}' is not a Hugging Face repo; write "
                         "hf-hub:ORG/REPO (or hf-hub:ORG/REPO/FILE for one checkpoint file in it)")
    return "/".join(parts[:2]), "/".join(parts[2:])


def registered_config(name: str) -> dict | None:
    """open_clip's config for a model name it knows (never a download); ``None`` otherwise."""
    from napari_sclip.engine._torch import open_clip

    if name.startswith((HF_HUB, LOCAL_DIR)) or name not in open_clip.list_models():
        return None
    return open_clip.get_model_config(name)


def read_config_file(path: Path) -> tuple[dict, dict]:
    """``(model_cfg, preprocess_cfg)`` of an ``open_clip_config.json``, or one line why not."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would block or never end
            raise ValueError("it is not a regular file")
        with open(path, "rb") as handle:
            raw = handle.read(_CONFIG_LIMIT + 1)
        if len(raw) > _CONFIG_LIMIT:
            raise ValueError("it is larger than 1 MB")
        document = json.loads(raw.decode("utf-8"))
        if _depth(document) > _CONFIG_DEPTH:
            raise ValueError(f"it is nested deeper than {_CONFIG_DEPTH} levels, unlike any open_clip config")
    except FileNotFoundError:
        raise ModelError(f"{path} not found: a local-dir: folder needs open_clip's {CONFIG_FILE}") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise ModelError(f"cannot read {path}: {type(exc).__name__}: {_printable(str(exc))[:200]}") from None
    model_cfg = document.get("model_cfg") if isinstance(document, dict) else None
    if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("vision_cfg", {}), dict) \
            or not isinstance(model_cfg.get("text_cfg", {}), dict):
        raise ModelError(f"{path} is not an open_clip config: it has no model_cfg with vision_cfg and text_cfg")
    preprocess = document.get("preprocess_cfg")
    return model_cfg, preprocess if isinstance(preprocess, dict) else {}


def check_config(model_cfg: dict, label: str) -> None:
    """One line saying why the engine cannot run ``label`` (a model whose config is
    ``model_cfg``), or nothing: the methods need open_clip's CLIP ViT (class token, learned
    positions) and CLIP's causal text transformer read at its end-of-text token."""
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    why = None
    if vision.get("timm_model_name"):
        why = f"its image tower is a timm model ({vision['timm_model_name']}), not open_clip's CLIP ViT"
    elif isinstance(vision.get("layers"), (list, tuple)):
        why = "its image tower is a ResNet, not a ViT"
    elif text.get("hf_model_name"):
        why = (f"its text tower is {text['hf_model_name']}, which reads the whole prompt; the methods "
               "need CLIP's causal text transformer, read at its end-of-text token")
    elif model_cfg.get("custom_text") or "multimodal_cfg" in model_cfg:
        why = "its text tower is not CLIP's (a custom or multimodal text model)"
    elif text.get("no_causal_mask"):
        why = "its text transformer is not causal; the methods need CLIP's causal text transformer"
    elif text.get("pool_type", "argmax") != "argmax" or text.get("hf_tokenizer_name"):
        why = ("it reads its text at another token than CLIP's end-of-text token (pool_type "
               f"{text.get('pool_type', 'argmax')}, tokenizer {text.get('hf_tokenizer_name') or 'CLIP'})")
    elif vision.get("attentional_pool") or vision.get("final_ln_after_pool") \
            or vision.get("pool_type", "tok") != "tok":
        why = "its ViT pools its tokens without the class token's path the methods change"
    elif vision.get("pos_embed_type", "learnable") != "learnable":
        why = f"its ViT has {vision['pos_embed_type']} positions, not learned ones"
    else:
        why = _implausible(model_cfg)
    if why:
        raise ModelError(f"model {label} cannot be used: {why}; choose a plain CLIP ViT "
                         "(e.g. ViT-B-16; 'napari-sclip models' lists presets)")


#: Bounds no CLIP comes near (ViT-bigG/14: 48 blocks of width 1664, 2.5 B parameters), so that a
#: damaged or hostile config cannot make the engine allocate without end.
_MAX_PARAMETERS = 5 * 10**9
_MAX_DEPTH = 128
#: CLIP reads 77 tokens; long-context variants a few hundred.  The text mask is context² floats.
_MAX_CONTEXT = 1024


def _odd_keywords(model_cfg: dict) -> str | None:
    """open_clip passes ``norm_kwargs`` to LayerNorm and ``act_kwargs`` to GELU: only a positive
    ``eps`` and GELU's ``approximate`` make sense there; anything else fails mid-run."""
    for tower in ("vision_cfg", "text_cfg"):
        part = model_cfg.get(tower, {})
        norm, act = part.get("norm_kwargs", {}), part.get("act_kwargs", {})
        eps = norm.get("eps", 1e-5) if isinstance(norm, dict) else None
        if not isinstance(norm, dict) or set(norm) - {"eps"} or isinstance(eps, bool) \
                or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            return f"its {tower} norm_kwargs are not a LayerNorm's (a small positive eps)"
        if not isinstance(act, dict) or set(act) - {"approximate"} or act.get("approximate", "none") not in ("none", "tanh"):
            return f"its {tower} act_kwargs are not GELU's (approximate: none or tanh)"
    return None


def openai_layout_bounds(state: dict, label: str) -> None:
    """The bounds of :func:`check_config` for a state dict in OpenAI's layout, whose architecture
    comes from its shapes: checked before open_clip builds it at full size."""
    def blocks(prefix: str) -> int:
        indices = {key[len(prefix):].split(".", 1)[0] for key in state if key.startswith(prefix)}
        return max((int(i) + 1 for i in indices if i.isdigit()), default=0)

    def rows(key: str) -> int:
        tensor = state.get(key)
        return int(tensor.shape[0]) if tensor is not None and tensor.ndim else 0

    depth, text_depth = blocks("visual.transformer.resblocks."), blocks("transformer.resblocks.")
    width, text_width = rows("visual.conv1.weight"), rows("ln_final.weight")
    parameters = 12 * (width * width * depth + text_width * text_width * text_depth)
    if max(depth, text_depth) > _MAX_DEPTH or rows("positional_embedding") > _MAX_CONTEXT \
            or parameters > _MAX_PARAMETERS:
        raise ModelError(f"weights file {label} describes a model no CLIP comes near ({depth} image blocks, "
                         f"{text_depth} text blocks, a {rows('positional_embedding')}-token context); "
                         "pass the weights of a CLIP ViT")


def _implausible(model_cfg: dict) -> str | None:
    """Why a config's shape cannot be a CLIP ViT's, or ``None``."""
    from napari_sclip.engine.memory import Architecture

    if not isinstance(model_cfg.get("quick_gelu", False), bool):
        return "its quick_gelu is neither true nor false"
    try:
        arch = Architecture.from_config(model_cfg)
    except (TypeError, ValueError, OverflowError, ZeroDivisionError, IndexError):
        return "its config gives sizes that are not whole numbers"
    sizes = (arch.patch_size, arch.depth, arch.width, arch.image_size, arch.embed_dim, arch.text_width,
             arch.text_depth, arch.vocab_size, arch.context_length, arch.heads)
    if min(sizes) < 1 or max(sizes) > 10**7 or arch.patch_size > arch.image_size or arch.width % arch.heads \
            or not 1 <= arch.mlp_ratio * arch.width and arch.mlp_ratio <= 64 or arch.context_length > _MAX_CONTEXT \
            or max(arch.depth, arch.text_depth) > _MAX_DEPTH:
        return "its config gives sizes no ViT has"
    why = _odd_keywords(model_cfg)
    if why:
        return why
    if arch.parameters > _MAX_PARAMETERS:
        return f"its config describes {arch.parameters / 1e9:.0f} billion parameters, more than any CLIP"
    return None


def plausible(model_cfg: dict) -> bool:
    """Whether a config passes :func:`check_config`'s bounds (for estimates before loading)."""
    return _implausible(model_cfg) is None


def _normalisation(mean, std) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A source's mean and std (0-1 units) in 0-255 units; OpenAI's own keep the authors' values."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    def valid(values):
        return (isinstance(values, (list, tuple)) and len(values) == 3
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in values))

    if not (valid(mean) and valid(std)) or min(std) < 1e-3:
        return OPENAI_MEAN, OPENAI_STD
    if all(abs(a - b) < 1e-6 for a, b in zip((*mean, *std), (*OPENAI_DATASET_MEAN, *OPENAI_DATASET_STD))):
        return OPENAI_MEAN, OPENAI_STD
    return tuple(255.0 * v for v in mean), tuple(255.0 * v for v in std)


def _folder_source(folder: Path, label: str, weights_file: Path | None) -> tuple[ModelSource, Path]:
    """A folder with an ``open_clip_config.json`` and a weights file (or ``weights_file``)."""
    try:
        is_file, is_dir = folder.is_file(), folder.is_dir()
    except OSError as exc:  # a name too long
        raise ModelError(f"cannot use folder {_printable(str(folder))[:200]} ({type(exc).__name__})") from None
    if is_file:
        raise ModelError(f"{_printable(label)} is a file, not a folder; give a checkpoint file as pretrained, with "
                         "the model it is for (e.g. --model ViT-B-32 --pretrained FILE)")
    if not is_dir:
        raise ModelError(f"{_printable(label)}: folder not found")
    model_cfg, preprocess = read_config_file(folder / CONFIG_FILE)
    check_config(model_cfg, label)
    if weights_file is None:
        weights_file = next((folder / n for n in WEIGHTS_FILES if (folder / n).is_file()), None)
        if weights_file is None:
            raise ModelError(f"{label}: folder {folder} has no weights file ({', '.join(WEIGHTS_FILES[:3])}, ...)")
    mean, std = _normalisation(preprocess.get("mean"), preprocess.get("std"))
    source = ModelSource(label, label, model_cfg, f"{LOCAL_DIR}{folder}", mean, std, activation_declared=True)
    return source, weights_file


def _hub_repo_source(repo: str, progress: ProgressCallback | None) -> tuple[ModelSource, Path]:
    """A Hugging Face repo in open_clip's layout: its config first (checked), then its weights."""
    from napari_sclip.engine.weights import hub_download

    label = f"{HF_HUB}{repo}"
    config_path = hub_download(repo, [CONFIG_FILE], label, progress)
    model_cfg, _ = read_config_file(config_path)
    check_config(model_cfg, label)  # before downloading hundreds of MB of weights
    weights = hub_download(repo, list(WEIGHTS_FILES), label, progress)
    source, _ = _folder_source(config_path.parent, label, weights)
    return source, weights


def resolve_source(model: str | None, pretrained: str | None,
                   progress: ProgressCallback | None = None) -> tuple[ModelSource, object]:
    """The :class:`ModelSource` and :class:`~napari_sclip.engine.weights.WeightsFile` that
    ``model`` and ``pretrained`` name (the module docstring's table); downloads what is needed.

    ``None`` means the default: ``$NAPARI_SCLIP_MODEL``/``$NAPARI_SCLIP_PRETRAINED``, or a
    preset's own weights when ``model`` is a preset.  A preset's activation applies to its own
    weights, named by its key or spelt out."""
    from napari_sclip.engine.presets import find_preset, preset_for

    model, pretrained = normalise_choice(model, pretrained)
    preset = find_preset(model)
    if preset is not None:
        source, weights = _resolve(preset.model, pretrained or preset.pretrained, progress)
    else:
        source, weights = _resolve(model, pretrained or "", progress)
    own = preset_for(model, pretrained)
    if own is not None and own.quick_gelu is not None:
        source = replace(source, quick_gelu=own.quick_gelu)
    return source, weights


def _resolve(model: str, pretrained: str, progress: ProgressCallback | None) -> tuple[ModelSource, object]:
    from napari_sclip.engine.presets import preset_for
    from napari_sclip.engine.weights import WeightsFile, resolve_weights

    if model.startswith((HF_HUB, LOCAL_DIR)):
        if pretrained and not _is_file_or_hub_file(pretrained):
            raise ModelError(f"model {model} brings its own weights; leave pretrained out, or give a "
                             f"checkpoint file for its architecture (got {pretrained!r})")
        scheme, where, named_by_pretrained = model, pretrained, False
    elif pretrained.startswith((HF_HUB, LOCAL_DIR)) and not _is_hub_file(pretrained):
        scheme, where, named_by_pretrained = pretrained, "", True
    elif pretrained and not pretrained.startswith(HF_HUB) and _is_dir(pretrained):
        scheme, where, named_by_pretrained = f"{LOCAL_DIR}{pretrained}", "", True
    else:
        scheme = None

    if scheme is not None:
        if scheme.startswith(LOCAL_DIR):
            folder = Path(scheme[len(LOCAL_DIR):].strip()).expanduser()
            if not str(folder) or str(folder) == ".":
                raise ModelError("local-dir: needs a folder, e.g. local-dir:/path/to/model")
            try:
                folder = folder.resolve()
            except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a NUL byte
                raise ModelError(f"cannot use folder {_printable(str(folder))[:200]}: {type(exc).__name__}") from None
            override = _own_weights(model, where, progress)
            source, path = _folder_source(folder, f"{LOCAL_DIR}{folder}", override and override.path)
        else:
            repo, file = split_hub(scheme[len(HF_HUB):])
            if file:
                raise ModelError(f"{scheme} names one file; give it as pretrained, with the model it is "
                                 "for (e.g. --model ViT-B-32 --pretrained hf-hub:ORG/REPO/FILE)")
            override = _own_weights(model, where, progress)
            if override is None:
                source, path = _hub_repo_source(repo, progress)
            else:
                from napari_sclip.engine.weights import hub_download

                config_path = hub_download(repo, [CONFIG_FILE], scheme, progress)
                source, path = _folder_source(config_path.parent, scheme, override.path)
        if named_by_pretrained and model != config.default_model():  # after the files: a failed download stays one line
            warnings.warn(f"{_printable(pretrained)[:200]} brings its own architecture (its {CONFIG_FILE}); "
                          f"the model {model} is not used", stacklevel=4)
        return (replace(source, pretrained=where) if where else source), WeightsFile(path)

    from napari_sclip.engine._torch import open_clip

    if model not in open_clip.list_models():
        raise ModelError(f"unknown model {model!r}; 'napari-sclip models' lists presets, "
                         "open_clip.list_models() every name (e.g. ViT-B-16), or use hf-hub:ORG/REPO "
                         "or local-dir:/path")
    model_cfg = open_clip.get_model_config(model)
    check_config(model_cfg, model)
    own = preset_for(model, pretrained)
    hint = "" if own is None or own.quick_gelu is None else " --quick-gelu" if own.quick_gelu else " --no-quick-gelu"
    weights = resolve_weights(model, pretrained, progress, activation_hint=hint)
    tag_cfg = open_clip.get_pretrained_cfg(model, pretrained) if weights.tag else {}
    mean, std = _normalisation(tag_cfg.get("mean"), tag_cfg.get("std"))
    recorded = pretrained if weights.tag or pretrained.startswith(HF_HUB) else str(weights.path)
    return ModelSource(model, recorded, model_cfg, model, mean, std), weights


def _is_dir(path: str) -> bool:
    """Whether ``path`` is a folder; ``False`` for names no file system takes (too long, NUL)."""
    try:
        return Path(path).expanduser().is_dir()
    except (OSError, ValueError, RuntimeError):
        return False


def _is_hub_file(pretrained: str) -> bool:
    return pretrained.startswith(HF_HUB) and bool(split_hub(pretrained[len(HF_HUB):])[1])


def _is_file_or_hub_file(pretrained: str) -> bool:
    try:
        return _is_hub_file(pretrained) or Path(pretrained).expanduser().is_file()
    except (OSError, ValueError, RuntimeError):
        return False


def _own_weights(model: str, where: str, progress: ProgressCallback | None):
    """A checkpoint given beside a repo or folder: a local file or a hub file (or ``None``)."""
    from napari_sclip.engine.weights import resolve_weights

    return resolve_weights(model, where, progress) if where else None

