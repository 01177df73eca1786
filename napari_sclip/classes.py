"""Class numbering that survives vocabulary edits (no napari, no torch).

Each class gets a permanent label value (its *uid*) the first time it appears, in vocabulary
order, so a new vocabulary is numbered ``1..C``.  Afterwards:

* appending a class gives it the next unused value: nothing is renumbered;
* reordering classes, or adding synonyms, keeps every value (classes match by display name,
  case-insensitively);
* removing a class retires its value: it is never given to another class, and comes back if the
  class does.  Pixels that still carry a removed class are what the widget asks about.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def label_dtype(largest: int) -> np.dtype:
    """The smallest dtype of labels up to ``largest``: 8-bit, else 16-bit (uids stop at 65535)."""
    return np.dtype(np.uint8 if largest <= 255 else np.uint16)


class ClassConflict(ValueError):
    """One uid names two different classes (in two layers, or a layer and a dataset)."""

    def __init__(self, uid: int, first: str, second: str) -> None:
        super().__init__(f"label {uid} is {first!r} in one and {second!r} in the other")
        self.uid, self.first, self.second = uid, first, second


@dataclass
class ClassRegistry:
    """Every class a labels layer has known, by uid."""

    names: dict[int, tuple[str, ...]] = field(default_factory=dict)  # uid -> names (display first)
    active: list[int] = field(default_factory=list)  # uids of the current vocabulary, in order

    def plan(self, classes: tuple[tuple[str, ...], ...]) -> tuple[list[int], list[int]]:
        """The uids ``classes`` would get, and the active uids it would retire (no change made)."""
        next_uid = max(self.names, default=0) + 1
        by_name = {names[0].casefold(): uid for uid, names in reversed(self.names.items())}  # first wins
        uids = []
        for names in classes:
            uid = by_name.get(names[0].casefold())
            if uid is None:
                uid, next_uid = next_uid, next_uid + 1
            uids.append(uid)
        kept = set(uids)
        retired = [uid for uid in self.active if uid not in kept]
        return uids, retired

    def update(self, classes: tuple[tuple[str, ...], ...]) -> list[int]:
        """Adopt a vocabulary (one tuple of names per class); returns each class's uid."""
        uids, _ = self.plan(classes)
        for uid, names in zip(uids, classes):
            self.names[uid] = tuple(names)
        self.active = uids
        return uids

    def display_name(self, uid: int) -> str:
        return self.names[uid][0]

    def merged_with(self, other: ClassRegistry) -> ClassRegistry:
        """A copy with ``other``'s classes added by uid (its vocabulary stays this one's).

        Raises :class:`ClassConflict` when a uid names one class here and another there
        (display names compared case-insensitively): the same number cannot mean two classes.
        """
        merged = ClassRegistry(dict(self.names), list(self.active))
        for uid, names in other.names.items():
            known = merged.names.get(uid)
            if known is not None and known[0].casefold() != names[0].casefold():
                raise ClassConflict(uid, known[0], names[0])
            merged.names.setdefault(uid, names)
        return merged

    def to_json(self) -> list[dict]:
        """Every class ever known, for a manifest: uid, names, and its position in the current
        vocabulary (``None`` once retired)."""
        positions = {uid: position for position, uid in reversed(list(enumerate(self.active)))}  # first wins
        return [
            {
                "uid": uid,
                "name": names[0],
                "synonyms": list(names[1:]),
                "position": positions.get(uid),
            }
            for uid, names in sorted(self.names.items())
        ]

    @classmethod
    def from_json(cls, entries: list[dict]) -> ClassRegistry:
        """The inverse of :meth:`to_json`."""
        registry = cls()
        positions = []
        for entry in entries:
            uid = int(entry["uid"])
            registry.names[uid] = (str(entry["name"]), *(str(s) for s in entry.get("synonyms", [])))
            if entry.get("position") is not None:
                positions.append((int(entry["position"]), uid))
        registry.active = [uid for _, uid in sorted(positions)]
        return registry
