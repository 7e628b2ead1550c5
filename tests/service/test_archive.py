"""The durable event archive: streams -> Parquet, exactly once, whatever the crash point."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import redis as sync_redis
from fastapi.testclient import TestClient

from mqsa.cli import main as cli_main
from mqsa.service.app import create_app
from mqsa.service.archive import Archiver, ArchiveSink, PassResult, stream_tag
from mqsa.service.settings import Settings
from mqsa.service.store import Event, HistoryStore, Impression, connect, stream_keys

ROOT = Path(__file__).resolve().parents[2]


def rows_in(folder: Path | str) -> list[dict]:
    """Every archived row, in (stream, stream id) order; hidden temporary files are not read."""
    table = ds.dataset(str(folder), format="parquet", partitioning="hive").to_table()
    rows = table.to_pylist()
    return sorted(rows, key=lambda r: (r["stream"], tuple(int(x) for x in r["stream_id"].split("-"))))


def append(url: str, prefix: str, events: list[Event], shards: int = 4, archive: bool = True) -> int:
    async def main() -> int:
        client = connect(url, timeout_seconds=3.0)
        try:
            store = HistoryStore(
                client, prefix=prefix, stream_shards=shards, stream_archive=archive, stream_maxlen=1
            )
            return (await store.append(events)).accepted
        finally:
            await client.aclose()

    return asyncio.run(main())


def archive_once(url: str, prefix: str, to: str, shards: int = 4, batch: int = 10_000, on_written=None):
    async def main():
        client = connect(url, timeout_seconds=3.0)
        try:
            archiver = Archiver(
                client, stream_keys(prefix, shards), ArchiveSink(to), batch=batch, on_written=on_written
            )
            return await archiver.run_once()
        finally:
            await client.aclose()

    return asyncio.run(main())


def stream_lengths(url: str, prefix: str, shards: int = 4) -> int:
    client = sync_redis.Redis.from_url(url)
    try:
        return sum(client.xlen(key) for key in stream_keys(prefix, shards))
    finally:
        client.close()


def events(n: int, start: int = 0) -> list[Event]:
    return [
        Event(f"u{i % 13}", f"i{i % 29}", timestamp=1_700_000_000.0 + i, event_id=f"e{i}")
        for i in range(start, start + n)
    ]


def test_every_event_is_archived_once_with_its_fields_and_the_streams_are_emptied(
    redis_url, key_prefix, tmp_path
):
    assert append(redis_url, key_prefix, events(100)) == 100
    result = archive_once(redis_url, key_prefix, str(tmp_path), batch=7)
    assert (result.archived, result.already) == (100, 0)
    rows = rows_in(tmp_path)
    assert sorted(r["event_id"] for r in rows) == sorted(f"e{i}" for i in range(100))
    by_event = {r["event_id"]: r for r in rows}
    assert by_event["e42"]["user_id"] == "u3" and by_event["e42"]["item_id"] == "i13"
    assert by_event["e42"]["timestamp"] == 1_700_000_042.0
    assert by_event["e42"]["extra"] is None
    assert by_event["e42"]["date"] == time.strftime("%Y-%m-%d", time.gmtime())  # the day Redis took it
    assert stream_lengths(redis_url, key_prefix) == 0  # trimmed once stored
    assert archive_once(redis_url, key_prefix, str(tmp_path)).archived == 0
    assert not list(tmp_path.rglob(".*.tmp"))


def test_the_service_never_trims_an_archived_stream(redis_url, key_prefix):
    """With MQSA_STREAM_ARCHIVE the service writes past stream_maxlen (here 1) and drops nothing;
    without it the stream is capped (the reason the archive must own the trim)."""
    assert append(redis_url, key_prefix, events(300), shards=1, archive=True) == 300
    assert stream_lengths(redis_url, key_prefix, shards=1) == 300
    other = f"{key_prefix}:capped"
    append(redis_url, other, events(300), shards=1, archive=False)
    assert stream_lengths(redis_url, other, shards=1) < 300


def test_fields_the_archive_does_not_know_are_kept_in_extra(redis_url, key_prefix, tmp_path):
    key = stream_keys(key_prefix, 1)[0]
    client = sync_redis.Redis.from_url(redis_url)
    try:
        client.xadd(key, {"user_id": "u", "item_id": "i", "timestamp": "soon", "channel": "app"})
        client.xadd(key, {"user_id": "u", "item_id": "", "event_type": "impression", "items": "not json"})
    finally:
        client.close()
    archive_once(redis_url, key_prefix, str(tmp_path), shards=1)
    row, impression = rows_in(tmp_path)
    assert row["timestamp"] is None and row["event_id"] is None and row["event_type"] is None
    assert json.loads(row["extra"]) == {"channel": "app", "timestamp": "soon"}
    assert impression["items"] is None and json.loads(impression["extra"]) == {"items": "not json"}


def test_impressions_and_typed_events_have_their_columns(redis_url, key_prefix, tmp_path):
    """What docs/feedback.md promises the archive holds: an impression's list, model and route,
    an event's type and recommendation id, as columns."""

    async def main() -> None:
        client = connect(redis_url, timeout_seconds=3.0)
        try:
            store = HistoryStore(client, prefix=key_prefix, stream_shards=1, stream_archive=True)
            rec = "0123456789abcdef-019ad3f2a1c0-7c1e02ab"
            imp = Impression("u", rec, "0123456789abcdef", "served", "recommend", ["a", "b,c"], 0.002)
            await store.log_impressions([imp], 1_764_480_000.0)
            await store.append([Event("u", "b,c", 1_764_480_001.0, "e1", "purchase", rec)])
        finally:
            await client.aclose()

    asyncio.run(main())
    archive_once(redis_url, key_prefix, str(tmp_path), shards=1)
    impression, purchase = rows_in(tmp_path)
    assert impression["event_type"] == "impression" and impression["items"] == ["a", "b,c"]
    assert (impression["model_version"], impression["route"], impression["mode"]) == (
        "0123456789abcdef",
        "recommend",
        "served",
    )
    assert impression["recommendation_id"] == purchase["recommendation_id"]
    assert purchase["event_type"] == "purchase" and purchase["item_id"] == "b,c"
    assert purchase["items"] is None and purchase["extra"] is None


