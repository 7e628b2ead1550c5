from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mqsa.errors import DataError
from mqsa.training.event_table import EventTable
from mqsa.training.prepare import PrepareConfig, prepare, read_log
from mqsa.training.sequences import read_sequences
from mqsa.training.vocabulary import Vocabulary

# With k=3: D has 2 rows and goes; then item w (C, D, E) has 2 and goes; then E (x, y) has 2 and goes.
CASCADE = {"A": "xyz", "B": "xyz", "C": "xyzw", "D": "wz", "E": "xyw"}


def cascade_log() -> pd.DataFrame:
    rows = [(u, i) for u, items in CASCADE.items() for i in items]
    return pd.DataFrame(rows, columns=["user_id", "item_id"]).assign(timestamp=range(len(rows)))


def write_csv(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def outputs(out_dir) -> tuple[list[list[str]], list[str]]:
    """Each user's item ids in order, and the user ids, read back from prepare's files."""
    vocab = Vocabulary.load(out_dir / "items.json")
    users = json.loads((out_dir / "users.json").read_text(encoding="utf-8"))
    assert users["format"] == 1
    data = read_sequences(out_dir / "sequences.txt", num_items=len(vocab))
    assert data.user_ids == [str(u) for u in range(data.num_users)]
    return [[vocab.item_ids[i] for i in s] for s in data.sequences], users["user_ids"]


def kcore(log: pd.DataFrame, k: int, user_k: int | None = None) -> pd.DataFrame:
    """The rows of ``log`` the event table keeps, in file order (a frame with a ``row`` column)."""
    with EventTable(memory_gb=0.25) as table:
        table.append(log)
        table.number()
        table.kcore(k, k if user_k is None else user_k)
        rows = np.array([r for (r,) in table._run("SELECT row FROM events ORDER BY row")], dtype=int)
    return log.iloc[rows]


def test_kcore_iterates_to_fixed_point() -> None:
    kept = kcore(cascade_log(), k=3)
    assert sorted(kept["user_id"].unique()) == ["A", "B", "C"]
    assert sorted(kept["item_id"].unique()) == ["x", "y", "z"]
    assert len(kept) == 9


def test_kcore_k1_keeps_everything() -> None:
    log = cascade_log()
    assert len(kcore(log, k=1)) == len(log)


def test_kcore_matches_a_pandas_filter_on_a_random_log() -> None:
    """The SQL rounds reach the fixed point a plain pandas filter reaches, row for row."""
    rng = np.random.default_rng(3)
    log = pd.DataFrame(
        {
            "user_id": rng.zipf(1.6, 4000).astype(str),
            "item_id": rng.zipf(1.4, 4000).astype(str),
            "timestamp": np.arange(4000.0),
        }
    )
    expected = log
    while True:
        users, items = expected["user_id"].value_counts(), expected["item_id"].value_counts()
        keep = expected["user_id"].map(users).ge(4) & expected["item_id"].map(items).ge(3)
        if keep.all():
            break
        expected = expected[keep]
    kept = kcore(log, k=3, user_k=4)
    assert 0 < len(kept) < len(log)
    assert kept.index.tolist() == expected.index.tolist()


def test_prepare_orders_by_time_stably(tmp_path) -> None:
    rows = [
        ("alice smith", "b", 20),
        ("bob", "a", 5),
        ("alice smith", "a", 10),
        ("bob", "c", 5),  # tie with the row above: file order kept
        ("alice smith", "c", 30),
        ("bob", "b", 1),
    ]
    log = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    log.to_csv(tmp_path / "log.csv", index=False)
    summary = prepare(tmp_path / "log.csv", tmp_path / "out", PrepareConfig(k=1))
    sequences, users = outputs(tmp_path / "out")
    assert users == ["alice smith", "bob"]
    assert sequences == [["a", "b", "c"], ["b", "a", "c"]]
    # item indices follow first appearance, user by user
    assert Vocabulary.load(tmp_path / "out" / "items.json").item_ids == ["a", "b", "c"]
    assert summary["actions_after"] == 6


def test_prepare_shuffled_rows(tmp_path) -> None:
    rng = np.random.default_rng(0)
    rows = [(f"u{u}", f"i{(u + t) % 7}", 100 * u + t) for u in range(6) for t in range(5)]
    log = pd.DataFrame(rows, columns=["user", "item", "time"]).sample(frac=1.0, random_state=rng)
    log.to_csv(tmp_path / "log.csv", index=False)
    prepare(
        tmp_path / "log.csv",
        tmp_path / "out",
        PrepareConfig(k=1, user_col="user", item_col="item", time_col="time"),
    )
    sequences, users = outputs(tmp_path / "out")
    expected = {f"u{u}": [f"i{(u + t) % 7}" for t in range(5)] for u in range(6)}
    assert dict(zip(users, sequences, strict=True)) == expected


@pytest.mark.parametrize("name", ["log.csv", "log.tsv", "log.csv.gz", "log.parquet", "log.pq"])
def test_prepare_formats_and_cascade(tmp_path, name: str) -> None:
    log = cascade_log()
    path = tmp_path / name
    if "parquet" in name or name.endswith(".pq"):
        log.to_parquet(path)
    else:
        log.to_csv(path, index=False, sep="\t" if ".tsv" in name else ",")
    summary = prepare(path, tmp_path / "out", PrepareConfig(k=3))
    sequences, users = outputs(tmp_path / "out")
    assert users == ["A", "B", "C"]
    assert sequences == [list("xyz")] * 3
    assert summary == {
        "log": str(path),
        "k": 3,
        "raw_rows": 15,
        "rows_skipped": 0,
        "window": {"since": None, "until": None},
        "skipped_sample": [],
        "copies_dropped": 0,
        "users_before": 5,
        "items_before": 4,
        "actions_before": 15,
        "users_after": 3,
        "items_after": 3,
        "actions_after": 9,
        "users_dropped_short": 0,
    }


def test_small_k_drops_short_users_and_reports(tmp_path) -> None:
    log = pd.DataFrame({"user_id": list("aaabbc"), "item_id": list("xyzxyx"), "timestamp": range(6)})
    log.to_csv(tmp_path / "log.csv", index=False)
    summary = prepare(tmp_path / "log.csv", tmp_path / "out", PrepareConfig(k=1, min_users=1))
    assert summary["users_after"] == 1
    assert summary["users_dropped_short"] == 2
    assert outputs(tmp_path / "out") == ([list("xyz")], ["a"])


def test_read_log_iso_and_numeric_timestamps(tmp_path) -> None:
    path = write_csv(
        tmp_path / "log.csv",
        "user_id,item_id,timestamp\nu,1,2023-01-01T00:00:00Z\nu,2,2023-01-01T01:00:00+01:00\nu,3,2023-01-02\n",
    )
    log = read_log(path).frame
    assert log["timestamp"].tolist() == [1672531200.0, 1672531200.0, 1672617600.0]
    assert log["item_id"].tolist() == ["1", "2", "3"]
    path = write_csv(tmp_path / "n.csv", "user_id,item_id,timestamp\n007,a,5\n007,b,1.5e3\n")
    log = read_log(path).frame
    assert log["user_id"].tolist() == ["007", "007"]  # ids stay strings
    assert log["timestamp"].tolist() == [5, 1500]


def test_read_log_parquet_datetime_column(tmp_path) -> None:
    times = pd.to_datetime(["2023-01-01", "2023-01-02"])
    pd.DataFrame({"user_id": [1, 1], "item_id": [7, 8], "timestamp": times}).to_parquet(
        tmp_path / "l.parquet"
    )
    log = read_log(tmp_path / "l.parquet").frame
    assert log["user_id"].tolist() == ["1", "1"]
    assert log["timestamp"].tolist() == [1672531200.0, 1672617600.0]


HEADER = "user_id,item_id,timestamp\n"


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("log.csv", "", "the file is empty"),
        ("log.csv", HEADER, "the file has no rows"),
        ("log.txt", HEADER + "u,i,1\n", "unknown file type"),
        ("log.csv", "user_id,item,timestamp\nu,i,1\n", r"missing column\(s\) \['item_id'\]; .*'item'"),
        (
            "log.csv",
            HEADER + "u,i,1\nu,i,2\nu,i,yesterday\n",
            r"log.csv:4: timestamp 'yesterday' is not a number",
        ),
        ("log.csv", HEADER + "u,i,2023-01-01\nu,i,soon\n", r"log.csv:3: timestamp 'soon' is neither"),
        ("log.csv", HEADER + "u,i,1\nu,i,\n", r"log.csv:3: timestamp '' is not a number"),
        ("log.csv", HEADER + "u,i,1\nu, ,2\n", r"log.csv:3: empty 'item_id'"),
        ("log.csv", HEADER + ",i,1\n", r"log.csv:2: empty 'user_id'"),
        ("log.csv", HEADER + "u,i,1,extra,more\n", "more fields than the header"),
        ("log.csv", HEADER + "u,i,1\nu,i,2,3\n", "cannot read the file: .*line 3"),
        ("log.csv.gz", "not gzip", "cannot read the file"),
        ("log.parquet", "not parquet", "cannot read the file"),
    ],
)
def test_read_log_bad_input(tmp_path, name: str, text: str, message: str) -> None:
    path = write_csv(tmp_path / name, text)
    with pytest.raises(DataError, match=message) as info:
        read_log(path)
    assert str(path) in str(info.value)


