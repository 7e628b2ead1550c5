"""Catalogue files: the records ``mqsa export --catalogue`` puts in a bundle and
``mqsa catalogue load`` sends to a running service.

Three formats, one record per row or line:

* JSONL (``.jsonl``): the API's item objects, ``{"item_id", "categories"?, "labels"?,
  "available"?, "expires_at"?}``;
* CSV (``.csv``): columns ``item_id`` and any of ``categories`` (separated by ``|``),
  ``available`` (true/false/1/0), ``expires_at`` (seconds, empty for none) and
  ``label.<name>`` for each label;
* Parquet (``.parquet``, ``.pq``): the CSV's columns; ``categories`` may also be a list.

A field that is absent (or empty in a CSV cell) is left out of the record, so loading
a file of availability updates keeps every item's categories. Every record is checked
by the API's own item schema (``ItemIn``) before anything is sent or written, so a
load never stops half-way on a 422. UTF-8 text, with or without a byte-order mark.
Only pydantic (the service's schemas) and pyarrow (for Parquet), so the service image
can run it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mqsa.errors import DataError
from mqsa.service.schemas import MAX_TIMESTAMP, ItemIn

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def read_catalogue(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a catalogue file, as API item objects.

    Raises:
        DataError: naming the file and the line or row, for a missing file, an unknown
            type, a row without an item id, or a value of the wrong kind.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("no such file", path)
    name = path.name.lower()
    if name.endswith(".jsonl"):
        rows = _jsonl(path)
    elif name.endswith(".csv"):
        rows = _csv(path)
    elif name.endswith((".parquet", ".pq")):
        rows = _parquet(path)
    else:
        raise DataError("unknown catalogue type: expected .jsonl, .csv, .parquet or .pq", path)
    records = [_record(row, path, where) for where, row in rows]
    if not records:
        raise DataError("the catalogue has no items", path)
    return records


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a spreadsheet's byte-order mark is not data
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text (byte {exc.start}); save the file as UTF-8", path) from None


def _jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for n, line in enumerate(_text(path).splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"not JSON: {exc.msg}", path, n) from None
            if not isinstance(row, dict):
                raise DataError("each line must be a JSON object", path, n)
            yield f"line {n}", row


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """A CSV or Parquet row (label.<name> columns, empty cells) as an item object."""
    out: dict[str, Any] = {}
    labels = {}
    for key, value in row.items():
        if value is None or value == "":
            continue
        if key.startswith("label."):
            labels[key.removeprefix("label.")] = str(value)
        elif key == "categories" and isinstance(value, str):
            out[key] = [c for c in value.split("|") if c]
        else:
            out[key] = value
    if labels:
        out["labels"] = labels
    return out


def _csv(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    lines = _text(path).splitlines(keepends=True)
    for n, row in enumerate(csv.DictReader(lines), start=2):  # line 1 is the header
        if None in row:  # DictReader keeps the cells past the header's columns under None
            raise DataError(f"line {n}: more cells than the header has columns", path)
        yield f"line {n}", _flat(row)


def _parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several kinds for a damaged file
        raise DataError(f"cannot read the file: {exc}", path) from exc
    for n, row in enumerate(table.to_pylist(), start=1):
        yield f"row {n}", _flat(row)


def _record(row: dict[str, Any], path: Path, where: str) -> dict[str, Any]:
    def bad(message: str) -> DataError:
        return DataError(f"{where}: {message}", path)

    item_id = row.get("item_id")
    if not isinstance(item_id, str | int) or not str(item_id).strip():
        raise bad("no item_id")
    record: dict[str, Any] = {"item_id": str(item_id)}
    if "categories" in row:
        categories = row["categories"]
        if not isinstance(categories, list) or not all(isinstance(c, str) and c for c in categories):
            raise bad("categories must be a list of names (in a CSV: separated by '|')")
        record["categories"] = categories
    if "labels" in row:
        if not isinstance(row["labels"], dict):
            raise bad("labels must be an object of name -> value")
        for name, value in row["labels"].items():
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise bad(f"labels.{name} {value!r} is not a text value")
        record["labels"] = {str(k): str(v) for k, v in row["labels"].items()}
    if "available" in row:
        record["available"] = _boolean(row["available"], bad)
    if "expires_at" in row:
        try:
            record["expires_at"] = None if row["expires_at"] is None else float(row["expires_at"])
        except (TypeError, ValueError):
            raise bad(f"expires_at {row['expires_at']!r} is not a number of seconds") from None
        if (record["expires_at"] or 0) > MAX_TIMESTAMP:
            raise bad(f"expires_at {row['expires_at']!r} is after 2100: seconds, not milliseconds?")
    unknown = set(row) - {"item_id", "categories", "labels", "available", "expires_at"}
    if unknown:
        raise bad(f"unknown field(s) {sorted(unknown)}")
    try:
        ItemIn.model_validate(record)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"])
        raise bad(f"{field}: {error['msg']}") from None
    return record


def _boolean(value: Any, bad: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE or text in FALSE:
        return text in TRUE
    raise bad(f"available {value!r} is not true or false")


def write_jsonl(records: list[dict[str, Any]], path: Path) -> None:
    """The bundle's seed: one item object per line."""
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records), encoding="utf-8")