def test_a_crash_after_the_write_and_before_the_ack_doubles_nothing(redis_url, key_prefix, tmp_path):
    """The dangerous point: the file is durable, Redis still lists its entries as pending."""
    append(redis_url, key_prefix, events(50))

    class Crash(Exception):
        pass

    def crash(path: str) -> None:
        raise Crash(path)

    with pytest.raises(Crash):
        archive_once(redis_url, key_prefix, str(tmp_path), batch=10, on_written=crash)
    assert len(rows_in(tmp_path)) == 10  # one file made it
    assert stream_lengths(redis_url, key_prefix) == 50  # nothing trimmed: nothing acknowledged
    result = archive_once(redis_url, key_prefix, str(tmp_path), batch=10)
    assert (result.already, result.archived) == (10, 40)
    rows = rows_in(tmp_path)
    assert sorted(r["event_id"] for r in rows) == sorted(f"e{i}" for i in range(50))
    assert stream_lengths(redis_url, key_prefix) == 0


def test_a_crash_before_the_write_keeps_the_entries_in_redis(redis_url, key_prefix, tmp_path):
    append(redis_url, key_prefix, events(30))

    class Broken(ArchiveSink):
        def write(self, day, name, table):
            raise OSError("disk full")

    async def broken() -> None:
        client = connect(redis_url, timeout_seconds=3.0)
        try:
            await Archiver(client, stream_keys(key_prefix, 4), Broken(str(tmp_path))).run_once()
        finally:
            await client.aclose()

    with pytest.raises(OSError, match="disk full"):
        asyncio.run(broken())
    assert stream_lengths(redis_url, key_prefix) == 30
    assert archive_once(redis_url, key_prefix, str(tmp_path)).archived == 30
    assert len(rows_in(tmp_path)) == 30


