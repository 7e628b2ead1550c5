"""Raw interaction log -> k-core -> time-ordered user sequences.

The log is a CSV or Parquet file, or the service's event archive (``mqsa events
archive``: a folder or fsspec URL of date-partitioned Parquet files), of which
``since``/``until`` choose a window.

Writes, into the output folder:

* ``sequences.txt``: the text format of :mod:`mqsa.training.sequences`; users are
  numbered 0..U-1 in order of their first row in the log.
* ``users.json``: ``{"format": 1, "user_ids": [...]}``, the external id of each user number.
* ``items.json``: the :class:`~mqsa.training.vocabulary.Vocabulary`; item indices are given
  in order of first appearance when reading the sequences user by user, oldest first.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mqsa.errors import ConfigError, DataError
from mqsa.training.artifacts import write_json_atomic
from mqsa.training.sequences import MIN_LENGTH, write_sequences
from mqsa.training.vocabulary import Vocabulary

CSV_SEPARATORS = {".csv": ",", ".tsv": "\t"}
PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass
class PrepareConfig:
    """How ``mqsa data prepare`` turns a log into sequences. One flag per field.

    Attributes:
        k: the k of the k-core: users and items with fewer interactions are dropped,
            repeatedly, until none is left.
        min_users: fail if fewer users than this are left.
        user_col: the log's column of user ids.
        item_col: the log's column of item ids.
        time_col: the log's column of timestamps.
        max_skipped_fraction: rows that cannot be used (an empty id, a bad timestamp) are
            skipped and reported; more than this share of the file is an error.
        since: only events from this time on: unix seconds, an ISO-8601 date or time (UTC
            unless it has a zone), or a span before now (90d, 12h, 2w). Of an event archive
            only the days from then on are read.
        until: only events before this time (the same forms).
        event_types: comma-separated event types to learn from (a log or archive with an
            ``event_type`` column; rows without a type are ``view``); empty: every type.
            The service's impressions (served lists) are never read as events.
    """

    k: int = 5
    min_users: int = 2
    user_col: str = "user_id"
    item_col: str = "item_id"
    time_col: str = "timestamp"
    max_skipped_fraction: float = 0.01
    since: str | None = None
    until: str | None = None
    event_types: str = ""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"k must be at least 1, got {self.k}")
        if self.min_users < 1:
            raise ConfigError(f"min_users must be at least 1, got {self.min_users}")
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise ConfigError(f"max_skipped_fraction must be in [0, 1], got {self.max_skipped_fraction}")


@dataclass
class Log:
    """An interaction log as read: its usable rows, and what was skipped.

    Attributes:
        frame: columns ``user_id``, ``item_id`` (str) and ``timestamp`` (float seconds),
            one usable row per interaction, in file order.
        rows: the rows in the file.
        skipped: the rows left out (an empty or blank id, a timestamp that is missing,
            infinite or not a time).
        sample: where and why, for the first few skipped rows (``log.csv:4: empty 'user_id'``).
    """

    frame: pd.DataFrame
    rows: int
    skipped: int
    sample: list[str]


SAMPLE_SIZE = 5


def read_log(
    path: str | Path,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str = "timestamp",
    max_skipped_fraction: float = 0.0,
    since: float | None = None,
    until: float | None = None,
    event_types: frozenset[str] | None = None,
) -> Log:
    """Read an interaction log: CSV (``.csv``, ``.tsv``, either ``.gz``), Parquet (``.parquet``,
    ``.pq``) or an event archive (a folder or fsspec URL written by ``mqsa events archive``).

    ``since``/``until`` (seconds) keep the rows in ``[since, until)``; the others are
    left out, not counted as skipped (of an archive, see :func:`read_archive`).

    Timestamps may be numbers (kept as they are) or ISO-8601 strings (converted to
    seconds since the epoch; times without a zone are taken as UTC). Rows that cannot
    be used are skipped and counted, up to ``max_skipped_fraction`` of the file: one
    bad row in a nightly export must not stop the retraining, but a file that is
    mostly bad is not a log.

    Raises:
        DataError: naming the file (and, for bad rows, the CSV line or Parquet row of the
            first few) for a missing file, an unknown extension, an unreadable or empty
            file, missing columns, or more unusable rows than ``max_skipped_fraction``.
    """
    archive = is_archive(path)
    path = path if archive else Path(path)
    raw, is_csv = (read_archive(str(path), since), False) if archive else _read_table(Path(path))
    raw = only_events(raw, event_types)
    missing = [c for c in (user_col, item_col, time_col) if c not in raw.columns]
    if missing:
        raise DataError(f"missing column(s) {missing}; the file has columns {list(raw.columns)}", path)
    if len(raw) == 0:
        raise DataError("the file has no rows", path)
    raw = raw.reset_index(drop=True)
    reasons = pd.Series("", index=raw.index)  # the first reason each row is unusable
    ids = {}
    for col in (user_col, item_col):
        text = raw[col].astype(str)
        _note(reasons, (raw[col].isna() | text.str.strip().eq("")).to_numpy(), f"empty {col!r}")
        ids[col] = text
    times, bad, template = _seconds(raw[time_col])
    shown = raw[time_col].astype(str).str.strip()
    for row in np.flatnonzero(bad & reasons.eq("").to_numpy()):
        reasons.iloc[row] = template.format(value=shown.iloc[row])
    usable = reasons.eq("").to_numpy()
    sample = [_where(path, row, is_csv) + reasons.iloc[row] for row in np.flatnonzero(~usable)[:SAMPLE_SIZE]]
    skipped, rows = int((~usable).sum()), len(raw)
    if skipped > max_skipped_fraction * rows:
        raise DataError(
            f"{skipped} of {rows} rows ({skipped / rows:.1%}) are unusable, more than the "
            f"{max_skipped_fraction:.1%} that may be skipped; the first: " + "; ".join(sample),
            path,
        )
    frame = pd.DataFrame({"user_id": ids[user_col], "item_id": ids[item_col], "timestamp": times})
    frame = _window(frame[usable], since, until, path)
    return Log(frame=frame.reset_index(drop=True), rows=rows, skipped=skipped, sample=sample)


def _window(frame: pd.DataFrame, since: float | None, until: float | None, path: str | Path) -> pd.DataFrame:
    """The rows with ``since <= timestamp < until`` (either bound may be None)."""
    if since is None and until is None:
        return frame
    keep = np.ones(len(frame), dtype=bool)
    if since is not None:
        keep &= (frame["timestamp"] >= since).to_numpy()
    if until is not None:
        keep &= (frame["timestamp"] < until).to_numpy()
    if not keep.any():
        raise DataError("no event in the window (since/until)", path)
    return frame[keep]


SPAN_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_time(text: str, relative_to: float | None = None, name: str = "since") -> float:
    """A moment in seconds: unix seconds, an ISO-8601 date or time (UTC unless it has a zone),
    or a span before ``relative_to`` (default: now): ``90d``, ``12h``, ``30m``, ``45s``, ``2w``.

    Raises:
        ConfigError: anything else, naming ``name``.
    """
    text = str(text).strip()
    span = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", text)
    if span:
        seconds = (time.time() if relative_to is None else relative_to) - float(span[1]) * SPAN_UNITS[span[2]]
        return _in_range(seconds, text, name)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if math.isfinite(value):
        return _in_range(value, text, name)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"{name} {text!r} is neither unix seconds, an ISO-8601 date nor a span such as 90d, 12h or 30m"
        ) from None
    return _in_range((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp(), text, name)


def _in_range(seconds: float, text: str, name: str) -> float:
    """``seconds`` if it is a time between the years 1 and 9999, else a ConfigError naming ``name``."""
    if not -62_135_596_800 <= seconds <= 253_402_300_799:
        raise ConfigError(f"{name} {text!r} is not a time between the years 1 and 9999")
    return seconds


def is_archive(path: str | Path) -> bool:
    """An event archive: a URL (``s3://…``, ``memory://…``) or a local folder."""
    return "://" in str(path) or Path(path).is_dir()


IMPRESSION = "impression"  # the service's served lists in its streams (docs/feedback.md)
UNTYPED = "view"  # the type of an event logged before events had types


def only_events(raw: pd.DataFrame, event_types: frozenset[str] | None = None) -> pd.DataFrame:
    """The rows that are events (never impressions), of ``event_types`` when given; a log
    without an ``event_type`` column is all events of the type ``view``."""
    if "event_type" not in raw.columns:
        return raw if not event_types or UNTYPED in event_types else raw.iloc[:0]
    kind = raw["event_type"].fillna(UNTYPED).astype(str)
    keep = kind.ne(IMPRESSION) if not event_types else kind.isin(event_types)
    return raw[keep.to_numpy()]


ARCHIVE_COLUMNS = ["user_id", "item_id", "timestamp", "event_type"]
ARCHIVE_KEY = ["stream", "stream_id"]  # one entry of one stream: copies share it


# An intentional copy of service/archive.py's SCHEMA (which imports redis, absent from the
# trainer's extra); tests/service/test_boundary_copies.py checks they agree.
ARCHIVE_SCHEMA = (
    ("user_id", "string"),
    ("item_id", "string"),
    ("timestamp", "double"),
    ("event_id", "string"),
    ("event_type", "string"),
    ("recommendation_id", "string"),
    ("items", "list<item: string>"),
    ("model_version", "string"),
    ("route", "string"),
    ("mode", "string"),
    ("stream", "string"),
    ("stream_id", "string"),
    ("extra", "string"),
)


def archive_schema() -> Any:
    """The archive's columns and its ``date`` partition, as a ``pyarrow.Schema``."""
    import pyarrow as pa

    types = {"string": pa.string(), "double": pa.float64(), "list<item: string>": pa.list_(pa.string())}
    return pa.schema([*((name, types[kind]) for name, kind in ARCHIVE_SCHEMA), ("date", pa.string())])


@contextmanager
def archive_errors(url: str) -> Iterator[None]:
    """Reading an archive: pyarrow's and fsspec's errors (ValueErrors, OSErrors) as a DataError."""
    try:
        yield
    except DataError:
        raise
    except (OSError, ValueError, ImportError, TypeError) as exc:
        raise DataError(f"cannot read the archive (a folder is read as Parquet files): {exc}", url) from exc


def open_archive(url: str) -> Any:
    """The archive under ``url`` (a folder or fsspec URL) as a ``pyarrow.dataset.Dataset`` in the
    archive's schema, so files from before a column existed read it as null.

    Raises:
        DataError: no such folder, no Parquet file in it, or one it cannot read.
    """
    import fsspec
    import pyarrow.dataset as ds

    with archive_errors(url):
        fs, root = fsspec.core.url_to_fs(url)
        if not fs.isdir(root):
            raise DataError("no such archive folder", url)
        dataset = ds.dataset(
            root, schema=archive_schema(), filesystem=fs, format="parquet", partitioning="hive"
        )
        if not dataset.files:
            raise DataError("the archive holds no Parquet file (a folder is read as an event archive)", url)
    return dataset


def read_archive(url: str, since: float | None = None) -> pd.DataFrame:
    """The archive's user, item and timestamp columns, of the days from ``since``'s on (a day
    is when the service received the events: never before their timestamp, unless a
    client's clock runs ahead).

    Rows come file by file: day, then stream, then stream id, so each user's events
    keep the order the service took them in. An entry stored twice (a Redis that came
    back with older state delivered it again) is read once: copies share their
    ``(stream, stream_id)``.

    Raises:
        DataError: no such archive, no Parquet file in it (a folder is read as an
            event archive), or a file it cannot read.
    """
    import pyarrow.dataset as ds

    dataset = open_archive(url)
    where = None
    if since is not None:
        where = ds.field("date") >= datetime.fromtimestamp(since, UTC).strftime("%Y-%m-%d")
    with archive_errors(url):
        table = dataset.to_table(columns=[*ARCHIVE_COLUMNS, *ARCHIVE_KEY], filter=where)
    if table.num_rows == 0:
        raise DataError("the archive holds no event in the window", url)
    frame = table.to_pandas()
    return frame[~frame.duplicated(ARCHIVE_KEY)][ARCHIVE_COLUMNS].reset_index(drop=True)


def _note(reasons: pd.Series, mask: np.ndarray, reason: str) -> None:
    """Give ``reason`` to the rows in ``mask`` that have none yet."""
    reasons[mask & reasons.eq("").to_numpy()] = reason


def _where(path: Path, row: int, is_csv: bool) -> str:
    return f"{path}:{row + 2}: " if is_csv else f"{path}: row {row + 1}: "  # CSV line 1 is the header


def _read_table(path: Path) -> tuple[pd.DataFrame, bool]:
    """The file as a table of strings (CSV) or typed columns (Parquet), and whether it is CSV."""
    if not path.is_file():
        raise DataError("no such file", path)
    suffix = Path(path.name.lower().removesuffix(".gz")).suffix
    is_csv = suffix in CSV_SEPARATORS
    if not is_csv and not path.name.lower().endswith(PARQUET_SUFFIXES):
        raise DataError("unknown file type: expected .csv, .tsv, .csv.gz, .tsv.gz, .parquet or .pq", path)
    if path.stat().st_size == 0:
        raise DataError("the file is empty", path)
    try:
        if not is_csv:
            return pd.read_parquet(path), False
        with warnings.catch_warnings():  # pandas warns (here: raises) when the first row is too long
            warnings.simplefilter("error", pd.errors.ParserWarning)
            table = pd.read_csv(
                path, sep=CSV_SEPARATORS[suffix], dtype=str, keep_default_na=False, index_col=False
            )
        return table, True
    except pd.errors.EmptyDataError:
        raise DataError("the file is empty", path) from None
    except pd.errors.ParserWarning:
        raise DataError("cannot read the file: a row has more fields than the header", path) from None
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"cannot read the file: {e}", path) from None


