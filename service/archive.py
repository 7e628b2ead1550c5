"""The durable event archive: the service's event streams -> date-partitioned Parquet files.

``mqsa events archive --to URL`` reads every bucket's stream through the Redis
consumer group ``archive`` and appends Parquet files under ``URL`` (a local path or
any fsspec URL: ``s3://…``, ``gs://…``)::

    URL/date=2026-11-30/mqsa_b3_events_1764480000000-0_1764480001234-5.parquet

One file holds a run of consecutive entries of one stream (first and last stream id
in its name), partitioned by the UTC day Redis accepted them (the stream id's time,
not the client's timestamp). Columns: ``user_id``, ``item_id``, ``timestamp`` (the
event's, seconds), ``event_id`` (null when the client sent none), ``event_type``
(``impression`` for a served list; null in entries from before typed events, read as
``view``), ``recommendation_id``, and for impressions ``items`` (the list, in order),
``model_version``, ``route`` and ``mode`` (docs/feedback.md); then ``stream``,
``stream_id`` and ``extra`` (any other field of the entry, as JSON; null when none):
nothing the service wrote is dropped.

Exactly once, whatever the crash point (:meth:`Archiver.archive_stream`):

1. read entries with ``XREADGROUP … >`` (Redis records them as pending for the
   consumer ``archiver``);
2. write them as one file and make it durable (local: a hidden temporary file,
   ``fsync``, rename, ``fsync`` of the folder; object stores: one PUT, which is atomic);
3. ``XACK`` them, then trim the stream below the group's oldest pending entry.

A crash before 2 leaves the entries pending: every pass first reads this consumer's
pending entries (``XREADGROUP … 0``) before new ones. A crash between 2 and 3 leaves a
file *and* pending entries: the pass lists the files of the partitions from the oldest
pending entry's day on, acknowledges the pending entries that lie inside some file's id
range (a file holds every entry between its first and last id) without writing them
again, and archives the rest.

That is exactly once across crashes of the archiver. A Redis that comes back with
older state (an AOF ``everysec`` restart, a failover to a lagging replica) may deliver
entries again that a file already holds; readers drop such copies by
``(stream, stream_id)`` (``training/prepare.py``, ``read_log``; ``training/event_table.py``).

The service trims nothing while ``MQSA_STREAM_ARCHIVE`` is on (``service/store.py``):
only the archiver removes entries, and only acknowledged ones. If the archiver falls
behind or stops, the streams grow (bounded by Redis's ``maxmemory``; with
``noeviction`` /events then answers 503) and ``/readyz`` and the
``mqsa_archive_backlog_events`` metric say how many events wait. Run one archiver per
deployment (``deploy/base/archiver-deployment.yaml``: one replica, ``Recreate``).

Never imports torch, ``models`` or ``training``; needs pyarrow and fsspec (the
``train`` extra: the archiver runs in the trainer image).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import signal
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import redis.asyncio as aioredis
from fsspec.implementations.local import LocalFileSystem
from redis import exceptions as redis_exceptions

from mqsa.errors import ConfigError, DataError
from mqsa.service.store import as_text, redis_errors

log = logging.getLogger("mqsa.archive")

GROUP = "archive"
CONSUMER = "archiver"
TEXT_FIELDS = ("event_type", "recommendation_id", "model_version", "route", "mode")  # "" -> null
KNOWN_FIELDS = frozenset({"user_id", "item_id", "timestamp", "event_id", "items", *TEXT_FIELDS})
SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("timestamp", pa.float64()),
        ("event_id", pa.string()),
        ("event_type", pa.string()),
        ("recommendation_id", pa.string()),
        ("items", pa.list_(pa.string())),
        ("model_version", pa.string()),
        ("route", pa.string()),
        ("mode", pa.string()),
        ("stream", pa.string()),
        ("stream_id", pa.string()),
        ("extra", pa.string()),
    ]
)
FILE_NAME = re.compile(r"^(?P<tag>.+)_(?P<first>\d+-\d+)_(?P<last>\d+-\d+)\.parquet$")

Entry = tuple[str, dict[str, str]]  # (stream id, fields)


def stream_id_key(stream_id: str) -> tuple[int, int]:
    """``"1764480000000-5"`` -> ``(1764480000000, 5)``: stream ids in their order."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def day_of(stream_id: str) -> str:
    """The UTC day Redis accepted the entry: ``2026-11-30``."""
    return datetime.fromtimestamp(stream_id_key(stream_id)[0] / 1000, tz=UTC).strftime("%Y-%m-%d")