def test_an_fsspec_url_is_an_archive_too(redis_url, key_prefix):
    append(redis_url, key_prefix, events(20))
    url = f"memory://archive-{uuid.uuid4().hex}"
    assert archive_once(redis_url, key_prefix, url, batch=6).archived == 20
    sink = ArchiveSink(url)
    names = [
        p.rsplit("/", 1)[-1]
        for day in sink.fs.ls(sink.root, detail=False)
        for p in sink.fs.ls(day, detail=False)
    ]
    assert len(names) == sum((n + 5) // 6 for n in per_stream(redis_url, key_prefix, url))
    assert all(n.endswith(".parquet") and not n.startswith(".") for n in names)


def per_stream(redis_url: str, key_prefix: str, url: str) -> list[int]:
    """How many rows each stream has in the archive at ``url``."""
    sink = ArchiveSink(url)
    table = ds.dataset(sink.root, filesystem=sink.fs, format="parquet", partitioning="hive").to_table()
    counts: dict[str, int] = {}
    for stream in table.column("stream").to_pylist():
        counts[stream] = counts.get(stream, 0) + 1
    return list(counts.values())


def test_a_redis_that_lost_its_data_gets_its_group_back(redis_url, key_prefix, tmp_path):
    append(redis_url, key_prefix, events(10))
    archive_once(redis_url, key_prefix, str(tmp_path))
    client = sync_redis.Redis.from_url(redis_url)
    try:
        client.delete(*stream_keys(key_prefix, 4))  # as a restart without persistence would
    finally:
        client.close()
    append(redis_url, key_prefix, events(10, start=10))
    archive_once(redis_url, key_prefix, str(tmp_path))
    assert sorted(r["event_id"] for r in rows_in(tmp_path)) == sorted(f"e{i}" for i in range(20))


def test_the_file_names_say_stream_and_ids(redis_url, key_prefix, tmp_path):
    append(redis_url, key_prefix, events(5), shards=1)
    archive_once(redis_url, key_prefix, str(tmp_path), shards=1)
    (path,) = tmp_path.rglob("*.parquet")
    ids = [r["stream_id"] for r in rows_in(tmp_path)]
    assert path.name == f"{stream_tag(stream_keys(key_prefix, 1)[0])}_{ids[0]}_{ids[-1]}.parquet"


def test_readyz_reports_the_backlog_the_archiver_has_not_stored(bundle_dir, redis_url, key_prefix, tmp_path):
    settings = Settings(
        bundle_dir=bundle_dir, redis_url=redis_url, redis_prefix=key_prefix, stream_archive=True
    )
    items = json.loads((bundle_dir / "items.json").read_text())["item_ids"]
    with TestClient(create_app(settings)) as client:
        r = client.post(
            "/events", json={"events": [{"user_id": f"u{i}", "item_id": items[i]} for i in range(7)]}
        )
        assert r.status_code == 200
        assert client.get("/readyz").json()["archive_backlog"] == 7
        assert "mqsa_archive_backlog_events 7.0" in client.get("/metrics").text
        archive_once(redis_url, key_prefix, str(tmp_path), shards=settings.stream_shards)
        assert client.get("/readyz").json()["archive_backlog"] == 0


def test_the_cli_archives_once(redis_url, key_prefix, tmp_path, capsys):
    append(redis_url, key_prefix, events(12))
    argv = ["events", "archive", "--to", str(tmp_path), "--once", "--redis-url", redis_url]
    assert cli_main([*argv, "--prefix", key_prefix, "--stream-shards", "4"]) == 0
    assert "archived 12 events" in capsys.readouterr().out
    assert len(rows_in(tmp_path)) == 12


KILLER = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from mqsa.service.archive import ArchiveSink, Archiver
    from mqsa.service.store import connect, stream_keys

    url, prefix, to, kill_after = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    written = 0

    def maybe_die(path):
        global written
        written += 1
        if written == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # after the file is durable, before the ack

    async def main():
        client = connect(url, timeout_seconds=5.0)
        archiver = Archiver(client, stream_keys(prefix, 4), ArchiveSink(to), batch=7, on_written=maybe_die)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await archiver.run(0.02, stop)
        await client.aclose()

    asyncio.run(main())
    """
)


def test_sigkill_mid_batch_under_writers_loses_nothing_and_doubles_nothing(redis_url, key_prefix, tmp_path):
    """Writers append while the archiver is SIGKILLed again and again, at a file boundary (file
    written, entries not acknowledged) and at random moments; then one clean pass: the archive
    holds every accepted event exactly once."""
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    out = tmp_path / "archive"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    accepted = 0
    for round_no, kill_after in enumerate([1, 2, 3, 0, 0, 5, 0, 2]):
        accepted += append(redis_url, key_prefix, events(40, start=round_no * 40))
        cmd = [sys.executable, str(script), redis_url, key_prefix, str(out), str(kill_after)]
        proc = subprocess.Popen(cmd, env=env)
        try:
            if kill_after:
                assert proc.wait(timeout=60) == -signal.SIGKILL  # died at its kill_after-th file
            else:  # killed from outside at a random moment
                time.sleep(0.05 + 0.1 * (round_no % 3))
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    archive_once(redis_url, key_prefix, str(out))
    rows = rows_in(out)
    assert accepted == 8 * 40
    ids = [r["event_id"] for r in rows]
    assert len(ids) == len(set(ids)) == accepted  # nothing lost, nothing doubled
    assert len({(r["stream"], r["stream_id"]) for r in rows}) == accepted
    assert stream_lengths(redis_url, key_prefix) == 0


def test_prepare_reads_a_window_of_the_archive(redis_url, key_prefix, tmp_path):
    """`mqsa data prepare ARCHIVE --since` reads only the days from the cut on and only the
    events from the cut on; its sequences are what the same events give from a CSV."""
    from mqsa.service.archive import to_table
    from mqsa.training.prepare import PrepareConfig, prepare, read_log

    now = time.time()
    recent = [Event(f"u{i % 3}", f"i{i % 4}", timestamp=now - 3600 + i, event_id=f"r{i}") for i in range(30)]
    older = [
        Event(f"u{i % 3}", f"old{i % 4}", timestamp=now - 40 * 86400 + i, event_id=f"o{i}") for i in range(30)
    ]
    append(redis_url, key_prefix, older + recent)
    archive = tmp_path / "archive"
    archive_once(redis_url, key_prefix, str(archive))
    # a file in a day partition long before the window: never read, whatever its rows say
    stale = to_table("x:{b0}:events", [("1-0", {"user_id": "u0", "item_id": "stale", "timestamp": str(now)})])
    ArchiveSink(str(archive)).write("2020-01-01", "x_b0_events_1-0_1-0.parquet", stale)

    everything = read_log(archive).frame
    assert "stale" in set(everything["item_id"]) and len(everything) == 61
    summary = prepare(archive, tmp_path / "data", PrepareConfig(k=1, since="7d"))
    assert summary["actions_after"] == 30
    items = json.loads((tmp_path / "data" / "items.json").read_text())["item_ids"]
    assert sorted(items) == ["i0", "i1", "i2", "i3"]
    assert prepare(archive, tmp_path / "all", PrepareConfig(k=1))["actions_after"] == 61
    until = prepare(archive, tmp_path / "old", PrepareConfig(k=1, until="7d"))
    assert until["actions_after"] == 30  # the old events; the stale row's timestamp is now
    assert all(
        i.startswith("old") for i in json.loads((tmp_path / "old" / "items.json").read_text())["item_ids"]
    )


def test_prepare_names_a_bad_archive(tmp_path):
    from mqsa.errors import DataError
    from mqsa.training.prepare import PrepareConfig, prepare

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no Parquet file"):
        prepare(tmp_path / "empty", tmp_path / "out", PrepareConfig(k=1))
    with pytest.raises(DataError, match="no such archive"):
        prepare("file://" + str(tmp_path / "missing"), tmp_path / "out", PrepareConfig(k=1))


def read_as_archiver(url: str, key: str, count: int) -> list[str]:
    """Take ``count`` new entries as the consumer `archiver` (as another archiver process would)
    and leave them pending; returns their ids."""
    client = sync_redis.Redis.from_url(url, decode_responses=True)
    try:
        reply = client.xreadgroup("archive", "archiver", {key: ">"}, count=count)
        return [entry_id for entry_id, _ in reply[0][1]]
    finally:
        client.close()


def test_entries_another_archiver_left_pending_below_a_newer_file_are_stored_not_dropped(
    redis_url, key_prefix, tmp_path
):
    """Process A takes three entries and dies before writing; process B archives the newer ones.
    A file newer than A's entries must not make them count as archived: they are stored."""
    append(redis_url, key_prefix, events(6), shards=1)
    archive_once(redis_url, key_prefix, str(tmp_path), shards=1)  # creates the group; stores e0..e5
    append(redis_url, key_prefix, events(6, start=6), shards=1)
    key = stream_keys(key_prefix, 1)[0]
    taken = read_as_archiver(redis_url, key, 3)  # A: e6..e8 pending, never written

    async def b_pass():  # B reads only new entries, as a process that has not looked back yet
        client = connect(redis_url, timeout_seconds=3.0)
        try:
            archiver = Archiver(client, [key], ArchiveSink(str(tmp_path)))
            result = PassResult()
            while entries := await archiver._read(key, ">"):
                await archiver._store(key, entries, result)
        finally:
            await client.aclose()

    asyncio.run(b_pass())
    assert len(taken) == 3
    archive_once(redis_url, key_prefix, str(tmp_path), shards=1)  # A restarts
    ids = sorted(r["event_id"] for r in rows_in(tmp_path))
    assert ids == sorted(f"e{i}" for i in range(12))
    assert stream_lengths(redis_url, key_prefix, shards=1) == 0


def test_pending_entries_that_appear_while_running_are_archived_by_the_next_pass(
    redis_url, key_prefix, tmp_path
):
    """A failover to a replica that missed an XACK leaves entries pending behind a running
    archiver: each pass reads pending entries first, so they are stored and the trim goes on."""
    append(redis_url, key_prefix, events(4), shards=1)
    key = stream_keys(key_prefix, 1)[0]

    async def two_passes() -> None:
        client = connect(redis_url, timeout_seconds=3.0)
        try:
            archiver = Archiver(client, [key], ArchiveSink(str(tmp_path)))
            await archiver.run_once()
            await asyncio.to_thread(append, redis_url, key_prefix, events(5, start=4), 1)
            read_as_archiver(redis_url, key, 2)  # left pending by "someone"
            await archiver.run_once()
        finally:
            await client.aclose()

    asyncio.run(two_passes())
    assert sorted(r["event_id"] for r in rows_in(tmp_path)) == sorted(f"e{i}" for i in range(9))
    assert stream_lengths(redis_url, key_prefix, shards=1) == 0


def test_an_entry_stored_twice_is_read_once(redis_url, key_prefix, tmp_path):
    """A Redis that came back with older state delivers entries again that a file holds; the
    reader drops the copies by (stream, stream_id)."""
    from mqsa.training.prepare import read_log

    append(redis_url, key_prefix, events(6), shards=1)
    archive_once(redis_url, key_prefix, str(tmp_path / "a"), shards=1)
    (path,) = (tmp_path / "a").rglob("*.parquet")
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    day = path.parent.name.removeprefix("date=")
    ids = table.column("stream_id").to_pylist()
    tag = stream_tag(stream_keys(key_prefix, 1)[0])
    ArchiveSink(str(tmp_path / "a")).write(
        day, f"{tag}_{ids[2]}_{ids[5]}.parquet", table.slice(2)
    )  # overlapping
    assert len(rows_in(tmp_path / "a")) == 10
    assert len(read_log(tmp_path / "a").frame) == 6
    from mqsa.training.event_table import EventTable
    from mqsa.training.prepare import LogReader

    with EventTable() as table:  # what `mqsa data prepare` does with the archive
        for frame in LogReader(tmp_path / "a"):
            table.append(frame)
        assert table.number() == 4  # copies dropped
        assert table.counts().actions == 6


def test_bad_archiver_settings_are_one_line_errors(redis_url, key_prefix, tmp_path, capsys):
    base = ["events", "archive", "--once", "--redis-url", redis_url, "--prefix", key_prefix]
    assert cli_main([*base, "--to", str(tmp_path), "--batch", "0"]) == 2
    assert "--batch must be at least 1" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert cli_main([*base, "--to", str(tmp_path / "file" / "archive")]) == 2
    assert "cannot write the archive here" in capsys.readouterr().err
