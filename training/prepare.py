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
from mqsa.training.sequences import MIN_LENGTH
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
        memory_gb: the most memory the on-disk event table (DuckDB) may use; beyond it, it
            spills to ``temp_dir``.
        temp_dir: where the event table and its spill go while preparing (default: the
            system's temporary folder); it needs about 40 B per event.
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
    memory_gb: float = 4.0
    temp_dir: str = ""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"k must be at least 1, got {self.k}")
        if self.min_users < 1:
            raise ConfigError(f"min_users must be at least 1, got {self.min_users}")
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise ConfigError(f"max_skipped_fraction must be in [0, 1], got {self.max_skipped_fraction}")
        if self.memory_gb < 0.125:
            raise ConfigError(f"memory_gb must be at least 0.125, got {self.memory_gb}")


@dataclass
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
CHUNK_ROWS = 500_000  # rows validated at a time: about 100 MB of pandas strings


class LogReader:
    """A log's usable rows, chunk by chunk, and a tally of the rows it skipped.

    Iterate once (frames with ``user_id``, ``item_id``, ``timestamp`` and, from an
    archive, ``stream`` and ``stream_id``), then :meth:`check`. Each chunk is validated
    as :func:`read_log` describes; the choice between numbers and dates for the
    timestamps is the first usable row's, whatever chunk it is in. Memory holds one
    chunk, whatever the log's size.

    Attributes:
        rows: the rows read so far (of an archive, copies of an entry included).
        skipped: the unusable rows so far; ``sample`` says where and why, for the first few.
        kept: the usable rows in the window so far.
    """

    def __init__(
        self,
        path: str | Path,
        columns: tuple[str, str, str] = ("user_id", "item_id", "timestamp"),
        since: float | None = None,
        until: float | None = None,
        event_types: frozenset[str] | None = None,
        chunk_rows: int | None = None,
    ) -> None:
        self.archive = is_archive(path)
        self.path = str(path) if self.archive else Path(path)
        self.columns, self.since, self.until, self.event_types = columns, since, until, event_types
        self.chunk_rows = chunk_rows or CHUNK_ROWS
        self.rows = self.skipped = self.kept = 0
        self.sample: list[str] = []
        self.time_kind: str | None = None  # "number" or "date", once a usable row decides

    def __iter__(self) -> Iterator[pd.DataFrame]:
        if self.archive:
            chunks, is_csv = _archive_chunks(str(self.path), self.since, self.chunk_rows), False
        else:
            chunks, is_csv = _table_chunks(Path(self.path), self.chunk_rows)
        for raw in chunks:
            frame = self._usable(only_events(raw, self.event_types), is_csv)
            if len(frame):
                yield frame

    def _usable(self, raw: pd.DataFrame, is_csv: bool) -> pd.DataFrame:
        """The usable rows of one chunk in the window; counts and samples the rest."""
        user_col, item_col, time_col = self.columns
        missing = [c for c in self.columns if c not in raw.columns]
        if missing:
            raise DataError(
                f"missing column(s) {missing}; the file has columns {list(raw.columns)}", self.path
            )
        reasons = np.full(len(raw), "", dtype=object)  # the first reason each row is unusable
        ids = {}
        for col in (user_col, item_col):
            text = raw[col].astype(str)
            _note(reasons, (raw[col].isna() | text.str.strip().eq("")).to_numpy(), f"empty {col!r}")
            ids[col] = text.to_numpy()
        times, bad, template, self.time_kind = _seconds(raw[time_col], self.time_kind)
        shown = raw[time_col].astype(str).str.strip().to_numpy()
        for row in np.flatnonzero(bad & (reasons == "")):
            reasons[row] = template.format(value=shown[row])
        usable = reasons == ""
        for row in np.flatnonzero(~usable)[: SAMPLE_SIZE - len(self.sample)]:
            self.sample.append(_where(self.path, int(raw.index[row]), is_csv) + reasons[row])
        self.rows += len(raw)
        self.skipped += int((~usable).sum())
        keep = usable & _in_window(times, self.since, self.until)
        frame = pd.DataFrame(
            {"user_id": ids[user_col][keep], "item_id": ids[item_col][keep], "timestamp": times[keep]}
        )
        for col in ARCHIVE_KEY if self.archive else ():
            frame[col] = raw[col].to_numpy()[keep]
        self.kept += len(frame)
        return frame

    def check(self, max_skipped_fraction: float) -> None:
        """After reading: raise for a log with no rows, more unusable rows than
        ``max_skipped_fraction`` of them, or no usable row in the window."""
        if self.rows == 0:
            raise DataError(
                "the archive holds no event in the window" if self.archive else "the file has no rows",
                self.path,
            )
        if self.skipped > max_skipped_fraction * self.rows:
            raise DataError(
                f"{self.skipped} of {self.rows} rows ({self.skipped / self.rows:.1%}) are unusable, more "
                f"than the {max_skipped_fraction:.1%} that may be skipped; the first: "
                + "; ".join(self.sample),
                self.path,
            )
        if self.kept == 0 and (self.since is not None or self.until is not None):
            raise DataError("no event in the window (since/until)", self.path)


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
    left out, not counted as skipped (of an archive, only the days from ``since``'s are read).

    Timestamps may be numbers (kept as they are) or ISO-8601 strings (converted to
    seconds since the epoch; times without a zone are taken as UTC); the first usable
    row decides which. Rows that cannot be used are skipped and counted, up to
    ``max_skipped_fraction`` of the file: one bad row in a nightly export must not stop
    the retraining, but a file that is mostly bad is not a log.

    The whole log is in memory here; ``prepare`` reads it with :class:`LogReader`,
    chunk by chunk, instead.

    Raises:
        DataError: naming the file (and, for bad rows, the CSV line or Parquet row of the
            first few) for a missing file, an unknown extension, an unreadable or empty
            file, missing columns, or more unusable rows than ``max_skipped_fraction``.
    """
    reader = LogReader(path, (user_col, item_col, time_col), since, until, event_types)
    frames = list(reader)
    reader.check(max_skipped_fraction)
    frame = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=["user_id", "item_id", "timestamp"])
    )
    if reader.archive:  # an entry stored twice is read once (_archive_chunks)
        frame = frame[~frame.duplicated(ARCHIVE_KEY)].drop(columns=ARCHIVE_KEY)
    return Log(
        frame=frame.reset_index(drop=True), rows=reader.rows, skipped=reader.skipped, sample=reader.sample
    )


def _in_window(times: np.ndarray, since: float | None, until: float | None) -> np.ndarray:
    """Where ``since <= time < until`` (either bound may be None)."""
    keep = np.ones(len(times), dtype=bool)
    if since is not None:
        keep &= times >= since
    if until is not None:
        keep &= times < until
    return keep


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


def _archive_chunks(url: str, since: float | None, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The archive's events and their keys (``stream``, ``stream_id``), of the days from
    ``since``'s on, in batches, rows numbered on across batches. A day is when the
    service received the events: never before their timestamp, unless a client's clock
    runs ahead.

    Rows come file by file: day, then stream, then stream id, so each user's events
    keep the order the service took them in. An entry stored twice (a Redis that came
    back with older state delivered it again) comes twice; its copies share their key,
    and the readers keep the first (:func:`read_log`, ``EventTable.number``).
    """
    import pyarrow.dataset as ds

    dataset = open_archive(url)
    where = None
    if since is not None:
        where = ds.field("date") >= datetime.fromtimestamp(since, UTC).strftime("%Y-%m-%d")
    offset = 0
    with archive_errors(url):
        for batch in dataset.to_batches(
            columns=[*ARCHIVE_COLUMNS, *ARCHIVE_KEY], filter=where, batch_size=chunk_rows
        ):
            frame = batch.to_pandas()
            frame.index = pd.RangeIndex(offset, offset + len(frame))
            offset += len(frame)
            yield frame


def _note(reasons: np.ndarray, mask: np.ndarray, reason: str) -> None:
    """Give ``reason`` to the rows in ``mask`` that have none yet."""
    reasons[mask & (reasons == "")] = reason


def _where(path: str | Path, row: int, is_csv: bool) -> str:
    return f"{path}:{row + 2}: " if is_csv else f"{path}: row {row + 1}: "  # CSV line 1 is the header


def _table_chunks(path: Path, chunk_rows: int) -> tuple[Iterator[pd.DataFrame], bool]:
    """The file's rows in chunks, as strings (CSV) or typed columns (Parquet), each chunk
    indexed by its rows' place in the file; and whether it is CSV."""
    if not path.is_file():
        raise DataError("no such file", path)
    suffix = Path(path.name.lower().removesuffix(".gz")).suffix
    is_csv = suffix in CSV_SEPARATORS
    if not is_csv and not path.name.lower().endswith(PARQUET_SUFFIXES):
        raise DataError("unknown file type: expected .csv, .tsv, .csv.gz, .tsv.gz, .parquet or .pq", path)
    if path.stat().st_size == 0:
        raise DataError("the file is empty", path)
    return (_csv_chunks if is_csv else _parquet_chunks)(path, chunk_rows), is_csv


def _csv_chunks(path: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The CSV's rows as strings, numbered on across chunks (a chunk's index is its rows' place)."""
    sep = CSV_SEPARATORS[Path(path.name.lower().removesuffix(".gz")).suffix]
    with _reading(path):
        with _strict_csv():
            chunks = pd.read_csv(
                path, sep=sep, dtype=str, keep_default_na=False, index_col=False, chunksize=chunk_rows
            )
        with chunks:
            while True:
                with _strict_csv():  # only around pandas' own work: this generator pauses between
                    chunk = next(chunks, None)
                if chunk is None:
                    return
                yield chunk


@contextmanager
def _strict_csv() -> Iterator[None]:
    """pandas' warning that the first row is longer than the header, raised."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.ParserWarning)
        yield


def _parquet_chunks(path: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    import pyarrow.parquet as pq

    offset = 0
    with _reading(path):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows):
            frame = batch.to_pandas()
            frame.index = pd.RangeIndex(offset, offset + len(frame))
            offset += len(frame)
            yield frame


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """pandas' and pyarrow's errors while reading ``path``, as a DataError naming it."""
    try:
        yield
    except pd.errors.EmptyDataError:
        raise DataError("the file is empty", path) from None
    except pd.errors.ParserWarning:
        raise DataError("cannot read the file: a row has more fields than the header", path) from None
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"cannot read the file: {e}", path) from None


def _seconds(col: pd.Series, kind: str | None = None) -> tuple[np.ndarray, np.ndarray, str, str | None]:
    """Timestamps to seconds: (values, mask of unusable rows, the reason with {value}, the kind).

    Numbers are kept; strings are numbers or ISO-8601 dates, as ``kind`` says ("number"
    or "date"), or, while it is None, as the first usable row is.
    """
    if pd.api.types.is_datetime64_any_dtype(col):
        epoch = pd.Timestamp(0, tz="UTC") if col.dt.tz is not None else pd.Timestamp(0)
        col = (col - epoch) / pd.Timedelta(seconds=1)
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        values = col.to_numpy(dtype=float, na_value=np.nan)
        return values, ~np.isfinite(values), "missing or infinite timestamp {value!r}", kind
    text = col.astype(str).str.strip()
    numbers = pd.to_numeric(text, errors="coerce").to_numpy(dtype=float)
    from_dates = np.full(len(text), np.nan)
    words = ~np.isfinite(numbers)  # "1000" is a number, never the year 1000
    from_dates[words] = _iso_seconds(text[words])
    if kind is None:  # the first usable row decides
        first_number, first_date = _first(np.isfinite(numbers)), _first(np.isfinite(from_dates))
        if first_number is not None and (first_date is None or first_number <= first_date):
            kind = "number"
        elif first_date is not None:
            kind = "date"
    if kind == "number":
        return (
            numbers,
            ~np.isfinite(numbers),
            "timestamp {value!r} is not a number, unlike the first row's",
            kind,
        )
    return (
        from_dates,
        ~np.isfinite(from_dates),
        "timestamp {value!r} is neither a number nor an ISO-8601 date",
        kind,
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


def prepare(
    log_path: str | Path, out_dir: str | Path, config: PrepareConfig | None = None
) -> dict[str, int | str]:
    """Turn an interaction log into ``sequences.txt``, ``users.json`` and ``items.json``.

    Each user's interactions are sorted by time; ties keep their order in the file.
    Every user left has at least 3 interactions (the leave-one-out split needs them):
    k >= 3 guarantees it, and for smaller k the users with fewer are dropped too
    (again to a fixed point), counted as ``users_dropped_short`` in the summary.
    The log is read chunk by chunk into an on-disk table (:mod:`event_table`), so
    memory stays within ``config.memory_gb`` and a chunk, whatever the log's size.

    Returns:
        A summary: ``log``, ``k``, ``raw_rows``, ``rows_skipped`` and ``skipped_sample``
        (where and why, for the first few), ``copies_dropped`` (an archive's entries
        stored twice), ``users_before``, ``items_before``, ``actions_before``,
        ``users_after``, ``items_after``, ``actions_after``, ``users_dropped_short``.

    Raises:
        DataError: for a bad log (see :func:`read_log`) or fewer than ``min_users`` users left.
    """
    from mqsa.training.event_table import EventTable

    config = config or PrepareConfig()
    since, until = (
        None if text is None else parse_time(text, name=f"--{name}")
        for name, text in (("since", config.since), ("until", config.until))
    )
    types = frozenset(t.strip() for t in config.event_types.split(",") if t.strip()) or None
    columns = (config.user_col, config.item_col, config.time_col)
    reader = LogReader(log_path, columns, since, until, types)
    with EventTable(config.memory_gb, config.temp_dir or None) as table:
        for frame in reader:
            table.append(frame)
        reader.check(config.max_skipped_fraction)
        copies = table.number()
        before = table.counts()
        after, dropped_short = _kcore(table, config.k)
        if after.users < config.min_users:
            raise DataError(
                f"too few users left after {config.k}-core filtering: {after.users} "
                f"(need at least {config.min_users})",
                log_path,
            )
        user_ids, item_ids = table.write(Path(out_dir) / "sequences.txt")
    write_json_atomic(Path(out_dir) / "users.json", {"format": 1, "user_ids": user_ids})
    Vocabulary(item_ids).save(Path(out_dir) / "items.json")
    read = {"log": str(log_path), "k": config.k, "raw_rows": reader.rows, "rows_skipped": reader.skipped}
    return {
        **read,
        "window": {"since": since, "until": until},
        "skipped_sample": reader.sample,
        "copies_dropped": copies,
        **{f"{name}_before": value for name, value in vars(before).items()},
        **{f"{name}_after": value for name, value in vars(after).items()},
        "users_dropped_short": dropped_short,
    }


def _kcore(table: Any, k: int) -> tuple[Any, int]:
    """Filter ``table`` to the k-core whose users also have at least MIN_LENGTH events.

    Returns:
        The counts left, and the users the split's minimum dropped beyond the k-core.
    """
    if k >= MIN_LENGTH:
        table.kcore(k, k)
        return table.counts(), 0
    table.kcore(k, k)  # the k-core first: the stricter core lies inside it, so going on from it is exact
    in_core = table.counts().users
    table.kcore(k, MIN_LENGTH)
    after = table.counts()
    return after, in_core - after.users