def _seconds(col: pd.Series) -> tuple[pd.Series, np.ndarray, str]:
    """Timestamps to seconds; returns (values, mask of unusable rows, the reason, with {value}).

    Numbers are kept; strings are numbers or ISO-8601 dates, as the first usable row is.
    """
    if pd.api.types.is_datetime64_any_dtype(col):
        epoch = pd.Timestamp(0, tz="UTC") if col.dt.tz is not None else pd.Timestamp(0)
        col = (col - epoch) / pd.Timedelta(seconds=1)
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        values = col.to_numpy(dtype=float, na_value=np.nan)
        return pd.Series(values), ~np.isfinite(values), "missing or infinite timestamp {value!r}"
    text = col.astype(str).str.strip()
    numbers = pd.to_numeric(text, errors="coerce").to_numpy(dtype=float)
    from_dates = np.full(len(text), np.nan)
    words = ~np.isfinite(numbers)  # "1000" is a number, never the year 1000
    from_dates[words] = _iso_seconds(text[words])
    first_number, first_date = _first(np.isfinite(numbers)), _first(np.isfinite(from_dates))
    if first_number is not None and (
        first_date is None or first_number <= first_date
    ):  # the first row decides
        return (
            pd.Series(numbers),
            ~np.isfinite(numbers),
            "timestamp {value!r} is not a number, unlike the first row's",
        )
    return (
        pd.Series(from_dates),
        ~np.isfinite(from_dates),
        "timestamp {value!r} is neither a number nor an ISO-8601 date",
    )


