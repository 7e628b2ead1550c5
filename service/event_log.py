"""Export the event stream written by :class:`mqsa.service.store.HistoryStore` as a raw interaction log.

The CSV has the header ``user_id,item_id,timestamp,event_id,event_type,recommendation_id``
(one row per event in the stream, in stream order, quoted by the csv module where
needed; the service's impressions are left out: the archive keeps them), which the
training side's raw-log reader (``training/prepare.py``, ``read_log``) accepts as it
is: it needs ``user_id``, ``item_id`` and ``timestamp``, reads ``event_type`` when
``--event-types`` asks for some, and ignores the rest. Never imports torch, ``models`` or ``training``.
"""

from __future__ import annotations

import asyncio
import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from mqsa.errors import DataError
from mqsa.service.settings import IMPRESSION
from mqsa.service.store import as_text, connect, redis_errors

COLUMNS = ("user_id", "item_id", "timestamp", "event_id", "event_type", "recommendation_id")


async def export_events(
    redis: aioredis.Redis,
    stream_key: str | Sequence[str],
    out_path: str | Path,
    start: str = "-",
    count: int = 10_000,
    end: str = "+",
) -> int:
    """Page through the stream(s) with XRANGE and write their entries as a CSV log.

    Several streams (the store's buckets) are written one after the other; a
    user lives in one bucket, so each user's events keep their order, and
    ``mqsa data prepare`` orders every user's events by timestamp anyway.

    The file is written next to ``out_path`` and renamed over it at the end, so
    a failed export leaves no half-written log behind. A missing or empty stream
    gives a file with the header only.

    Args:
        redis: an asyncio client.
        stream_key: a stream or a list of them, e.g. ``HistoryStore.stream_keys``.
        out_path: the CSV to write (replaced).
        start: the first entry id to export (inclusive), ``-`` for the oldest.
        count: entries fetched per XRANGE call.
        end: the last entry id to export (inclusive), ``+`` for the newest.

    Returns:
        The number of rows written (the header not counted).

    Raises:
        ValueError: when ``count`` is below 1.
        DataError: ``out_path`` cannot be written (no such folder, no permission).
        StoreUnavailable: when Redis fails.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count!r}")
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    rows = 0
    try:
        f = tmp.open("w", newline="", encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot write here: {exc.strerror or exc}", out_path) from exc
    try:
        with f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            for key in [stream_key] if isinstance(stream_key, str) else stream_key:
                rows += await _write_stream(redis, key, writer, start, end, count)
        tmp.replace(out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return rows


async def _write_stream(
    redis: aioredis.Redis, key: str, writer: Any, start: str, end: str, count: int
) -> int:
    """Page through one stream with XRANGE, ``count`` entries a call; returns the rows written."""
    rows, low = 0, start
    while True:
        with redis_errors():
            entries = await redis.xrange(key, min=low, max=end, count=count)
        for _, fields in entries:
            fields = {as_text(k): as_text(v) for k, v in fields.items()}
            if fields.get("event_type") != IMPRESSION:
                writer.writerow([fields.get(column, "") for column in COLUMNS])
                rows += 1
        if len(entries) < count:
            return rows
        low = f"({as_text(entries[-1][0])}"  # exclusive: after the last entry read


def export_events_sync(
    url: str,
    stream_key: str | Sequence[str],
    out_path: str | Path,
    start: str = "-",
    count: int = 10_000,
    end: str = "+",
    timeout_seconds: float = 10.0,
    cluster: bool = False,
) -> int:
    """:func:`export_events` from synchronous code (a CLI, a cron job): connects, exports, closes.

    Args:
        url: the Redis URL, as for :func:`service.store.connect`.
        stream_key: a stream or a list of them.
        out_path: the CSV to write.
        start: the first entry id (inclusive).
        count: entries per XRANGE call.
        end: the last entry id (inclusive).
        timeout_seconds: the socket timeout; larger than the service's, pages are big.
        cluster: ``url`` names a node of a Redis Cluster.

    Returns:
        The number of rows written.

    Raises:
        StoreUnavailable: when Redis fails.
    """

    async def main() -> int:
        client = connect(url, timeout_seconds=timeout_seconds, max_connections=1, cluster=cluster)
        try:
            return await export_events(client, stream_key, out_path, start=start, count=count, end=end)
        finally:
            await client.aclose()

    return asyncio.run(main())
