"""Vocabularies: synonyms, text and file formats, normalisation."""

from __future__ import annotations

import pytest

from napari_sclip.engine.errors import VocabularyError
from napari_sclip.engine.vocabulary import (
    Vocabulary,
    parse_vocabulary,
    parse_vocabulary_text,
    read_vocabulary_file,
)


def test_synonyms_and_indices():
    vocab = parse_vocabulary(["person, man,  woman", ["sky"], "tree,  plant "])
    assert vocab.classes == (("person", "man", "woman"), ("sky",), ("tree", "plant"))
    assert vocab.display_names == ("person", "sky", "tree")
    assert vocab.names == ("person", "man", "woman", "sky", "tree", "plant")
    assert vocab.name_class_index == (0, 0, 0, 1, 2, 2)
    assert len(vocab) == 3
    assert parse_vocabulary(vocab) is vocab


def test_inner_white_space_is_collapsed():
    assert parse_vocabulary(["traffic \t  light"]).names == ("traffic light",)


def test_text_with_blank_lines_and_comments():
    text = "# my classes\n\nperson, man\n  \nsky\r\n"
    assert parse_vocabulary_text(text).classes == (("person", "man"), ("sky",))


def test_semicolon_separated_text():
    assert parse_vocabulary_text("cat; dog, puppy;", separator=";").classes == (("cat",), ("dog", "puppy"))


def test_round_trip_through_lines(tmp_path):
    vocab = parse_vocabulary(["person, man", "sky"])
    path = tmp_path / "classes.txt"
    path.write_text("\n".join(vocab.to_lines()), encoding="utf-8")
    assert read_vocabulary_file(path) == vocab


def test_file_with_bom_and_unicode(tmp_path):
    path = tmp_path / "v.txt"
    path.write_bytes("\ufeffcafé, coffee shop\nnaïve art\n".encode("utf-8"))
    assert read_vocabulary_file(path).display_names == ("café", "naïve art")


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(VocabularyError, match="vocabulary file not found"):
        read_vocabulary_file(tmp_path / "nope.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(VocabularyError, match="cannot read vocabulary file"):
        read_vocabulary_file(bad)


def test_empty_text():
    with pytest.raises(VocabularyError, match="empty"):
        parse_vocabulary_text("\n# only a comment\n\n")


def test_vocabulary_is_immutable():
    vocab = Vocabulary((("a",),))
    with pytest.raises(AttributeError):
        vocab.classes = ()
