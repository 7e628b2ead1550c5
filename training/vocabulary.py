"""The item vocabulary: external item ids (strings) <-> contiguous indices 0..N-1.

The file format, ``items.json``: ``{"format": 1, "item_ids": ["<id of index 0>", ...]}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from mqsa.errors import DataError
from mqsa.training.artifacts import write_json_atomic

FORMAT = 1
FILE_NAME = "items.json"


class Vocabulary:
    """Item ids in index order: ``item_ids[item_idx] == item_id``.

    Attributes:
        item_ids: the external id of each index.
    """

    def __init__(self, item_ids: Iterable[str]) -> None:
        """Build from ids in index order.

        Raises:
            ValueError: for a repeated id.
        """
        self.item_ids: list[str] = list(item_ids)
        seen: set[str] = set()
        for item_id in self.item_ids:
            if item_id in seen:
                raise ValueError(f"item id {item_id!r} appears more than once")
            seen.add(item_id)

    @classmethod
    def identity(cls, n: int) -> Vocabulary:
        """The vocabulary of data given as indices already: ids "0".."n-1"."""
        return cls(str(i) for i in range(n))

    def __len__(self) -> int:
        return len(self.item_ids)

    def save(self, path: str | Path) -> None:
        """Write ``items.json`` atomically."""
        write_json_atomic(path, {"format": FORMAT, "item_ids": self.item_ids})

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Read a file written by :meth:`save`.

        Raises:
            DataError: naming the file, if it is missing, not JSON, not format 1,
                or its ids are not distinct strings.
        """
        ids = read_id_list(path, "item_ids")
        try:
            return cls(ids)
        except ValueError as e:
            raise DataError(str(e), path) from None


def vocabulary_for(sequences_path: str | Path, num_items: int) -> Vocabulary:
    """The vocabulary of a sequences file: ``items.json`` beside it, else the identity.

    Raises:
        DataError: if ``items.json`` is bad or holds fewer than ``num_items`` items.
    """
    path = Path(sequences_path).with_name(FILE_NAME)
    if not path.is_file():
        return Vocabulary.identity(num_items)
    vocab = Vocabulary.load(path)
    if len(vocab) < num_items:
        raise DataError(f"holds {len(vocab)} items but {sequences_path} uses {num_items}", path)
    return vocab


def read_id_list(path: str | Path, key: str) -> list[str]:
    """Read ``{"format": 1, key: [str, ...]}`` (``items.json``, ``users.json``).

    Raises:
        DataError: naming the file (and line, for bad JSON).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("no such file", path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON: {e.msg}", path, e.lineno) from None
    except UnicodeDecodeError:
        raise DataError("not UTF-8 text", path) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DataError(f'expected a JSON object with "format": {FORMAT}', path)
    ids = payload.get(key)
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise DataError(f"{key!r} must be a list of strings", path)
    return ids
