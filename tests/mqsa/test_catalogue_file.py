from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mqsa.catalogue_file import read_catalogue
from mqsa.errors import DataError

EXPECTED = [
    {"item_id": "i1", "categories": ["shoes", "sale"], "labels": {"brand": "acme"}, "available": True},
    {"item_id": "i2", "available": False, "expires_at": 1900000000.0},
    {"item_id": "i3"},  # nothing given: nothing changes
]


def test_the_three_formats_read_alike(tmp_path) -> None:
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in EXPECTED) + "\n")
    csv = tmp_path / "c.csv"
    csv.write_text(
        "item_id,categories,label.brand,available,expires_at\n"
        "i1,shoes|sale,acme,true,\ni2,,,false,1900000000\ni3,,,,\n"
    )
    parquet = tmp_path / "c.parquet"
    table = pa.table(
        {
            "item_id": ["i1", "i2", "i3"],
            "categories": [["shoes", "sale"], None, None],
            "label.brand": ["acme", None, None],
            "available": [True, False, None],
            "expires_at": [None, 1900000000.0, None],
        }
    )
    pq.write_table(table, parquet)
    for path in (jsonl, csv, parquet):
        assert read_catalogue(path) == EXPECTED, path.name


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("c.csv", "item_id,available\n,true\n", "c.csv: line 2: no item_id"),
        ("c.csv", "item_id,available\ni1,maybe\n", "line 2: available 'maybe' is not true or false"),
        ("c.csv", "item_id,expires_at\ni1,soon\n", "line 2: expires_at 'soon' is not a number"),
        ("c.csv", "item_id,colour\ni1,red\n", r"line 2: unknown field\(s\) \['colour'\]"),
        ("c.jsonl", '{"item_id": "i1", "categories": "shoes"}\n', "line 1: categories must be a list"),
        ("c.jsonl", "not json\n", "c.jsonl:1: not JSON"),
        ("c.txt", "x", "unknown catalogue type"),
        ("c.csv", "item_id\n", "the catalogue has no items"),
        ("c.csv", "item_id,available\ni1,true,extra\n", "line 2: more cells than the header has columns"),
        ("c.jsonl", '{"item_id": "i1", "labels": {"brand": null}}\n', "labels.brand None is not a text"),
        ("c.jsonl", '{"item_id": "i1", "expires_at": NaN}\n', "line 1: expires_at: Input should be a finite"),
        ("c.csv", "item_id,expires_at\ni1,1900000000000\n", r"line 2: expires_at .* not milliseconds"),
        ("c.jsonl", '{"item_id": "i1\\u0007"}\n', "line 1: item_id: String should match pattern"),
        ("c.jsonl", '{"item_id": "i1", "categories": [" "]}\n', "line 1: categories.0: String should match"),
    ],
)
def test_bad_files_name_the_line(tmp_path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_catalogue(path)


def test_a_byte_order_mark_is_not_part_of_the_header(tmp_path) -> None:
    path = tmp_path / "c.csv"
    path.write_bytes("item_id,available\ni1,false\n".encode("utf-8-sig"))  # as Excel saves it
    assert read_catalogue(path) == [{"item_id": "i1", "available": False}]


def test_text_that_is_not_utf8_is_named(tmp_path) -> None:
    path = tmp_path / "c.csv"
    path.write_bytes("item_id,categories\ni1,chaussures d\u00e9t\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"c.csv: not UTF-8 text .* save the file as UTF-8"):
        read_catalogue(path)
