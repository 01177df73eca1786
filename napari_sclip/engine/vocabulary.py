"""Class vocabularies: one class per item, each with one or more names (synonyms).

A class is written ``"person, man, woman"``: commas separate synonyms and the first name is the
class's display name.  The segmenter scores every name and gives a class the maximum probability
over its names, as the SCLIP authors' code does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from napari_sclip.engine.errors import VocabularyError

ClassSpec = Union[str, Sequence[str]]


@dataclass(frozen=True)
class Vocabulary:
    """An ordered list of classes; class ``i`` gets label value ``i + 1``.

    Attributes
    ----------
    classes
        The names of each class; the first is its display name.
    """

    classes: tuple[tuple[str, ...], ...]

    @property
    def display_names(self) -> tuple[str, ...]:
        """One name per class: the first of its names."""
        return tuple(names[0] for names in self.classes)

    @property
    def names(self) -> tuple[str, ...]:
        """Every name of every class, flattened in class order."""
        return tuple(name for names in self.classes for name in names)

    @property
    def name_class_index(self) -> tuple[int, ...]:
        """For each entry of :attr:`names`, the index of its class."""
        return tuple(i for i, names in enumerate(self.classes) for _ in names)

    def __len__(self) -> int:
        return len(self.classes)

    def to_lines(self) -> list[str]:
        """The vocabulary as text lines, one class per line (the ``--classes-file`` format)."""
        return [", ".join(names) for names in self.classes]


def _split_names(item: ClassSpec, position: int) -> tuple[str, ...]:
    if isinstance(item, str):
        parts = item.split(",")
    elif isinstance(item, Sequence):
        parts = list(item)
        if not all(isinstance(p, str) for p in parts):
            raise VocabularyError(f"class {position} must be a string or a list of strings")
    else:
        raise VocabularyError(
            f"class {position} is a {type(item).__name__}; give a string or a list of strings"
        )
    names = tuple(" ".join(p.split()) for p in parts)  # collapse runs of white space
    if not any(names):
        raise VocabularyError(f"class {position} is blank")
    if not all(names):
        raise VocabularyError(f"class {position} ({item!r}) has an empty name between commas")
    return names


def parse_vocabulary(classes: Vocabulary | Sequence[ClassSpec], *, unique: bool = True) -> Vocabulary:
    """Validate and normalise a class list.

    Each item is a string (``"person"`` or ``"person, man, woman"``) or a list of strings.
    White space inside names is collapsed.  Raises :class:`VocabularyError` for an empty list,
    blank classes or names, and for a name used twice (names compare case-insensitively) unless
    ``unique`` is false: the SCLIP authors' name files repeat names (COCO-Object's "bed" is one of
    background's names and a class), and reproducing their figures means keeping them; a repeated
    name scores the same in each of its classes, and a tie goes to the earlier class.
    """
    if isinstance(classes, Vocabulary):
        return classes
    if isinstance(classes, str):
        raise VocabularyError(
            "classes must be a list with one item per class, e.g. ['cat', 'dog, puppy']; "
            "use parse_vocabulary_text() for text with one class per line"
        )
    parsed = tuple(_split_names(item, i + 1) for i, item in enumerate(classes))
    if not parsed:
        raise VocabularyError("the vocabulary is empty; give at least one class name")
    seen: dict[str, int] = {}
    for i, names in enumerate(parsed if unique else (), start=1):
        for name in names:
            key = name.casefold()
            if key in seen:
                where = "twice in class" if seen[key] == i else f"in classes {seen[key]} and"
                raise VocabularyError(f"the name {name!r} appears {where} {i}; names must be unique")
            seen[key] = i
    return Vocabulary(parsed)


def parse_vocabulary_text(text: str, separator: str = "\n") -> Vocabulary:
    """Parse text with one class per line (or per ``separator``), synonyms after commas.

    Blank entries and lines starting with ``#`` are ignored, so files may have comments.
    """
    items = [
        entry.strip()
        for entry in text.split(separator)
        if entry.strip() and not entry.strip().startswith("#")
    ]
    return parse_vocabulary(items)


def read_vocabulary_file(path: str | Path) -> Vocabulary:
    """Read a vocabulary file: UTF-8 text, one class per line, synonyms after commas."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise VocabularyError(f"vocabulary file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise VocabularyError(f"cannot read vocabulary file {path}: {exc}") from None
    return parse_vocabulary_text(text)
