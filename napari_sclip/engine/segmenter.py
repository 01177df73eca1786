"""The public engine API: :class:`Segmenter`, :class:`SegmentationResult` and :class:`PreparedImage`.

Pipeline (the SCLIP authors' protocol, ``shared/paper/protocol-notes.md``, which the later
methods share):

1. the image becomes 8-bit RGB (:func:`~napari_sclip.engine.image.to_rgb_uint8`);
2. it is resized bilinearly, keeping its aspect ratio, so that its short side is ``short_side``
   (long side at most 2048), rounded back to 8 bits and normalised with CLIP's mean and std;
3. ``window`` px windows moved by ``stride`` px go through the ViT in batches, its last block(s)
   as the method says (:mod:`~napari_sclip.engine.methods`; SCLIP's Correlative Self-Attention by
   default); each window's patch logits (cosine similarities with the class names' text
   embeddings) are upsampled bilinearly to the window and summed into a canvas, which is divided
   by each pixel's window count;
4. the canvas is resized bilinearly to the input size, one band of rows at a time (with PAMR
   refinement: one tile at a time, refined with the resized image), and each band gets
   ``softmax(logit_scale * logits)`` over all names, the maximum over each class's names, the
   argmax and the probability threshold (pixels below it get label 0, or the background class
   when one is named).  With an area threshold the classes that win too few pixels are dropped
   first (a second pass over the bands; see :func:`_suppressed_classes`).

Steps 1-2 are :meth:`Segmenter.prepare` (CPU only), step 3 :meth:`Segmenter.run_windows` (the
device; its batches may hold the windows of several images) and step 4 :meth:`Segmenter.finish`,
so that a batch labeller can run them in reader, device and writer threads;
:meth:`Segmenter.segment` chains the same three for one image.
"""

from __future__ import annotations

import hashlib
import math
import threading
import warnings
from collections import deque
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_sclip.engine import config
from napari_sclip.engine._torch import F, torch
from napari_sclip.engine.errors import ImageError, ModelError, ParameterError, VocabularyError
from napari_sclip.engine.feature_cache import FEATURE_CACHE
from napari_sclip.engine.image import to_rgb_uint8
from napari_sclip.engine.methods import DEFAULT_METHOD, Method, Refinement, get_method
from napari_sclip.engine.model import LoadedModel, autocast, load_model, precision_of
from napari_sclip.engine.pamr import pamr_halo, refine_tile
from napari_sclip.engine.progress import Progress, ProgressCallback, drive
from napari_sclip.engine.resize import resize_bilinear
from napari_sclip.engine.sources import normalise_choice
from napari_sclip.engine.text import TextEncoder
from napari_sclip.engine.vocabulary import ClassSpec, Vocabulary, parse_vocabulary
from napari_sclip.engine.windows import Window, resized_shape, slide_windows, window_counts

#: Windows per forward pass, per device type.
DEFAULT_BATCH_SIZE = {"cuda": 32, "mps": 8, "cpu": 4}
#: Elements of the per-name logit band in the final resize: bounds its memory (~32 MB).
_BAND_ELEMENTS = 1 << 23
#: Elements of PAMR's working set per tile (about 3 per name and 30 more per pixel; ~256 MB).
_PAMR_ELEMENTS = 1 << 26
#: Serialises the warning-filter change around torch.from_numpy of read-only arrays.
_READ_ONLY_LOCK = threading.Lock()
#: run_windows' marker for the end of its input.
_END = object()


@dataclass
class SegmentationResult:
    """What :meth:`Segmenter.segment` returns.

    Attributes
    ----------
    labels
        ``(H, W)`` label values: ``1 + index`` of the winning class, 0 where its probability is
        below the threshold (``1 + background_class`` when one is given).  The smallest unsigned
        dtype that holds them (``uint8`` up to 255 classes).
    confidence
        ``(H, W)`` float32: the winning class's probability (before the threshold).
    class_names
        The display name of each class; label value ``i + 1`` is ``class_names[i]``.
    probs
        ``(C, H, W)`` float32 per-class probabilities, or ``None`` unless asked for (0 for the
        classes an area threshold dropped).
    params
        How the result was made: model, weights, device, method and its parameters.
    """

    labels: np.ndarray
    confidence: np.ndarray
    class_names: tuple[str, ...]
    probs: np.ndarray | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreparedImage:
    """An image ready for the model: everything :meth:`Segmenter.prepare` computes before the
    ViT, as CPU tensors.  :meth:`Segmenter.run_windows` and :meth:`Segmenter.finish` take it on.

    Attributes
    ----------
    method
        The method, with its defaults already applied to the fields below.
    pixels
        ``(3, h, w)`` float32: the resized image, normalised, on the CPU (pinned when the model
        is on CUDA).  PAMR reads it again in :meth:`Segmenter.finish`.
    windows
        The windows over ``pixels``, in the order they are run.
    size
        ``(H, W)`` of the input image: the shape of the result.
    vocabulary, short_side, window, stride, logit_scale, prob_threshold, refinement, return_probs,
    background_class, area_threshold
        The settings, as :meth:`Segmenter.segment` takes them (``refinement`` is ``None``
        without PAMR).
    cache_key
        The feature cache's key, or ``None`` when the segmenter does not cache features.
    digest
        Hash of the resized 8-bit pixels (part of ``cache_key``).
    tag
        The caller's, passed through untouched.
    features_reused
        Set by :meth:`Segmenter.run_windows`: the windows' features came from the feature cache.
    """

    method: Method
    pixels: torch.Tensor
    windows: list[Window]
    size: tuple[int, int]
    vocabulary: Vocabulary
    short_side: int
    window: int
    stride: int
    logit_scale: float
    prob_threshold: float
    refinement: Refinement | None
    return_probs: bool
    cache_key: tuple | None
    digest: str
    background_class: int | None = None
    area_threshold: float | None = None
    tag: Any = None
    features_reused: bool = False

    @property
    def resized_shape(self) -> tuple[int, int]:
        return int(self.pixels.shape[1]), int(self.pixels.shape[2])


