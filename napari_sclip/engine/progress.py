"""Progress reports that long engine operations yield or pass to a callback."""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TypeVar

S = TypeVar("S")
T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    """One step of a long operation.

    Attributes
    ----------
    stage
        What is running: ``"download"``, ``"load"``, ``"text"``, ``"windows"`` or ``"resize"``.
    done, total
        Units finished and units in all, for this stage (bytes for downloads, prompts for text,
        windows for the vision tower, row chunks for the final resize).
    """

    stage: str
    done: int
    total: int

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


ProgressCallback = Callable[[Progress], None]


def drive(steps: Generator[S, None, T], progress: Callable[[S], None] | None = None) -> T:
    """Run a generator of steps (usually :class:`Progress`) to its end, forwarding each step to
    ``progress``; return the generator's value."""
    while True:
        try:
            step = next(steps)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(step)
