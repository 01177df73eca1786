"""Text embeddings of class names, as SCLIP builds them, computed once and cached.

Each name is put into the 80 OpenAI ImageNet prompt templates ("a bad photo of a {}.", ...).  Each
prompt's embedding is L2-normalised, the 80 are averaged and the mean is L2-normalised again.

Speed: CLIP's text tower is causal (each token attends only to earlier ones) and reads its output
at the end-of-text token, so tokens after the last end-of-text token of a batch cannot change the
result.  Prompts are sorted by length and each batch runs only up to its longest prompt: about 12
of the 77 positions for typical names.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from collections.abc import Generator, Sequence
from pathlib import Path

import numpy as np

from napari_sclip._files import atomic_write
from napari_sclip.engine import config
from napari_sclip.engine._torch import F, torch
from napari_sclip.engine.model import LoadedModel, autocast, precision_of
from napari_sclip.engine.progress import Progress

#: Prompts encoded per forward pass.
PROMPT_BATCH = 256


def prompt_templates() -> tuple[str, ...]:
    """The 80 OpenAI ImageNet templates, as format strings with one ``{}``."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)


def encode_tokens(clip: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP text embeddings (not normalised) of ``tokens``, running only up to the last EOT.

    ``tokens`` is ``(N, context_length)``; the end-of-text token has the largest id, so its
    position is each row's argmax (CLIP's own pooling rule).  Returns ``(N, E)``.
    """
    eot = tokens.argmax(dim=-1)  # (N,)
    length = int(eot.max()) + 1
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens[:, :length]).to(cast_dtype)  # (N, L, width)
    x = x + clip.positional_embedding[:length].to(cast_dtype)
    x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
    x = clip.ln_final(x)
    pooled = x[torch.arange(x.shape[0], device=x.device), eot]  # (N, width)
    projection = clip.text_projection
    return projection(pooled) if isinstance(projection, torch.nn.Linear) else pooled @ projection


@torch.inference_mode()
def _normalised_embeddings(clip: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """L2-normalised float32 embeddings of a batch of prompts, on the CPU."""
    with autocast(tokens.device):
        embeddings = encode_tokens(clip, tokens)
    return F.normalize(embeddings.float(), dim=-1).cpu()


# (model identity, templates, precision, name) -> (E,) float32 on the CPU, shared by all encoders.
_MEMORY: dict[tuple[str, str, str, str], torch.Tensor] = {}
_MEMORY_LOCK = threading.Lock()


class TextEncoder:
    """Embeds class names with one model; caches per (model, weights, templates, name).

    The cache lives in memory for the process and on disk in ``<cache_dir>/text`` (``.npy``
    files, read without pickle).  An unwritable cache folder only disables the disk cache.
    """

    def __init__(self, model: LoadedModel, templates: Sequence[str] | None = None):
        self.model = model
        self.templates = tuple(templates) if templates is not None else prompt_templates()
        digest = hashlib.sha1("\n".join(self.templates).encode()).hexdigest()[:12]
        self._templates_id = f"templates:{len(self.templates)}:{digest}"
        self._precision = precision_of(model.device)
        space = f"{model.identity}|{self._templates_id}|{self._precision}"
        self._disk_dir = config.text_cache_dir() / hashlib.sha1(space.encode()).hexdigest()[:16]
        self._disk_ok = True

    def _key(self, name: str) -> tuple[str, str, str, str]:
        return (self.model.identity, self._templates_id, self._precision, name)

    def _disk_path(self, name: str) -> Path:
        return self._disk_dir / (hashlib.sha1(name.encode()).hexdigest()[:24] + ".npy")

    def _read_disk(self, name: str) -> torch.Tensor | None:
        try:
            array = np.load(self._disk_path(name), allow_pickle=False)
        except (OSError, ValueError):
            return None
        if array.ndim != 1 or array.dtype != np.float32 or not np.all(np.isfinite(array)):
            return None
        return torch.from_numpy(array)

    def _write_disk(self, name: str, feature: torch.Tensor) -> None:
        if not self._disk_ok:
            return
        try:
            self._disk_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self._disk_path(name), lambda handle: np.save(handle, feature.numpy()))
        except OSError as exc:
            self._disk_ok = False
            warnings.warn(f"text-embedding cache disabled, cannot write {self._disk_dir}: {exc}", stacklevel=2)

    def _warn_if_truncated(self, name: str) -> None:
        encode = getattr(self.model.tokenizer, "encode", None)
        context = getattr(self.model.tokenizer, "context_length", 77)
        if encode is None:
            return
        longest = max(len(encode(t.format(name))) for t in self.templates) + 2  # + SOT and EOT
        if longest > context:
            warnings.warn(
                f"class name {name[:40]!r}... is longer than CLIP's {context}-token context in "
                "some prompts; those prompts are truncated",
                stacklevel=3,
            )

    def iter_features(self, names: Sequence[str]) -> Generator[Progress, None, torch.Tensor]:
        """Embed ``names``; yields progress over prompts, returns ``(N, E)`` float32 on the CPU."""
        found: dict[str, torch.Tensor] = {}
        for name in dict.fromkeys(names):
            with _MEMORY_LOCK:
                cached = _MEMORY.get(self._key(name))
            if cached is None:
                cached = self._read_disk(name)
                if cached is not None:
                    with _MEMORY_LOCK:
                        _MEMORY[self._key(name)] = cached
            if cached is not None:
                found[name] = cached

        missing = [name for name in dict.fromkeys(names) if name not in found]
        if missing:
            for name in missing:
                self._warn_if_truncated(name)
            computed = yield from self._encode(missing)
            for name, feature in zip(missing, computed):
                with _MEMORY_LOCK:
                    _MEMORY[self._key(name)] = feature
                self._write_disk(name, feature)
                found[name] = feature
        return torch.stack([found[name] for name in names])

    def _encode(self, names: list[str]) -> Generator[Progress, None, torch.Tensor]:
        clip, device = self.model.clip, self.model.device
        prompts = [template.format(name) for name in names for template in self.templates]
        tokens = self.model.tokenizer(prompts)  # (P, context)
        order = torch.argsort(tokens.argmax(dim=-1))  # shortest first: batches share lengths
        sorted_embeddings = []
        yield Progress("text", 0, len(prompts))
        for start in range(0, len(prompts), PROMPT_BATCH):
            batch = tokens[order[start : start + PROMPT_BATCH]]
            sorted_embeddings.append(_normalised_embeddings(clip, batch.to(device)))
            yield Progress("text", min(start + PROMPT_BATCH, len(prompts)), len(prompts))
        embeddings = torch.cat(sorted_embeddings)[torch.argsort(order)]  # (P, E), prompt order
        per_name = embeddings.reshape(len(names), len(self.templates), -1).mean(dim=1)
        return F.normalize(per_name, dim=-1)
