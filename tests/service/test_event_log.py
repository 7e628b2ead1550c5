"""Exporting the event stream as a raw log that training's reader accepts."""

from __future__ import annotations

import asyncio
import csv

import pytest

from mqsa.errors import StoreUnavailable
from mqsa.service.event_log import export_events, export_events_sync
from mqsa.service.store import Event, HistoryStore, Impression, connect
from mqsa.training.prepare import read_log

EVENTS = [
    Event("alice", "a", timestamp=1_700_000_000.0, event_id="e1"),
    Event("bob", 'item, with "quotes"', timestamp=1_700_000_001.5),
    Event("alice", "b", timestamp=1_700_000_002.0, event_id="e2"),
    Event("alice", "a", timestamp=1_700_000_003.0, event_id="e1"),  # duplicate: not exported
    Event("carol", "c\nd", timestamp=1_700_000_004.25, event_id="x,y"),
]
EXPECTED = [  # stream order: grouped by user within the one request
    ("alice", "a", 1_700_000_000.0, "e1"),
    ("alice", "b", 1_700_000_002.0, "e2"),
    ("bob", 'item, with "quotes"', 1_700_000_001.5, ""),
    ("carol", "c\nd", 1_700_000_004.25, "x,y"),
]


def fill(url: str, prefix: str) -> str:
    """Append EVENTS through the store; returns the stream key."""

    async def main() -> str:
        client = connect(url, timeout_seconds=3.0)
        try:
            store = HistoryStore(client, prefix=prefix)
            await store.append(EVENTS)
            return store.stream_keys[0]
        finally:
            await client.aclose()

    return asyncio.run(main())


def export(url: str, stream_key: str, out, **kwargs) -> int:
    async def main() -> int:
        client = connect(url, timeout_seconds=3.0)
        try:
            return await export_events(client, stream_key, out, **kwargs)
        finally:
            await client.aclose()

    return asyncio.run(main())


@pytest.mark.parametrize("count", [10_000, 1, 2])
def test_export_writes_a_log_the_raw_reader_accepts(redis_url, key_prefix, tmp_path, count):
    stream_key = fill(redis_url, key_prefix)
    out = tmp_path / "log.csv"
    assert export(redis_url, stream_key, out, count=count) == len(EXPECTED)

    with out.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["user_id", "item_id", "timestamp", "event_id", "event_type", "recommendation_id"]
    assert [(u, i, float(t), e) for u, i, t, e, _, _ in rows[1:]] == EXPECTED
    assert {(kind, rec) for *_, kind, rec in rows[1:]} == {("view", "")}

    log = read_log(out).frame
    assert list(log["user_id"]) == [r[0] for r in EXPECTED]
    assert list(log["item_id"]) == [r[1] for r in EXPECTED]
    assert list(log["timestamp"]) == [r[2] for r in EXPECTED]
    assert not list(tmp_path.glob(".*.tmp"))


def test_export_from_a_start_id_and_the_sync_wrapper(redis_url, key_prefix, tmp_path):
    stream_key = fill(redis_url, key_prefix)

    async def ids() -> list[str]:
        client = connect(redis_url, timeout_seconds=3.0)
        try:
            return [entry_id for entry_id, _ in await client.xrange(stream_key)]
        finally:
            await client.aclose()

    entry_ids = asyncio.run(ids())
    out = tmp_path / "tail.csv"
    assert export_events_sync(redis_url, stream_key, out, start=entry_ids[2], count=1) == 2
    assert list(read_log(out).frame["user_id"]) == ["bob", "carol"]


def test_export_of_a_missing_stream_writes_the_header_only(redis_url, key_prefix, tmp_path):
    out = tmp_path / "empty.csv"
    assert export(redis_url, f"{key_prefix}:events", out) == 0
    assert out.read_bytes() == b"user_id,item_id,timestamp,event_id,event_type,recommendation_id\r\n"


def test_export_with_redis_down_raises_and_leaves_no_file(redis_server_factory, tmp_path):
    server = redis_server_factory()
    server.stop()
    out = tmp_path / "log.csv"
    with pytest.raises(StoreUnavailable):
        export_events_sync(server.url, "t:events", out, timeout_seconds=0.5)
    assert not list(tmp_path.iterdir())


def test_export_reads_every_bucket_stream(redis_url, key_prefix, tmp_path):
    """With several buckets, every stream is exported and each user's events keep their order."""

    async def main() -> tuple[list[str], int]:
        client = connect(redis_url, timeout_seconds=3.0)
        try:
            store = HistoryStore(client, prefix=key_prefix, stream_shards=4)
            await store.append([Event(f"u{n % 7}", f"i{n}", timestamp=1000.0 + n) for n in range(40)])
            used = sum([await client.xlen(k) > 0 for k in store.stream_keys])
            return store.stream_keys, used
        finally:
            await client.aclose()

    keys, used = asyncio.run(main())
    assert used > 1
    out = tmp_path / "all.csv"
    assert export_events_sync(redis_url, keys, out) == 40
    log = read_log(out).frame
    for user, rows in log.groupby("user_id", sort=False):
        assert list(rows["item_id"]) == [f"i{n}" for n in range(40) if f"u{n % 7}" == user]


def test_export_leaves_impressions_out_and_keeps_types(redis_url, key_prefix, tmp_path):
    async def main() -> str:
        client = connect(redis_url, timeout_seconds=3.0)
        try:
            store = HistoryStore(client, prefix=key_prefix)
            rec = "0123456789abcdef-019ad3f2a1c0-7c1e02ab"
            served = Impression("alice", rec, "0123456789abcdef", "served", "recommend", ["a", "b"], 0.001)
            await store.log_impressions([served], 1_700_000_000.0)
            await store.append([Event("alice", "a", 1_700_000_001.0, None, "click", rec)])
            return store.stream_keys[0]
        finally:
            await client.aclose()

    stream_key = asyncio.run(main())
    out = tmp_path / "log.csv"
    assert export(redis_url, stream_key, out) == 1
    with out.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[1:] == [["alice", "a", "1700000001.0", "", "click", "0123456789abcdef-019ad3f2a1c0-7c1e02ab"]]
