"""Thread helpers shared by the batch labeller and the evaluator (no napari, no torch)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor


def bounded_map(pool: ThreadPoolExecutor, function: Callable, items: Iterable, ahead: int) -> Iterator:
    """``function(item)`` for each item, in order, computed by ``pool`` at most ``ahead`` items
    ahead of the consumer (so a long stream takes bounded memory)."""
    pending: list = []
    for item in items:
        pending.append(pool.submit(function, item))
        if len(pending) >= ahead:
            yield pending.pop(0).result()
    for future in pending:
        yield future.result()