def stream_tag(stream_key: str) -> str:
    """The stream key as it appears in file names: ``mqsa:{b3}:events`` -> ``mqsa_b3_events``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", stream_key).strip("_")


def to_table(stream_key: str, entries: list[Entry]) -> pa.Table:
    """Entries of one stream as a table in :data:`SCHEMA`.

    A timestamp that is not a number, or an impression's ``items`` that are not a JSON
    list of strings, becomes null, and its text is kept in ``extra``.
    """
    fields = [f for _, f in entries]
    stamps, lists, extra = [], [], []
    for f in fields:
        rest = {k: f[k] for k in f.keys() - KNOWN_FIELDS}
        try:
            stamps.append(float(f["timestamp"]))
        except (KeyError, ValueError):
            stamps.append(None)
            if "timestamp" in f:
                rest["timestamp"] = f["timestamp"]
        lists.append(_items(f, rest))
        extra.append(json.dumps(rest, sort_keys=True) if rest else None)
    columns = {
        "user_id": [f.get("user_id") for f in fields],
        "item_id": [f.get("item_id") for f in fields],
        "timestamp": stamps,
        "event_id": [f.get("event_id") or None for f in fields],
        **{name: [f.get(name) or None for f in fields] for name in TEXT_FIELDS},
        "items": lists,
        "stream": [stream_key] * len(entries),
        "stream_id": [i for i, _ in entries],
        "extra": extra,
    }
    return pa.table(columns, schema=SCHEMA)


def _items(f: dict[str, str], rest: dict[str, str]) -> list[str] | None:
    """An impression's item ids (a JSON list in the stream), or None; anything else goes to ``rest``."""
    if "items" not in f:
        return None
    try:
        items = json.loads(f["items"])
    except ValueError:
        items = None
    if isinstance(items, list) and all(isinstance(i, str) for i in items):
        return items
    rest["items"] = f["items"]
    return None