@dataclass
class _Job:
    """An image inside :meth:`Segmenter.run_windows`: its canvas and how far its windows got."""

    prepared: PreparedImage
    text: torch.Tensor  # (N, E) on the device
    done: int = 0  # windows summed into the canvas
    started: bool = False
    finished: bool = False
    pixels: torch.Tensor | None = None  # (3, h, w) on the device, while windows still need it
    canvas: torch.Tensor | None = None  # (N, h, w) on the device
    cached: torch.Tensor | None = None  # (windows, r, c, E) from the feature cache, on the CPU
    kept: list[torch.Tensor] = field(default_factory=list)  # new features for the cache

    @property
    def kind(self) -> tuple[str, int, int]:
        """What windows must share to be stacked into one batch: method and window size (every
        window of an image has the same size)."""
        y1, y2, x1, x2 = self.prepared.windows[0]
        return self.prepared.method.name, y2 - y1, x2 - x1

    def start(self, device: torch.device) -> None:
        """Look the features up and make the canvas, just before the first window runs (an
        image seen earlier in the stream may have filled the cache since it was pulled)."""
        if self.started:
            return
        self.started = True
        prepared = self.prepared
        if prepared.cache_key is not None:
            self.cached = FEATURE_CACHE.get(prepared.cache_key)
        prepared.features_reused = self.cached is not None
        if self.cached is None:
            self.pixels = prepared.pixels.to(device, non_blocking=True)
        height, width = prepared.resized_shape
        self.canvas = torch.zeros(self.text.shape[0], height, width, device=device)

    def complete(self) -> None:
        """All windows are in: keep new features, divide by the window counts, drop the rest."""
        prepared = self.prepared
        if self.kept:
            FEATURE_CACHE.put(prepared.cache_key, torch.cat(self.kept))
        counts = window_counts(*prepared.resized_shape, prepared.windows)
        self.canvas.div_(torch.from_numpy(counts).to(self.canvas.device))
        self.pixels = self.cached = None
        self.kept = []
        self.finished = True


