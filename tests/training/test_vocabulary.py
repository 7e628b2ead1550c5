from __future__ import annotations

import json

import pytest

from mqsa.errors import DataError
from mqsa.training.vocabulary import Vocabulary, vocabulary_for


def test_ids_in_index_order() -> None:
    vocab = Vocabulary(["b", "a", "item 3"])
    assert len(vocab) == 3
    assert vocab.item_ids == ["b", "a", "item 3"]


def test_duplicates_rejected() -> None:
    with pytest.raises(ValueError, match="'a' appears more than once"):
        Vocabulary(["a", "b", "a"])


def test_identity() -> None:
    vocab = Vocabulary.identity(4)
    assert vocab.item_ids == ["0", "1", "2", "3"]


def test_save_load(tmp_path) -> None:
    path = tmp_path / "items.json"
    Vocabulary(["x", "ÿ", "a b"]).save(path)
    assert json.loads(path.read_text(encoding="utf-8")) == {"format": 1, "item_ids": ["x", "ÿ", "a b"]}
    assert Vocabulary.load(path).item_ids == ["x", "ÿ", "a b"]
    assert [p.name for p in tmp_path.iterdir()] == ["items.json"]  # no temporary file left


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"format": 1, "item_ids": ["a",', "not valid JSON"),
        ('["a", "b"]', '"format": 1'),
        ('{"format": 2, "item_ids": []}', '"format": 1'),
        ('{"format": 1, "item_ids": [1, 2]}', "list of strings"),
        ('{"format": 1}', "list of strings"),
        ('{"format": 1, "item_ids": ["a", "a"]}', "'a' appears more than once"),
    ],
)
def test_load_bad_file(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "items.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=message) as info:
        Vocabulary.load(path)
    assert str(path) in str(info.value)


def test_load_missing_file(tmp_path) -> None:
    with pytest.raises(DataError, match="no such file"):
        Vocabulary.load(tmp_path / "items.json")


def test_vocabulary_for(tmp_path) -> None:
    sequences = tmp_path / "sequences.txt"
    assert vocabulary_for(sequences, 3).item_ids == ["0", "1", "2"]
    Vocabulary(["a", "b", "c"]).save(tmp_path / "items.json")
    assert vocabulary_for(sequences, 3).item_ids == ["a", "b", "c"]
    with pytest.raises(DataError, match="holds 3 items"):
        vocabulary_for(sequences, 4)