def _iso_seconds(text: pd.Series) -> np.ndarray:
    """ISO-8601 texts to seconds since the epoch (NaN where not a date); any year pandas reads."""
    dates = pd.to_datetime(text, format="ISO8601", utc=True, errors="coerce")
    naive = dates.dt.tz_localize(None).to_numpy()  # UTC, datetime64 in pandas' unit for these dates
    seconds = naive.astype("datetime64[ms]").astype(np.int64) / 1000.0  # ms: years 1000 and 3000 alike
    seconds[np.isnat(naive)] = np.nan
    return seconds


def _first(mask: np.ndarray) -> int | None:
    return int(np.argmax(mask)) if mask.any() else None


def kcore(df: pd.DataFrame, k: int = 5, user_k: int | None = None) -> pd.DataFrame:
    """Keep only users and items with at least k interactions each, repeated to a fixed point.

    Interactions are rows, so a repeated (user, item) pair counts each time.

    Args:
        df: with columns ``user_id`` and ``item_id``.
        k: the fewest interactions an item (and, unless ``user_k`` is given, a user) keeps.
        user_k: the fewest interactions a user keeps, if different from k.

    Returns:
        The surviving rows, in their original order, with their original index.
    """
    user_k = k if user_k is None else user_k
    while True:
        users = df["user_id"].value_counts()
        items = df["item_id"].value_counts()
        keep = df["user_id"].isin(users.index[users >= user_k]) & df["item_id"].isin(items.index[items >= k])
        if keep.all():
            return df
        df = df[keep]