def test_read_log_missing_file(tmp_path) -> None:
    with pytest.raises(DataError, match="no such file"):
        read_log(tmp_path / "nope.csv")


def test_read_log_parquet_bad_row(tmp_path) -> None:
    log = pd.DataFrame({"user_id": ["u", None], "item_id": ["a", "b"], "timestamp": [1, 2]})
    log.to_parquet(tmp_path / "log.parquet")
    with pytest.raises(DataError, match=r"log.parquet: row 2: empty 'user_id'"):
        read_log(tmp_path / "log.parquet")
    log = pd.DataFrame({"user_id": ["u", "u"], "item_id": ["a", "b"], "timestamp": [1.0, np.nan]})
    log.to_parquet(tmp_path / "log.parquet")
    with pytest.raises(DataError, match=r"row 2: missing or infinite timestamp"):
        read_log(tmp_path / "log.parquet")


def test_a_few_unusable_rows_are_skipped_counted_and_shown(tmp_path) -> None:
    """One bad event (a blank user id the service used to accept) must not stop the nightly
    retraining: it is skipped, counted and shown, up to the limit (issue 22, 5)."""
    rows = [f"u{u},i{(u + t) % 7},{t}" for u in range(20) for t in range(6)]  # 120 good rows
    rows[3] = " ,i1,3"
    rows[50] = "u8,i1,yesterday"
    path = write_csv(tmp_path / "log.csv", HEADER + "\n".join(rows) + "\n")
    summary = prepare(path, tmp_path / "out", PrepareConfig(k=1, max_skipped_fraction=0.05))
    assert summary["raw_rows"] == 120 and summary["rows_skipped"] == 2
    assert summary["skipped_sample"] == [
        f"{path}:5: empty 'user_id'",
        f"{path}:52: timestamp 'yesterday' is not a number, unlike the first row's",
    ]
    assert summary["actions_after"] == 118
    with pytest.raises(
        DataError, match=r"2 of 120 rows \(1\.7%\) are unusable, more than the 1\.0% .*:5: empty 'user_id'"
    ):
        prepare(path, tmp_path / "strict", PrepareConfig(k=1))  # the default limit, 1%


