"""Building a CLIP ViT from its weights, choosing a device, and keeping loaded models.

OpenAI's weights need OpenAI's exact architecture, QuickGELU included: open_clip's plain
``ViT-B-16`` config builds GELU, which silently changes every feature.  The activation is chosen
by, in order: the caller (``quick_gelu=True/False``); a preset (its authors' loading code);
weights in OpenAI's layout (a TorchScript archive, or a state dict with OpenAI's integer
entries), built from the weights themselves with QuickGELU; the model config (a ``-quickgelu``
name) or a tag that open_clip marks QuickGELU (``openai``, ``dfn2b``, MetaCLIP, ...); otherwise
the config's GELU.  A tag, a Hugging Face repo's config and a ``local-dir:`` folder's config say
GELU too, as they do for open_clip, but a lone state dict in open_clip's key layout (which
OpenAI's shares) cannot tell: that last case warns
(:class:`~napari_sclip.engine.errors.ActivationWarning`), once per load.
"""

from __future__ import annotations

import copy
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from napari_sclip.engine._torch import open_clip, torch
from napari_sclip.engine.errors import ActivationWarning, DeviceError, ModelError
from napari_sclip.engine.progress import Progress, ProgressCallback
from napari_sclip.engine.sources import (
    ModelSource,
    check_config,
    openai_layout_bounds,
    registered_config,
    resolve_source,
)
from napari_sclip.engine.weights import WeightsFile, describe_cause, read_state_dict


@dataclass(frozen=True)
class LoadedModel:
    """A CLIP model in eval mode on its device, with what identifies it.

    Attributes
    ----------
    clip
        The open_clip ``CLIP`` module (fp32 weights; CUDA runs it under fp16 autocast).
    tokenizer
        open_clip's tokenizer for its text tower.
    source, weights, device
        Where the model came from (:class:`~napari_sclip.engine.sources.ModelSource`), the
        weights file and the ``torch.device``.
    quick_gelu
        Whether the MLPs use QuickGELU.
    """

    clip: torch.nn.Module
    tokenizer: object
    source: ModelSource
    weights: WeightsFile
    device: torch.device
    quick_gelu: bool

    @property
    def name(self) -> str:
        """The model as results record it: an open_clip name, ``hf-hub:...`` or ``local-dir:...``."""
        return self.source.name

    @property
    def pretrained(self) -> str:
        """The weights as results record them: a tag, a path or ``hf-hub:...``."""
        return self.source.pretrained

    @property
    def identity(self) -> str:
        """Names the function the model computes: model, weights and activation (not device)."""
        return f"{self.name}|{self.weights.identity}|quickgelu={self.quick_gelu}"

    @property
    def patch_size(self) -> int:
        return int(self.clip.visual.conv1.kernel_size[0])

    @property
    def depth(self) -> int:
        """Blocks of the ViT."""
        return len(self.clip.visual.transformer.resblocks)


def autocast(device: torch.device):
    """fp16 autocast on CUDA (the authors' GPU precision); a no-op elsewhere (fp32)."""
    return torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda")


def precision_of(device: torch.device) -> str:
    """``"fp16"`` on CUDA, ``"fp32"`` elsewhere: what :func:`autocast` runs in."""
    return "fp16" if device.type == "cuda" else "fp32"


def resolve_device(device: str) -> torch.device:
    """``"auto"`` picks cuda, then mps, then cpu; other names must be available."""
    name = device.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        chosen = torch.device(name)
    except RuntimeError:
        raise DeviceError(
            f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} was requested but no CUDA GPU is available; use auto or cpu")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {device!r} was requested but only {torch.cuda.device_count()} GPU(s) exist"
            )
    elif chosen.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError("device 'mps' was requested but Apple's MPS is not available")
    elif chosen.type != "cpu":
        raise DeviceError(f"device {device!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return chosen


def available_devices() -> list[str]:
    """The device names that work on this machine, best first, ``"auto"`` excluded."""
    devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return [*devices, "cpu"]


def _check_architecture(clip: torch.nn.Module, name: str) -> None:
    visual = getattr(clip, "visual", None)
    needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post", "proj")
    if visual is None or not all(hasattr(visual, attr) for attr in needed):
        raise ModelError(f"model {name} is not a CLIP ViT; SCLIP needs a ViT image tower")
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False):
        raise ModelError(f"model {name} pools its ViT tokens in a way SCLIP does not support")
    if not getattr(visual.transformer, "batch_first", True):
        raise ModelError(f"model {name} has sequence-first blocks; install open_clip_torch 3.x")
    if not hasattr(clip, "token_embedding") or getattr(clip, "text_pool_type", "argmax") != "argmax":
        raise ModelError(f"model {name} has a text tower SCLIP does not support (needs CLIP's)")