def prepare(
    log_path: str | Path, out_dir: str | Path, config: PrepareConfig | None = None
) -> dict[str, int | str]:
    """Turn an interaction log into ``sequences.txt``, ``users.json`` and ``items.json``.

    Each user's interactions are sorted by time; ties keep their order in the file.
    Every user left has at least 3 interactions (the leave-one-out split needs them):
    k >= 3 guarantees it, and for smaller k the users with fewer are dropped too
    (again to a fixed point), counted as ``users_dropped_short`` in the summary.

    Returns:
        A summary: ``log``, ``k``, ``raw_rows``, ``rows_skipped`` and ``skipped_sample``
        (where and why, for the first few), ``users_before``, ``items_before``,
        ``actions_before``, ``users_after``, ``items_after``, ``actions_after``,
        ``users_dropped_short``.

    Raises:
        DataError: for a bad log (see :func:`read_log`) or fewer than ``min_users`` users left.
    """
    config = config or PrepareConfig()
    k = config.k
    since, until = (
        None if text is None else parse_time(text, name=f"--{name}")
        for name, text in (("since", config.since), ("until", config.until))
    )
    types = frozenset(t.strip() for t in config.event_types.split(",") if t.strip()) or None
    columns = (config.user_col, config.item_col, config.time_col)
    read = read_log(log_path, *columns, config.max_skipped_fraction, since, until, types)
    log = read.frame
    kept = kcore(log, k, user_k=max(k, MIN_LENGTH))
    dropped_short = 0 if k >= MIN_LENGTH else kcore(log, k)["user_id"].nunique() - kept["user_id"].nunique()
    num_users = kept["user_id"].nunique()
    if num_users < config.min_users:
        raise DataError(
            f"too few users left after {k}-core filtering: {num_users} (need at least {config.min_users})",
            log_path,
        )
    sequences, user_ids, item_ids = _sequences(kept, num_users)
    out_dir = Path(out_dir)
    write_sequences(out_dir / "sequences.txt", sequences)
    write_json_atomic(out_dir / "users.json", {"format": 1, "user_ids": [str(u) for u in user_ids]})
    Vocabulary(str(i) for i in item_ids).save(out_dir / "items.json")
    return {
        "log": str(log_path),
        "k": k,
        "raw_rows": read.rows,
        "rows_skipped": read.skipped,
        "window": {"since": since, "until": until},
        "skipped_sample": read.sample,
        "users_before": log["user_id"].nunique(),
        "items_before": log["item_id"].nunique(),
        "actions_before": len(log),
        "users_after": num_users,
        "items_after": len(item_ids),
        "actions_after": len(kept),
        "users_dropped_short": dropped_short,
    }


def _sequences(kept: pd.DataFrame, num_users: int) -> tuple[list[np.ndarray], pd.Index, pd.Index]:
    """Per user (in order of first row), item indices by time; and the user and item ids by index."""
    user_codes, user_ids = pd.factorize(kept["user_id"])  # order of first row in the file
    kept = kept.assign(user=user_codes)
    kept = kept.sort_values("timestamp", kind="stable").sort_values("user", kind="stable")
    item_codes, item_ids = pd.factorize(kept["item_id"])
    bounds = np.cumsum(np.bincount(kept["user"].to_numpy(), minlength=num_users))[:-1]
    return np.split(item_codes.astype(np.int64), bounds), user_ids, item_ids