def test_prepare_too_few_users(tmp_path) -> None:
    cascade_log().to_csv(tmp_path / "log.csv", index=False)
    with pytest.raises(
        DataError, match=r"log.csv: too few users left after 4-core filtering: 0 \(need at least 2\)"
    ):
        prepare(tmp_path / "log.csv", tmp_path / "out", PrepareConfig(k=4))
    with pytest.raises(DataError, match=r"too few users left after 3-core filtering: 3 \(need at least 5\)"):
        prepare(tmp_path / "log.csv", tmp_path / "out", PrepareConfig(k=3, min_users=5))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1700000000", 1_700_000_000.0),
        ("2026-11-30", 1_795_996_800.0),
        ("2026-11-30T01:00:00+01:00", 1_795_996_800.0),
        ("90d", 1_000_000.0 - 90 * 86400),
        ("12h", 1_000_000.0 - 12 * 3600),
        ("2w", 1_000_000.0 - 14 * 86400),
    ],
)
def test_parse_time_takes_seconds_dates_and_spans(text, seconds) -> None:
    from mqsa.training.prepare import parse_time

    assert parse_time(text, relative_to=1_000_000.0) == seconds


def test_parse_time_names_the_flag_it_refuses() -> None:
    from mqsa.errors import ConfigError
    from mqsa.training.prepare import parse_time

    with pytest.raises(ConfigError, match="--since 'yesterday' is neither"):
        parse_time("yesterday", name="--since")