def build_model(source: ModelSource | str, weights: WeightsFile,
                quick_gelu: bool | None = None) -> tuple[torch.nn.Module, bool]:
    """Build ``source``'s model (or that of a model name open_clip knows) and load ``weights``
    into it, on the CPU in fp32.

    ``quick_gelu=None`` decides from the source and weights (the module docstring gives the
    rule).  Returns the model and whether it uses QuickGELU.
    """
    if isinstance(source, str):
        model_config = registered_config(source)
        if model_config is None:
            raise ModelError(f"unknown model {source!r}; see open_clip.list_models(), e.g. ViT-B-16")
        check_config(model_config, source)
        source = ModelSource(source, weights.tag or str(weights.path), model_config, source)
    name = source.name
    state, openai_layout = read_state_dict(weights.path)
    guess = None
    if openai_layout:
        openai_layout_bounds(state, str(weights.path))
        quick = next(q for q in (quick_gelu, source.quick_gelu, True) if q is not None)
        try:
            # open_clip infers the architecture from the weights (and casts to fp16): reload fp32.
            clip = open_clip.model.build_model_from_openai_state_dict(dict(state), quick_gelu=quick, cast_dtype=None)
        except Exception as exc:
            raise ModelError(
                f"weights file {weights.path} is in OpenAI's layout but is not a CLIP ViT "
                f"({describe_cause(exc)}); pass OpenAI's ViT checkpoint or an open_clip state dict"
            ) from None
        clip.float()
        _check_fit(clip, state, weights.path, name)
    else:
        cfg = copy.deepcopy(source.model_config)
        quick, guess = _activation(source, weights, bool(cfg.get("quick_gelu")), quick_gelu)
        cfg["quick_gelu"] = quick
        try:
            with torch.device("meta"):  # shapes only: a config that does not fit allocates nothing
                skeleton = open_clip.model.CLIP(**cfg)
        except Exception as exc:
            raise ModelError(f"cannot build model {name} from its config ({describe_cause(exc)})") from None
        scale = state.get("logit_scale")
        if scale is not None and scale.numel() == 1 and scale.ndim != skeleton.logit_scale.ndim:
            state["logit_scale"] = scale.reshape(skeleton.logit_scale.shape)
        _check_fit(skeleton, state, weights.path, name)
        clip = open_clip.model.CLIP(**cfg)
    clip.load_state_dict(state)
    _check_architecture(clip, name)
    if guess:
        warnings.warn(guess, ActivationWarning, stacklevel=2)
    return clip.eval().requires_grad_(False), quick


def _activation(source: ModelSource, weights: WeightsFile, config_quick: bool,
                forced: bool | None) -> tuple[bool, str | None]:
    """QuickGELU or not for weights in open_clip's layout, and the warning to give once the
    weights have loaded when only a guess is possible."""
    if forced is not None:
        return forced, None
    if source.quick_gelu is not None:
        return source.quick_gelu, None
    if config_quick or weights.quick_gelu:
        return True, None
    if weights.tag is None and not source.activation_declared:
        return False, (f"{weights.path.name} does not say whether it needs QuickGELU (OpenAI's weights do); "
                       "using GELU. Set QuickGELU under Advanced, --quick-gelu in the CLI or quick_gelu=True")
    return False, None


def _check_fit(clip: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, name: str) -> None:
    """One line naming what does not fit, before ``load_state_dict`` (whose errors list it all)."""
    expected = clip.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
    if reshaped:
        key = reshaped[0]
        shapes = [" x ".join(map(str, t.shape)) or "scalar" for t in (state[key], expected[key])]
        parts.append(f"{len(reshaped)} of another shape, e.g. {key} is {shapes[0]} in the file, {shapes[1]} in the model")
    if parts:
        raise ModelError(
            f"weights file {path} does not fit model {name}: {'; '.join(parts)}; "
            "choose the model the weights were made for (--model in the CLI, Segmenter(model=...))"
        )


_CACHE: dict[tuple, LoadedModel] = {}
_CACHE_LOCK = threading.Lock()


def load_model(
    name: str | None,
    pretrained: str | None,
    device: str = "auto",
    quick_gelu: bool | None = None,
    progress: ProgressCallback | None = None,
) -> LoadedModel:
    """Load (or reuse) a model: one copy per (model, weights, activation, device) per process.

    ``name`` and ``pretrained`` are as :func:`~napari_sclip.engine.sources.resolve_source` takes
    them: an open_clip name and tag or file, a preset, ``hf-hub:...`` or ``local-dir:...``."""
    torch_device = resolve_device(device)
    source, weights = resolve_source(name, pretrained, progress)
    key = (source.name, source.quick_gelu, weights.identity, quick_gelu, str(torch_device))
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
        if progress:
            progress(Progress("load", 0, 1))
        clip, quick = build_model(source, weights, quick_gelu)
        loaded = LoadedModel(
            clip=clip.to(torch_device),
            tokenizer=open_clip.get_tokenizer(source.tokenizer),
            source=source,
            weights=weights,
            device=torch_device,
            quick_gelu=quick,
        )
        _CACHE[key] = loaded
        if progress:
            progress(Progress("load", 1, 1))
        return loaded


def clear_model_cache() -> None:
    """Forget every loaded model (frees their memory once nothing else refers to them)."""
    with _CACHE_LOCK:
        _CACHE.clear()