def _label_dtype(num_classes: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_classes <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ParameterError(f"{num_classes} classes are too many")


def _check_params(short_side, window, stride, logit_scale, prob_threshold, patch_size) -> None:
    for name, value in (("short_side", short_side), ("window", window), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ParameterError(f"{name} must be a positive integer, got {value!r}")
    if window < patch_size:
        raise ParameterError(f"window must be at least the model's patch size ({patch_size} px), got {window}")
    if stride > window:
        raise ParameterError(f"stride ({stride}) must not exceed window ({window}), or pixels are skipped")
    if not (isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale) and logit_scale > 0):
        raise ParameterError(f"logit_scale must be a positive number, got {logit_scale!r}")
    if not (isinstance(prob_threshold, (int, float)) and 0.0 <= prob_threshold <= 1.0):
        raise ParameterError(f"prob_threshold must be between 0 and 1, got {prob_threshold!r}")


def _check_background(background_class, area_threshold, num_classes: int) -> None:
    if background_class is not None and (
        isinstance(background_class, bool) or not isinstance(background_class, (int, np.integer))
        or not 0 <= background_class < num_classes
    ):
        raise ParameterError(
            f"background_class must be the index of one of the {num_classes} classes (0 to {num_classes - 1}), "
            f"got {background_class!r}"
        )
    if area_threshold is None:
        return
    if isinstance(area_threshold, bool) or not (isinstance(area_threshold, (int, float)) and 0.0 <= area_threshold <= 1.0):
        raise ParameterError(f"area_threshold must be between 0 and 1, got {area_threshold!r}")
    if background_class is None:
        raise ParameterError("area_threshold needs background_class: the class it never drops (class 0 in the "
                             "authors' benchmarks)")


def _check_size(height: int, width: int, patch_size: int) -> None:
    """Refuse an image thinner than one patch: upsampled to a patch, its labels would be noise."""
    if min(height, width) < patch_size:
        raise ImageError(
            f"image of {height} x {width} px is too small to segment: both sides must be at least "
            f"the model's patch size ({patch_size} px)"
        )


class Segmenter:
    """Open-vocabulary semantic segmentation with SCLIP or a later training-free CLIP method.

    Parameters
    ----------
    model
        open_clip model name (any plain CLIP ViT: ``"ViT-B-32"``, ``"ViT-L-14"``, ...), a preset
        (``"bioclip"``; :data:`~napari_sclip.engine.presets.PRESETS`), ``"hf-hub:org/repo"`` or
        ``"local-dir:/path"``; default ``$NAPARI_SCLIP_MODEL`` or ``"ViT-B-16"``.
    pretrained
        open_clip pretrained tag (downloaded once into the cache), a checkpoint path,
        ``"hf-hub:org/repo/file.pt"``, or a folder in open_clip's layout; default
        ``$NAPARI_SCLIP_PRETRAINED`` or ``"openai"``, or the model's own weights for a preset, a
        repo or a folder (:mod:`~napari_sclip.engine.sources`).
    device
        ``"auto"`` (cuda, then mps, then cpu), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``;
        default ``$NAPARI_SCLIP_DEVICE`` or ``"auto"``.
    quick_gelu
        Force the MLP activation; ``None`` decides from the weights (QuickGELU for OpenAI's).
    batch_size
        Windows per forward pass; default 32 on CUDA, 8 on MPS, 4 on CPU.  When the device runs
        out of memory the batch is halved and retried.
    method
        The method :meth:`segment` uses unless told otherwise: ``"sclip"`` (default),
        ``"naclip"``, ``"sc-clip"``, ``"clearclip"`` or ``"maskclip"``
        (:data:`napari_sclip.engine.methods.METHODS`).
    feature_cache
        Keep the windows' patch features of recent images in the process's bounded feature cache
        (:mod:`napari_sclip.engine.feature_cache`), so that segmenting the same image again with
        another vocabulary, logit scale or threshold skips the vision transformer.  Turn it off
        for one-pass batch work.

    The model is loaded on first use (or by :meth:`load`) and shared by all segmenters of the
    process with the same model, weights and device.  :meth:`segment` and :meth:`iter_segment`
    may be used from one thread at a time; it may be created in one thread and used in another.
    For pipelined batch work, :meth:`prepare` and :meth:`finish` may run in several threads at
    once around one thread that runs :meth:`run_windows`.
    """

    def __init__(
        self,
        model: str | None = None,
        pretrained: str | None = None,
        device: str | None = None,
        *,
        quick_gelu: bool | None = None,
        batch_size: int | None = None,
        method: str = DEFAULT_METHOD,
        feature_cache: bool = True,
    ):
        self.method = get_method(method).name
        self.feature_cache = feature_cache
        self.model_name, self.pretrained = normalise_choice(model, None if pretrained is None else str(pretrained))
        # No weights named: another process (a Dask worker) fills in its own default, which its
        # environment may set (NAPARI_SCLIP_PRETRAINED).
        self._pretrained_named = bool(str(pretrained or "").strip())
        self.device_name = device or config.default_device()
        self.quick_gelu = quick_gelu
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ParameterError(f"batch_size must be a positive integer, got {batch_size!r}")
        self._batch_size = batch_size
        self._model: LoadedModel | None = None
        self._text: TextEncoder | None = None
        self._lock = threading.Lock()

    def settings(self) -> dict[str, Any]:
        """The keyword arguments that make an equal segmenter in another process (a default
        left to that process's own)."""
        return {"model": self.model_name, "pretrained": self.pretrained if self._pretrained_named else None,
                "device": self.device_name,
                "quick_gelu": self.quick_gelu, "batch_size": self._batch_size, "method": self.method,
                "feature_cache": self.feature_cache}

    def __repr__(self) -> str:
        return (f"Segmenter(model={self.model_name!r}, pretrained={self.pretrained!r}, "
                f"device={self.device_name!r}, method={self.method!r})")

    # -- model and text ---------------------------------------------------------------------------

    def load(self, progress: ProgressCallback | None = None) -> LoadedModel:
        """Load the model now (downloading its weights if needed) and return it."""
        with self._lock:
            if self._model is None:
                self._model = load_model(
                    self.model_name, self.pretrained, self.device_name, self.quick_gelu, progress
                )
                self._text = TextEncoder(self._model)
            return self._model

    @property
    def device(self) -> torch.device:
        """The device the model runs on (loads the model)."""
        return self.load().device

    @property
    def batch_size(self) -> int:
        return self._batch_size or DEFAULT_BATCH_SIZE.get(self.device.type, 4)

    def text_features(self, names: Sequence[str]) -> np.ndarray:
        """``(N, D)`` L2-normalised text embeddings of ``names`` (80-template average), cached."""
        names = list(names)
        if not all(isinstance(name, str) and name.strip() for name in names):
            raise VocabularyError("text_features needs non-empty strings")
        self.load()
        return drive(self._text.iter_features(names)).numpy()

    # -- segmentation -----------------------------------------------------------------------------
    #
    # Three stages, which segment() and iter_segment() chain for one image and a pipelined batch
    # labeller runs in different threads for many: prepare() (CPU work: checks, resize,
    # normalise, windows), run_windows() (the device: text embeddings and the ViT, windows of
    # several images per batch) and finish() (resize back, PAMR, softmax, labels).

    def segment(
        self,
        image: np.ndarray,
        classes: Vocabulary | Sequence[ClassSpec],
        *,
        method: str | None = None,
        short_side: int | None = None,
        window: int | None = None,
        stride: int | None = None,
        logit_scale: float | None = None,
        prob_threshold: float = config.DEFAULT_PROB_THRESHOLD,
        background_class: int | None = None,
        area_threshold: float | None = None,
        pamr: bool | None = None,
        contrast_limits: Sequence[float] | None = None,
        return_probs: bool = False,
        progress: ProgressCallback | None = None,
    ) -> SegmentationResult:
        """Segment a 2D image into ``classes``.

        Parameters
        ----------
        image
            ``(H, W)`` grayscale, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA (``(H, W, 1)`` gray and
            ``(H, W, 2)`` gray + alpha too); uint8, uint16, float or bool.  Non-8-bit data is
            mapped to 8 bits (see :mod:`napari_sclip.engine.image`).  Both sides must be at least
            the model's patch size (16 px for ViT-B/16); stacks and more than 4 channels are
            refused (:func:`~napari_sclip.engine.image.image_layout`).
        classes
            One item per class: ``"person"``, ``"person, man, woman"`` (synonyms after commas,
            the first is the display name) or a list of names.
        method
            ``"sclip"``, ``"naclip"``, ``"sc-clip"``, ``"clearclip"`` or ``"maskclip"``; default
            the segmenter's.  Each brings its authors' settings for the parameters left ``None``.
        short_side, window, stride
            Slide inference: the image is resized to this short side (long side at most 2048)
            and covered by ``window`` px windows moved by ``stride`` px.  Defaults: the method's
            (336, 224, 112; ClearCLIP 448, 448, 224).
        logit_scale
            Multiplies the cosine similarities before the softmax over all names; default the
            method's (40; ClearCLIP 50).
        prob_threshold
            Pixels whose winning class has a lower probability get label 0 (or the background
            class's).
        background_class
            The index of the class that pixels below ``prob_threshold`` get, as in the SCLIP
            authors' benchmarks with a background class (VOC21, Context60, COCO-Object: 0);
            ``None``: they get label 0, unlabelled.
        area_threshold
            Drop each class but the background class that wins at most this fraction of the pixels
            the background class does not win (their probabilities become 0, the argmax and the
            threshold are taken again), as the authors do on VOC21 (0.1).  Needs
            ``background_class``; ``None``: off.
        pamr
            Refine the logits with PAMR (10 iterations, dilations 8 and 16) before the softmax;
            default the method's (on for NACLIP only).
        contrast_limits
            ``(low, high)`` intensities mapped to 0 and 255 for non-8-bit images.
        return_probs
            Also return the ``(C, H, W)`` class probabilities (memory: ``4 C H W`` bytes).
        progress
            Called with a :class:`~napari_sclip.engine.progress.Progress` for each step.
        """
        steps = self.iter_segment(
            image,
            classes,
            method=method,
            short_side=short_side,
            window=window,
            stride=stride,
            logit_scale=logit_scale,
            prob_threshold=prob_threshold,
            background_class=background_class,
            area_threshold=area_threshold,
            pamr=pamr,
            contrast_limits=contrast_limits,
            return_probs=return_probs,
            load_progress=progress,
        )
        return drive(steps, progress)

    def iter_segment(
        self,
        image: np.ndarray,
        classes: Vocabulary | Sequence[ClassSpec],
        *,
        method: str | None = None,
        short_side: int | None = None,
        window: int | None = None,
        stride: int | None = None,
        logit_scale: float | None = None,
        prob_threshold: float = config.DEFAULT_PROB_THRESHOLD,
        background_class: int | None = None,
        area_threshold: float | None = None,
        pamr: bool | None = None,
        contrast_limits: Sequence[float] | None = None,
        return_probs: bool = False,
        load_progress: ProgressCallback | None = None,
    ) -> Generator[Progress, None, SegmentationResult]:
        """:meth:`segment` as a generator: yields :class:`Progress` after every batch of windows
        and band of rows, and returns the :class:`SegmentationResult`.

        Stop iterating (``close()``) to cancel; nothing is left half-done.  This is what napari's
        generator workers run.  ``load_progress`` receives download and load progress, which
        cannot be interrupted.
        """
        prepared = self.prepare(
            image,
            classes,
            method=method,
            short_side=short_side,
            window=window,
            stride=stride,
            logit_scale=logit_scale,
            prob_threshold=prob_threshold,
            background_class=background_class,
            area_threshold=area_threshold,
            pamr=pamr,
            contrast_limits=contrast_limits,
            return_probs=return_probs,
            load_progress=load_progress,
        )
        # Embedding the names here reports "text" progress; run_windows then finds them cached.
        yield from self._text.iter_features(prepared.vocabulary.names)
        canvas = None
        stream = self._stream([prepared])
        try:
            for step in stream:
                if isinstance(step, Progress):
                    yield step
                else:
                    _, canvas = step
        finally:
            stream.close()
        return (yield from self._iter_finish(prepared, canvas))

    def prepare(
        self,
        image: np.ndarray,
        classes: Vocabulary | Sequence[ClassSpec],
        *,
        method: str | None = None,
        short_side: int | None = None,
        window: int | None = None,
        stride: int | None = None,
        logit_scale: float | None = None,
        prob_threshold: float = config.DEFAULT_PROB_THRESHOLD,
        background_class: int | None = None,
        area_threshold: float | None = None,
        pamr: bool | None = None,
        contrast_limits: Sequence[float] | None = None,
        return_probs: bool = False,
        tag: Any = None,
        load_progress: ProgressCallback | None = None,
    ) -> PreparedImage:
        """The first stage of :meth:`segment`: check the arguments, make the image 8-bit RGB,
        resize and normalise it on the CPU and place the windows.

        Thread-safe: several threads may prepare images at once (the first call loads the model,
        under the segmenter's lock).  The parameters are :meth:`segment`'s; ``tag`` is the
        caller's, passed through untouched.  Errors in the image, vocabulary or parameters are
        raised here, before any device work.
        """
        chosen = get_method(method or self.method)
        short_side = chosen.short_side if short_side is None else short_side
        window = chosen.window if window is None else window
        stride = chosen.stride if stride is None else stride
        logit_scale = chosen.logit_scale if logit_scale is None else logit_scale
        refinement = _refinement(chosen, pamr)
        vocabulary = parse_vocabulary(classes)
        rgb = to_rgb_uint8(image, contrast_limits)
        model = self.load(load_progress)
        _check_params(short_side, window, stride, logit_scale, prob_threshold, model.patch_size)
        _check_background(background_class, area_threshold, len(vocabulary))
        _check_size(*rgb.shape[:2], model.patch_size)

        pixels, digest = self._preprocess(rgb, short_side, model)  # (3, h, w) on the CPU
        if model.device.type == "cuda":
            pixels = pixels.pin_memory()  # lets run_windows copy it without blocking
        windows = slide_windows(pixels.shape[1], pixels.shape[2], window, stride)
        key = None
        if self.feature_cache:
            key = (model.identity, str(model.device), chosen.name, short_side, window, stride, digest)
        return PreparedImage(
            method=chosen,
            pixels=pixels,
            windows=windows,
            size=(int(rgb.shape[0]), int(rgb.shape[1])),
            vocabulary=vocabulary,
            short_side=short_side,
            window=window,
            stride=stride,
            logit_scale=logit_scale,
            prob_threshold=prob_threshold,
            refinement=refinement,
            return_probs=return_probs,
            cache_key=key,
            digest=digest,
            background_class=None if background_class is None else int(background_class),
            area_threshold=None if area_threshold is None else float(area_threshold),
            tag=tag,
        )

    def run_windows(
        self, prepared: Iterable[PreparedImage], *, progress: ProgressCallback | None = None
    ) -> Iterator[tuple[PreparedImage, torch.Tensor]]:
        """The second stage: run the windows of many prepared images through the model.

        Run it in one thread, the device's.  It pulls images from ``prepared`` lazily (it may be
        a blocking iterator over a queue), only as many as the next batch needs: batches of
        :attr:`batch_size` windows gather the windows of consecutive images (those with the
        same method and window size).  For each image, once all its windows are done, it yields
        ``(prepared, canvas)`` in input order: ``canvas`` is ``(N names, h, w)`` float32 on the
        model's device, already divided by the window counts, for :meth:`finish`.  It also sets
        ``prepared.features_reused``.

        Text embeddings come from the text encoder's cache; the feature cache is used and filled
        as by :meth:`segment`; out of memory, a batch is halved and retried.  ``progress`` is
        called with ``Progress("windows", done, total)`` after each batch, ``total`` counting
        the windows of the images pulled so far.
        """
        stream = self._stream(prepared)
        try:
            for step in stream:
                if isinstance(step, Progress):
                    if progress is not None:
                        progress(step)
                else:
                    yield step
        finally:
            stream.close()

    def finish(self, prepared: PreparedImage, canvas: torch.Tensor) -> SegmentationResult:
        """The last stage: resize the canvas to the input size band by band (or tile by tile,
        refined with PAMR), then the softmax, labels and threshold.

        Thread-safe: writer threads may finish several images at once.
        """
        return drive(self._iter_finish(prepared, canvas))

    @torch.inference_mode()
    def _preprocess(self, rgb: np.ndarray, short_side: int, model: LoadedModel) -> tuple[torch.Tensor, str]:
        """Resize (bilinear, rounded to 8 bits) and normalise; returns ``(3, h, w)`` float32 on
        the CPU and a hash of the resized 8-bit pixels (what the model sees)."""
        height, width = rgb.shape[:2]
        size = resized_shape(height, width, short_side, min_side=model.patch_size)
        if rgb.flags.writeable:
            chw = torch.from_numpy(rgb).permute(2, 0, 1)  # (3, H, W) view, no copy
        else:
            # A read-only array (e.g. from PIL) is fine: the resize only reads it.  The lock keeps
            # concurrent prepare() calls from restoring each other's warning filters.
            with _READ_ONLY_LOCK, warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                chw = torch.from_numpy(rgb).permute(2, 0, 1)
        resized = resize_bilinear(chw, size).add_(0.5).floor_().clamp_(0, 255)  # 8-bit values
        digest = hashlib.blake2b(resized.to(torch.uint8).numpy().tobytes(), digest_size=16)
        digest.update(str(tuple(resized.shape)).encode())
        mean = torch.tensor(model.source.mean).view(3, 1, 1)
        std = torch.tensor(model.source.std).view(3, 1, 1)
        return (resized - mean) / std, digest.hexdigest()

    def _stream(
        self, prepared: Iterable[PreparedImage]
    ) -> Generator[Progress | tuple[PreparedImage, torch.Tensor], None, None]:
        """:meth:`run_windows` as one generator of progress steps and finished canvases, so that
        :meth:`iter_segment` can yield the steps and stop between batches."""
        model = self.load()
        source = iter(prepared)
        jobs: deque[_Job] = deque()  # pulled and not yet yielded, in input order
        texts: dict[tuple[str, ...], torch.Tensor] = {}  # (N, E) on the device, per vocabulary
        batch_size = self.batch_size
        exhausted = False
        done = total = 0
        started = False
        while True:
            # Pull only what the next batch needs, so memory stays bounded whatever `source` holds.
            while not exhausted and sum(len(j.prepared.windows) - j.done for j in jobs) < batch_size:
                item = next(source, _END)
                if item is _END:
                    exhausted = True
                else:
                    jobs.append(_Job(item, self._vocabulary_features(item.vocabulary, texts, model.device)))
                    total += len(item.windows)
            if not started:
                yield Progress("windows", 0, total)
                started = True
            if not jobs:
                return
            parts = self._next_batch(jobs, batch_size, model.device)
            try:
                logits, features = self._batch_logits(parts, model.device)
            except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
                if not _out_of_memory(exc):
                    raise
                size = sum(stop - start for _, start, stop in parts)
                if size == 1:
                    raise ModelError(
                        f"the {model.device.type.upper()} device ran out of memory even with one "
                        "window at a time; use device='cpu' or a smaller short side"
                    ) from None
                batch_size = max(1, size // 2)
                _release_cached_memory(model.device)
                continue
            for (job, start, stop), job_logits, job_features in zip(parts, logits, features):
                if job_features is not None and job.prepared.cache_key is not None:
                    job.kept.append(job_features.cpu())
                self._accumulate(job.canvas, job.prepared.windows[start:stop], job_logits)
                job.done = stop
                done += stop - start
                if job.done == len(job.prepared.windows):
                    job.complete()
            yield Progress("windows", done, total)
            while jobs and jobs[0].finished:
                job = jobs.popleft()
                yield job.prepared, job.canvas

    def _vocabulary_features(
        self, vocabulary: Vocabulary, known: dict[tuple[str, ...], torch.Tensor], device: torch.device
    ) -> torch.Tensor:
        """``(N, E)`` text embeddings of a vocabulary's names on ``device``, once per stream."""
        names = vocabulary.names
        if names not in known:
            known[names] = drive(self._text.iter_features(names)).to(device)
        return known[names]

    @staticmethod
    def _next_batch(jobs: deque[_Job], batch_size: int, device: torch.device) -> list[tuple[_Job, int, int]]:
        """The next batch: ``(job, start, stop)`` spans of consecutive images' windows, at most
        ``batch_size`` in all.

        Windows are stacked into one tensor, so a batch holds one method and one window size; a
        span of cached features is a batch of its own (it skips the ViT).
        """
        parts: list[tuple[_Job, int, int]] = []
        room = batch_size
        kind = None
        for job in jobs:
            left = len(job.prepared.windows) - job.done
            if left == 0:
                continue
            if parts and job.kind != kind:
                break
            job.start(device)
            if job.cached is not None and parts:
                break
            take = min(room, left)
            parts.append((job, job.done, job.done + take))
            room -= take
            kind = job.kind
            if room == 0 or job.cached is not None:
                break
        return parts

    @torch.inference_mode()
    def _batch_logits(
        self, parts: list[tuple[_Job, int, int]], device: torch.device
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Patch logits ``(B_i, N_i, r, c)`` of each span of a batch, and the span's new patch
        features ``(B_i, r, c, E)`` (``None`` for cached ones).  No side effects, so a batch that
        runs out of memory can be retried in halves."""
        first, start, stop = parts[0]
        if first.cached is not None:
            features = first.cached[start:stop].to(device)
            return [_patch_logits(features, first.text)], [None]
        crops = torch.stack([
            job.pixels[:, y1:y2, x1:x2]
            for job, start, stop in parts
            for y1, y2, x1, x2 in job.prepared.windows[start:stop]
        ])  # (B, 3, wh, ww)
        features = self._window_features(first.prepared.method, crops)  # (B, r, c, E)
        logits, spans, offset = [], [], 0
        for job, start, stop in parts:
            # Each image's logits on its own: its vocabulary, and the same values in any batch.
            span = features[offset : offset + stop - start]
            logits.append(_patch_logits(span, job.text))
            spans.append(span)
            offset += stop - start
        return logits, spans

    @torch.inference_mode()
    def _window_features(self, method: Method, crops: torch.Tensor) -> torch.Tensor:
        """Patch features ``(B, rows, cols, E)`` of a batch of windows ``(B, 3, wh, ww)``."""
        with autocast(crops.device):
            return method.features(self._model.clip.visual, crops)

    @staticmethod
    @torch.inference_mode()
    def _accumulate(canvas: torch.Tensor, batch: list[Window], logits: torch.Tensor) -> None:
        """Upsample each window's logits to the window and add them into ``canvas`` (N, h, w)."""
        for (y1, y2, x1, x2), window_logits in zip(batch, logits):
            canvas[:, y1:y2, x1:x2] += F.interpolate(
                window_logits[None], size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False
            )[0]

    def _iter_finish(
        self, prepared: PreparedImage, canvas: torch.Tensor
    ) -> Generator[Progress, None, SegmentationResult]:
        """:meth:`finish` as a generator of "resize" progress."""
        model = self.load()
        refinement = prepared.refinement
        refine = (prepared.pixels.to(canvas.device), refinement) if refinement else None
        labels, confidence, probs = yield from self._postprocess(canvas, prepared, refine)
        params = {
            "method": prepared.method.name,
            "model": model.name,
            "pretrained": model.pretrained,
            "quick_gelu": model.quick_gelu,
            "patch_size": model.patch_size,
            "device": str(model.device),
            "precision": precision_of(model.device),
            "short_side": prepared.short_side,
            "window": prepared.window,
            "stride": prepared.stride,
            "logit_scale": float(prepared.logit_scale),
            "prob_threshold": float(prepared.prob_threshold),
            **({"background_class": prepared.background_class} if prepared.background_class is not None else {}),
            **({"area_threshold": prepared.area_threshold} if prepared.area_threshold is not None else {}),
            "pamr": refinement is not None,
            **({"pamr_iterations": refinement.iterations, "pamr_dilations": list(refinement.dilations)}
               if refinement else {}),
            "resized_shape": prepared.resized_shape,
            "windows": len(prepared.windows),
            "features_reused": prepared.features_reused,
            **(prepared.method.settings(model.clip.visual) if prepared.method.settings else {}),
        }
        return SegmentationResult(labels, confidence, prepared.vocabulary.display_names, probs, params)

    def _postprocess(
        self,
        canvas: torch.Tensor,
        prepared: PreparedImage,
        refine: tuple[torch.Tensor, Refinement] | None,
    ) -> Generator[Progress, None, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """Resize logits to the image's size tile by tile (PAMR-refined when ``refine`` gives the
        normalised image and the settings); softmax, max over synonyms, argmax, threshold.  An
        area threshold needs the whole image's argmax first: one more pass over the tiles."""
        size, vocabulary = prepared.size, prepared.vocabulary
        height, width = size
        num_names = canvas.shape[0]
        num_classes = len(vocabulary)
        labels = np.empty((height, width), _label_dtype(num_classes))
        confidence = np.empty((height, width), np.float32)
        probs = np.empty((num_classes, height, width), np.float32) if prepared.return_probs else None
        name_class = torch.tensor(vocabulary.name_class_index, device=canvas.device)  # (N,)
        name_labels = name_class + 1
        # Names are stored class by class, so each class's names are one contiguous span.
        spans, start = [], 0
        for names in vocabulary.classes:
            spans.append((start, start + len(names)))
            start += len(names)
        background = 0 if prepared.background_class is None else prepared.background_class + 1

        tiles = _tiles(size, num_names, refine[1] if refine else None)
        passes = 2 if prepared.area_threshold is not None else 1
        yield Progress("resize", 0, passes * len(tiles))
        dropped = None
        if prepared.area_threshold is not None:
            wins = torch.zeros(num_classes, dtype=torch.int64)  # pixels each class wins
            for i, (rows, cols) in enumerate(tiles):
                logits = _tile_logits(canvas, size, rows, cols, refine)  # (N, r, c)
                wins += _wins(logits, name_class, prepared.logit_scale, num_classes)
                yield Progress("resize", i + 1, passes * len(tiles))
            dropped = _suppressed_classes(wins, prepared.background_class, prepared.area_threshold)[name_class]
        done = (passes - 1) * len(tiles)
        for i, (rows, cols) in enumerate(tiles):
            logits = _tile_logits(canvas, size, rows, cols, refine)  # (N, r, c)
            tile_labels, best, class_probs = _classify(
                logits, name_labels, prepared.logit_scale, prepared.prob_threshold,
                spans if prepared.return_probs else None, background, dropped,
            )
            (r0, r1), (c0, c1) = rows, cols
            labels[r0:r1, c0:c1] = tile_labels.numpy()
            confidence[r0:r1, c0:c1] = best.numpy()
            if probs is not None:
                probs[:, r0:r1, c0:c1] = class_probs.numpy()
            yield Progress("resize", done + i + 1, passes * len(tiles))
        return labels, confidence, probs


def _refinement(method: Method, pamr: bool | None) -> Refinement | None:
    """PAMR settings: the method's when ``pamr`` is None, the standard ones when asked for."""
    if pamr is None:
        return method.refinement
    return (method.refinement or Refinement()) if pamr else None


def _tiles(
    size: tuple[int, int], num_names: int, refinement: Refinement | None
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """``((r0, r1), (c0, c1))`` output tiles: full-width bands of rows without refinement; with
    PAMR, squares whose halo-extended working set fits ``_PAMR_ELEMENTS``."""
    height, width = size
    if refinement is None:
        band = max(1, _BAND_ELEMENTS // (num_names * width))
        return [((r0, min(r0 + band, height)), (0, width)) for r0 in range(0, height, band)]
    halo = pamr_halo(refinement.iterations, refinement.dilations)
    side = max(64, math.isqrt(_PAMR_ELEMENTS // (3 * num_names + 30)) - 2 * halo)
    return [
        ((r0, min(r0 + side, height)), (c0, min(c0 + side, width)))
        for r0 in range(0, height, side)
        for c0 in range(0, width, side)
    ]


@torch.inference_mode()
def _tile_logits(
    canvas: torch.Tensor,
    size: tuple[int, int],
    rows: tuple[int, int],
    cols: tuple[int, int],
    refine: tuple[torch.Tensor, Refinement] | None,
) -> torch.Tensor:
    """The canvas resized to ``size``, for one tile: ``(N, r1 - r0, c1 - c0)`` float32.

    With PAMR, the tile is refined together with a halo around it (clipped to the image), which
    makes the kept part equal to refining the whole image at once.
    """
    if refine is None:
        return resize_bilinear(canvas, size, rows=rows)
    pixels, refinement = refine
    halo = pamr_halo(refinement.iterations, refinement.dilations)
    (r0, r1), (c0, c1) = rows, cols
    e_rows = (max(0, r0 - halo), min(size[0], r1 + halo))
    e_cols = (max(0, c0 - halo), min(size[1], c1 + halo))
    logits = resize_bilinear(canvas, size, rows=e_rows, cols=e_cols)
    image = resize_bilinear(pixels, size, rows=e_rows, cols=e_cols)
    refined = refine_tile(image, logits, refinement.iterations, refinement.dilations)
    return refined[:, r0 - e_rows[0] : r1 - e_rows[0], c0 - e_cols[0] : c1 - e_cols[0]]


@torch.inference_mode()
def _patch_logits(features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """``(B, N, rows, cols)`` cosine logits of ``(B, rows, cols, E)`` patch features, computed in
    the device's precision (cached features give the same logits as fresh ones)."""
    with autocast(features.device):
        logits = features @ text_features.to(features.dtype).T  # (B, rows, cols, N)
    return logits.float().permute(0, 3, 1, 2)


def _out_of_memory(exc: RuntimeError) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _release_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


@torch.inference_mode()
def _wins(logits: torch.Tensor, name_class: torch.Tensor, logit_scale: float, num_classes: int) -> torch.Tensor:
    """``(C,)`` pixels of a tile of ``(N, r, c)`` logits that each class wins (on the CPU)."""
    best_name = logits.mul_(logit_scale).argmax(dim=0)  # scaled as in _classify: the same ties
    return torch.bincount(name_class[best_name].flatten(), minlength=num_classes).cpu()


def _suppressed_classes(wins: torch.Tensor, background_class: int, area_threshold: float) -> torch.Tensor:
    """``(C,)`` bool: the classes an area threshold drops, from the pixels each class wins
    (``wins``, ``(C,)``).  As the authors: every class but the background class whose count is
    not above ``area_threshold`` times the count of pixels the background class does not win,
    including classes that win none."""
    foreground = wins.clone()
    foreground[background_class] = 0
    dropped = foreground <= area_threshold * foreground.sum()
    dropped[background_class] = False
    return dropped


@torch.inference_mode()
def _classify(
    logits: torch.Tensor,
    name_labels: torch.Tensor,
    logit_scale: float,
    prob_threshold: float,
    spans: list[tuple[int, int]] | None,
    background: int = 0,
    dropped: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Labels, winning probabilities and (with ``spans``) class probabilities of a tile of
    ``(N, r, c)`` logits, on the CPU (``logits`` is overwritten).  Pixels below
    ``prob_threshold`` get the label ``background``; names of ``dropped`` (``(N,)`` bool) classes
    cannot win, and their probabilities are 0.

    The softmax over names peaks at the best name, and a class's probability is the maximum over
    its names, so the winning class is the best name's class and its probability is the softmax
    at that name, ``exp(l_best - l_max) / sum(exp(l - l_max))``: no per-class tensor is needed
    unless asked for.  Ties go to the earlier class, as with an argmax over class probabilities.
    """
    scaled = logits.mul_(logit_scale)  # (N, r, c)
    if dropped is None:
        top_logit, best_name = scaled.max(dim=0)  # (r, c)
    else:  # the softmax still runs over every name: dropped classes only cannot win
        top_logit = scaled.amax(dim=0)
        best_logit, best_name = scaled.masked_fill(dropped[:, None, None], -torch.inf).max(dim=0)
    relative = scaled.sub_(top_logit).exp_()  # exp(l - l_max), in place
    inverse = relative.sum(dim=0).reciprocal_()  # (r, c)
    best = inverse if dropped is None else best_logit.sub_(top_logit).exp_().mul_(inverse)
    labels = name_labels[best_name]
    labels[best < prob_threshold] = background
    class_probs = None
    if spans is not None:
        name_probs = relative.mul_(inverse)  # the softmax over names
        if dropped is not None:
            name_probs[dropped] = 0
        class_probs = torch.stack([name_probs[b:e].amax(dim=0) for b, e in spans]).cpu()  # (C, r, c)
    return labels.cpu(), best.cpu(), class_probs