class ArchiveSink:
    """Where the files go: a local folder or an fsspec URL; writes each file durably, once.

    Args:
        url: a local path or an fsspec URL (``s3://bucket/events``, ``memory://x``).

    Raises:
        DataError: the URL's filesystem is unknown or its library is not installed.
    """

    def __init__(self, url: str) -> None:
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as exc:
            raise DataError(f"cannot open the archive: {exc}", url) from exc
        self.url = url
        self.local = isinstance(self.fs, LocalFileSystem)
        try:
            self.fs.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise DataError(f"cannot write the archive here: {exc.strerror or exc}", url) from exc

    def path(self, day: str, name: str = "") -> str:
        return f"{self.root.rstrip('/')}/date={day}" + (f"/{name}" if name else "")

    def write(self, day: str, name: str, table: pa.Table) -> str:
        """Write ``table`` as ``date=day/name``; when this returns, the file survives a crash."""
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        data = buffer.getvalue()
        folder, path = self.path(day), self.path(day, name)
        if not self.local:  # object stores: one PUT is atomic, and durable when it returns
            self.fs.pipe_file(path, data)
            return path
        os.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"  # hidden: dataset readers skip it
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(folder, os.O_RDONLY)  # the rename itself must reach the disk
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return path

    def archived_ranges(self, tag: str, since_day: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """The (first, last) stream ids of stream ``tag``'s files in the partitions from ``since_day``
        on. A file holds every entry of the stream between its first and last id."""
        ranges = []
        for folder in self._ls(self.root):
            day = folder.rstrip("/").rsplit("/", 1)[-1].removeprefix("date=")
            if not folder.rstrip("/").endswith(f"date={day}") or day < since_day:
                continue
            for path in self._ls(folder):
                match = FILE_NAME.match(path.rsplit("/", 1)[-1])
                if match and match["tag"] == tag:
                    ranges.append((stream_id_key(match["first"]), stream_id_key(match["last"])))
        return ranges

    def _ls(self, folder: str) -> list[str]:
        try:
            return self.fs.ls(folder, detail=False)
        except FileNotFoundError:  # object stores: an empty prefix does not exist
            return []


@dataclass
class PassResult:
    """What one pass over the streams did."""

    archived: int = 0  # entries written to new files
    already: int = 0  # pending entries found already archived (a crash after the write)
    files: int = 0


class Archiver:
    """Moves the streams' entries into an :class:`ArchiveSink`, exactly once.

    Args:
        redis: an asyncio client (``decode_responses=True``, as :func:`service.store.connect` makes).
        streams: the stream keys (``service.store.stream_keys(prefix, shards)``).
        sink: where the files go.
        batch: the most entries per file.
        on_written: called with each file's path after it is durable and before its
            entries are acknowledged (tests use it to crash at that point).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        streams: list[str],
        sink: ArchiveSink,
        batch: int = 10_000,
        on_written: Callable[[str], None] | None = None,
    ) -> None:
        if batch < 1:
            raise ConfigError(f"--batch must be at least 1, got {batch!r}")
        self.redis, self.streams, self.sink, self.batch = redis, list(streams), sink, batch
        self.on_written = on_written
        self._grouped: set[str] = set()  # streams whose group this process has made sure of

    async def run_once(self, stop: asyncio.Event | None = None) -> PassResult:
        """Archive everything in every stream now (pending entries first), then return; with
        ``stop``, return after the batch under way once it is set."""
        result = PassResult()
        for key in self.streams:
            await self.archive_stream(key, result, stop)
        return result

    async def run(self, poll_seconds: float, stop: asyncio.Event) -> PassResult:
        """Pass after pass until ``stop`` is set, resting ``poll_seconds`` after a pass that found
        nothing; returns what all passes did together."""
        total = PassResult()
        while not stop.is_set():
            result = await self.run_once(stop)
            total.archived += result.archived
            total.already += result.already
            total.files += result.files
            if result.archived or result.already:
                log.info("archived %d events in %d files", result.archived, result.files)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll_seconds)
        return total

    async def archive_stream(self, key: str, result: PassResult, stop: asyncio.Event | None = None) -> None:
        """Archive one stream: its pending entries (left by a crash, or by a failover to a replica
        that missed an acknowledgement), then new ones until none is left or ``stop`` is set."""
        if key not in self._grouped:
            await self._ensure_group(key)
            self._grouped.add(key)
        while (entries := await self._read(key, "0")) is not None:
            if entries:
                await self._recover(key, entries, result)
        while not (stop and stop.is_set()) and (entries := await self._read(key, ">")):
            await self._store(key, entries, result)

    async def _ensure_group(self, key: str) -> None:
        """Create the group at the stream's start (an existing stream is archived whole)."""
        try:
            with redis_errors():
                await self.redis.xgroup_create(key, GROUP, id="0", mkstream=True)
        except redis_exceptions.ResponseError as exc:  # redis_errors lets replies through
            if "BUSYGROUP" not in str(exc):
                raise

    async def _read(self, key: str, start: str) -> list[Entry] | None:
        """Up to ``batch`` entries from ``start`` ("0": this consumer's pending ones, ">": new
        ones); None when Redis had none, [] when all it had were deleted entries."""
        try:
            with redis_errors():
                reply = await self.redis.xreadgroup(GROUP, CONSUMER, {key: start}, count=self.batch)
        except redis_exceptions.ResponseError as exc:
            if "NOGROUP" not in str(exc):  # Redis lost its data (restart without persistence)
                raise
            log.warning("the group on %s is gone (Redis lost its data?): creating it again", key)
            await self._ensure_group(key)
            return None
        entries = reply[0][1] if reply else []
        if not entries:
            return None
        gone = [as_text(i) for i, f in entries if not f]
        if gone:  # pending, but deleted from the stream by someone else: nothing left to keep
            log.warning("%d pending entries of %s were deleted before they were archived", len(gone), key)
            with redis_errors():
                await self.redis.xack(key, GROUP, *gone)
        if isinstance(entries[0][0], str):  # decode_responses=True, as connect() makes it
            return [(i, f) for i, f in entries if f]
        return [(as_text(i), {as_text(k): as_text(v) for k, v in f.items()}) for i, f in entries if f]

    async def _recover(self, key: str, entries: list[Entry], result: PassResult) -> None:
        """Pending entries (a crash, a failover): acknowledge those a file already holds, store the
        rest. Held means inside some file's id range, not below the newest id: an entry another
        process left pending below a newer file was never written."""
        ranges = await asyncio.to_thread(self.sink.archived_ranges, stream_tag(key), day_of(entries[0][0]))
        keys = [stream_id_key(i) for i, _ in entries]
        held = [any(lo <= key <= hi for lo, hi in ranges) for key in keys]
        done = [i for (i, _), h in zip(entries, held, strict=True) if h]
        if done:
            log.info("%d pending entries of %s were archived before a crash", len(done), key)
            await self._ack(key, done)
            result.already += len(done)
        rest = [e for e, h in zip(entries, held, strict=True) if not h]
        if rest:
            await self._store(key, rest, result)

    async def _store(self, key: str, entries: list[Entry], result: PassResult) -> None:
        """One file per day the entries span (in id order), then acknowledge and trim."""
        days: dict[str, list[Entry]] = {}
        day_ms, run_day, run = 86_400_000, -1, []  # ids ascend: a new day starts a new run
        for entry in entries:
            day = int(entry[0].partition("-")[0]) // day_ms
            if day != run_day:
                run_day, run = day, days.setdefault(day_of(entry[0]), [])
            run.append(entry)
        tag = stream_tag(key)
        for day, run in days.items():
            name = f"{tag}_{run[0][0]}_{run[-1][0]}.parquet"
            path = await asyncio.to_thread(self.sink.write, day, name, to_table(key, run))
            result.files += 1
            if self.on_written:
                self.on_written(path)
        await self._ack(key, [i for i, _ in entries])
        result.archived += len(entries)

    async def _ack(self, key: str, ids: list[str]) -> None:
        """Acknowledge, then drop every entry below the group's oldest unacknowledged one."""
        with redis_errors():
            await self.redis.xack(key, GROUP, *ids)
            summary = await self.redis.xpending(key, GROUP)
            if summary["pending"]:
                floor = as_text(summary["min"])
            else:
                groups = await self.redis.xinfo_groups(key)
                (group,) = [g for g in groups if as_text(g["name"]) == GROUP]
                delivered = as_text(group["last-delivered-id"])
                ms, seq = stream_id_key(delivered)
                floor = f"{ms}-{seq + 1}"
            await self.redis.xtrim(key, minid=floor, approximate=False)


def run_archiver(
    url: str,
    streams: list[str],
    to: str,
    batch: int = 10_000,
    poll_seconds: float | None = 1.0,
    cluster: bool = False,
) -> PassResult:
    """``mqsa events archive``: connect, archive until SIGTERM/SIGINT (or once), close.

    Args:
        url: the Redis URL.
        streams: the stream keys.
        to: the archive's folder or fsspec URL.
        batch: the most entries per file.
        poll_seconds: rest after an empty pass; None: one pass over everything, then return.
        cluster: ``url`` names a Redis Cluster node.

    Returns:
        What the passes did together.

    Raises:
        DataError: the archive cannot be opened.
        StoreUnavailable: when Redis fails.
    """
    from mqsa.service.store import connect

    sink = ArchiveSink(to)

    async def main() -> PassResult:
        client = connect(url, timeout_seconds=30.0, max_connections=2, cluster=cluster)
        archiver = Archiver(client, streams, sink, batch=batch)
        try:
            if poll_seconds is None:
                return await archiver.run_once()
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            log.info("archiving %d streams to %s", len(streams), to)
            return await archiver.run(poll_seconds, stop)
        finally:
            await client.aclose()

    return asyncio.run(main())
