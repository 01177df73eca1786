"""The per-window patch features of recently segmented images.

A method's patch features never see the text, so a re-run on the same image with another
vocabulary, logit scale or threshold only needs the new names' embeddings, one matrix product per
window and the labelling.  The key names everything the features depend on: the model (name,
weights, activation), the device and its precision, the method, the short side, window and stride,
and a hash of the resized 8-bit pixels that reach the model (so an edited image never reuses stale
features).  The cache is a least-recently-used map bounded by the bytes of the tensors it holds:
``$NAPARI_SCLIP_FEATURE_CACHE_MB`` (default 512) or :func:`set_feature_cache_size`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

from napari_sclip.engine import config
from napari_sclip.engine._torch import torch


class FeatureCache:
    """A thread-safe LRU map from keys to ``(windows, rows, cols, E)`` tensors, bounded in bytes."""

    def __init__(self, max_bytes: int):
        self._entries: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.max_bytes = max(0, int(max_bytes))
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> torch.Tensor | None:
        with self._lock:
            features = self._entries.get(key)
            if features is not None:
                self._entries.move_to_end(key)
            return features

    def put(self, key: Hashable, features: torch.Tensor) -> None:
        """Keep ``features`` (evicting the least recently used); larger than the bound: not kept."""
        size = _size(features)
        with self._lock:
            if key in self._entries:
                self.nbytes -= _size(self._entries.pop(key))
            if size > self.max_bytes:
                return
            self._entries[key] = features
            self.nbytes += size
            self._shrink()

    def resize(self, max_bytes: int) -> None:
        with self._lock:
            self.max_bytes = max(0, int(max_bytes))
            self._shrink()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    def _shrink(self) -> None:
        while self.nbytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= _size(evicted)


def _size(features: torch.Tensor) -> int:
    return features.numel() * features.element_size()


#: The process's cache, shared by every :class:`~napari_sclip.engine.segmenter.Segmenter`.
FEATURE_CACHE = FeatureCache(config.feature_cache_mb() * 2**20)


def set_feature_cache_size(megabytes: float) -> None:
    """Bound the feature cache to ``megabytes`` (0 turns it off), evicting what no longer fits."""
    FEATURE_CACHE.resize(int(megabytes * 2**20))