def test_small_numbers_are_seconds_and_old_dates_are_dates(tmp_path) -> None:
    """ "1000" is a number of seconds, not the year 1000 (pandas once raised OutOfBoundsDatetime
    on it), and a date outside pandas' nanosecond years still converts."""
    numbers = tmp_path / "numbers.csv"
    pd.DataFrame({"user_id": ["a", "b"], "item_id": ["x", "y"], "timestamp": ["1000", "1001"]}).to_csv(
        numbers, index=False
    )
    assert list(read_log(numbers).frame["timestamp"]) == [1000.0, 1001.0]
    dates = tmp_path / "dates.csv"
    pd.DataFrame(
        {"user_id": ["a", "b"], "item_id": ["x", "y"], "timestamp": ["1000-01-01", "1970-01-02"]}
    ).to_csv(dates, index=False)
    assert list(read_log(dates).frame["timestamp"]) == [-30_610_224_000.0, 86_400.0]


@pytest.mark.parametrize("text", ["1e20", "3000000d", "-1e15"])
def test_parse_time_refuses_times_outside_the_calendar(text) -> None:
    from mqsa.errors import ConfigError
    from mqsa.training.prepare import parse_time

    with pytest.raises(ConfigError, match=r"--since .* is not a time between the years 1 and 9999"):
        parse_time(text, name="--since")


def test_chunked_reading_names_the_true_line_and_keeps_the_first_rows_time_kind(
    tmp_path, monkeypatch
) -> None:
    """Read two rows at a time: a bad row in a later chunk is named by its line in the file,
    and a date after numbers is still 'not a number' (the first usable row decides, not
    the first row of its chunk)."""
    rows = [f"u{u},i{t},{10 * u + t}" for u in range(3) for t in range(3)]
    rows[6] = "u2,i0,2023-01-01"
    path = write_csv(tmp_path / "log.csv", HEADER + "\n".join(rows) + "\n")
    monkeypatch.setattr("mqsa.training.prepare.CHUNK_ROWS", 2)
    log = read_log(path, max_skipped_fraction=0.2)
    assert log.rows == 9 and log.skipped == 1
    assert log.sample == [f"{path}:8: timestamp '2023-01-01' is not a number, unlike the first row's"]
    assert log.frame["timestamp"].tolist() == [0, 1, 2, 10, 11, 12, 21, 22]


def test_prepare_in_small_chunks_and_little_memory_writes_the_same_files(tmp_path, monkeypatch) -> None:
    """A log read 1,000 rows at a time into an event table held to 128 MB (so DuckDB spills)
    gives byte for byte the files of one read in one chunk."""
    rng = np.random.default_rng(1)
    n = 60_000
    log = pd.DataFrame(
        {
            "user_id": rng.integers(0, 3000, n).astype(str),
            "item_id": (rng.zipf(1.5, n) % 900).astype(str),
            "timestamp": rng.integers(0, 50, n),  # many ties: file order decides them
        }
    )
    log.to_parquet(tmp_path / "log.parquet")
    prepare(tmp_path / "log.parquet", tmp_path / "whole", PrepareConfig(k=4))
    monkeypatch.setattr("mqsa.training.prepare.CHUNK_ROWS", 1000)
    summary = prepare(
        tmp_path / "log.parquet",
        tmp_path / "small",
        PrepareConfig(k=4, memory_gb=0.125, temp_dir=str(tmp_path)),
    )
    for name in ("sequences.txt", "items.json", "users.json"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "small" / name).read_bytes()
    sequences, users = outputs(tmp_path / "small")
    assert summary["actions_after"] == sum(map(len, sequences)) and len(users) == summary["users_after"]
    kept_items = set().union(*sequences)
    by_time = log.reset_index().sort_values(["timestamp", "index"], kind="stable")  # ties: file order
    for user, items in zip(users[:50], sequences[:50], strict=True):
        rows = by_time[by_time["user_id"] == user]["item_id"]
        assert items == [i for i in rows if i in kept_items]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("mqsa-prepare-")] == []  # cleaned up


def test_a_temporary_folder_that_cannot_be_written_is_named(tmp_path) -> None:
    cascade_log().to_csv(tmp_path / "log.csv", index=False)
    missing = tmp_path / "no" / "such"
    with pytest.raises(DataError, match=r"cannot write here"):
        prepare(tmp_path / "log.csv", tmp_path / "out", PrepareConfig(k=3, temp_dir=str(missing)))
