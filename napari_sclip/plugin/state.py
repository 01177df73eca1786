"""The plugin's typed records: the widget's options, and what napari-sclip knows of a labels layer
(no Qt, no napari, no torch).

A labels layer's record travels in ``layer.metadata["napari_sclip"]`` as plain data (lists,
dicts, strings, numbers and one boolean array), which is what the dataset reader produces and what
an export reads from the layer.  :meth:`LabelsState.from_metadata` and
:meth:`LabelsState.store` are the only code that reads or writes that mapping.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from napari_sclip.classes import ClassRegistry
from napari_sclip.plugin.layers import label_values

METADATA_KEY = "napari_sclip"
UNREVIEWED, REVIEWED = "unreviewed", "reviewed"
#: A stored sample's facts about which image it is; a new run keeps them and replaces the rest of
#: its provenance.
SAMPLE_KEYS = ("source", "created", "slice")

SliceIndex = tuple[int, ...]  # the leading indices of one 2D slice; () for a 2D layer


@dataclass(frozen=True)
class SegmentOptions:
    """Every setting of the widget, one field per control (``dataclasses.asdict`` gives the
    mapping; :meth:`SclipWidget.set_options` takes the same names)."""

    model: str
    pretrained: str
    device: str
    quick_gelu: bool | None  # None: decided from the weights
    method: str
    pamr: bool
    short_side: int
    window: int
    stride: int
    logit_scale: float
    prob_threshold: float
    all_slices: bool  # for stacks: every 2D slice, or the one on screen
    confidence: bool  # also show the winning class's probability as an image layer
    overwrite: bool  # a re-run replaces pixels a person edited

    def method_options(self) -> dict[str, Any]:
        """The keyword arguments of :meth:`Segmenter.iter_segment` these options set."""
        return {name: getattr(self, name) for name in METHOD_OPTIONS}


METHOD_OPTIONS = ("method", "pamr", "short_side", "window", "stride", "logit_scale", "prob_threshold")
OPTION_NAMES = tuple(item.name for item in fields(SegmentOptions))


@dataclass
class LabelsState:
    """What napari-sclip knows of one labels layer.

    Attributes
    ----------
    classes
        Every class the layer has known, by label value; the active ones are its vocabulary.
    edited
        Boolean, the layer's shape: the pixels a person changed (re-runs keep them).
    slices
        The 2D slices holding model labels, each with how they were made: the engine's
        ``SegmentationResult.params``, or for a sample opened from a dataset its stored meta.
    review_status
        ``"reviewed"`` once a person checked the labels; a new run resets it.
    """

    classes: ClassRegistry
    edited: np.ndarray
    slices: dict[SliceIndex, dict[str, Any]] = field(default_factory=dict)
    review_status: str = UNREVIEWED

    @classmethod
    def new(cls, shape: tuple[int, ...]) -> LabelsState:
        return cls(ClassRegistry(), np.zeros(shape, bool))

    @classmethod
    def adopt(cls, data) -> LabelsState:
        """A labels layer napari-sclip did not make: its labels are someone's work, so every
        labelled pixel counts as an edit, and each value present keeps its number as a class
        "label <value>" that no vocabulary takes over (nor retires: it is not active)."""
        data = np.asarray(data)
        return cls(ClassRegistry({v: (f"label {v}",) for v in label_values(data)}), data != 0)

    @classmethod
    def from_metadata(cls, metadata: Mapping, data) -> LabelsState:
        """The state a layer's metadata holds (see :meth:`store`); an adopted one without it."""
        plain = metadata.get(METADATA_KEY)
        if not isinstance(plain, Mapping) or "classes" not in plain:
            return cls.adopt(data)
        shape = np.shape(data)
        edited = plain.get("edited")
        # A copy: a duplicated layer's metadata shares the original's array.
        edited = np.zeros(shape, bool) if edited is None or np.shape(edited) != shape else np.array(edited, bool)
        return cls(
            classes=ClassRegistry.from_json(plain["classes"]),
            edited=edited,
            slices={tuple(entry["index"]): dict(entry["provenance"]) for entry in plain.get("slices", [])},
            review_status=plain.get("review_status", UNREVIEWED),
        )

    def store(self, metadata: MutableMapping) -> None:
        """Write this state into a layer's metadata as plain data.  The edited mask is shared,
        not copied, so the metadata follows a person's strokes as they are marked."""
        metadata[METADATA_KEY] = {
            "classes": self.classes.to_json(),
            "edited": self.edited,
            "slices": [{"index": list(index), "provenance": provenance}
                       for index, provenance in sorted(self.slices.items())],
            "review_status": self.review_status,
        }

    def record_run(self, index: SliceIndex, params: dict[str, Any]) -> None:
        """A model run labelled slice ``index`` with these engine parameters."""
        before = self.slices.get(index, {})
        self.slices[index] = {**{key: before[key] for key in SAMPLE_KEYS if key in before}, **params}

    def labelled_slices(self) -> list[SliceIndex]:
        """The 2D slices that hold model labels or a person's edits, in order: what an export
        writes."""
        lead = self.edited.shape[:-2]
        if lead:
            touched = self.edited.reshape(*lead, -1).any(axis=-1)
            edited = {tuple(int(i) for i in index) for index in np.argwhere(touched)}
        else:
            edited = {()} if self.edited.any() else set()
        return sorted(set(self.slices) | edited)
