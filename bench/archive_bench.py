"""How fast the archiver empties the streams, and what archive mode costs /events' Redis script.

    python bench/archive_bench.py [--events 200000] [--shards 16] [--batch 10000]

Appends ``--events`` events through ``HistoryStore`` (1,000 per call, 1,000 users) with and
without ``stream_archive``, then archives them to a temporary folder with ``mqsa events
archive``'s code, and prints events/s for each step. Uses the local Redis (``--redis-url``)
under a throwaway prefix, deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
import uuid

import redis as sync_redis

from mqsa.service.archive import Archiver, ArchiveSink
from mqsa.service.store import Event, HistoryStore, connect, stream_keys


async def fill(url: str, prefix: str, n: int, shards: int, archive: bool) -> float:
    client = connect(url, timeout_seconds=10.0)
    store = HistoryStore(client, prefix=prefix, stream_shards=shards, stream_archive=archive)
    start = time.perf_counter()
    for first in range(0, n, 1000):
        await store.append(
            [Event(f"u{i % 1000}", f"i{i % 5000}", timestamp=1.7e9 + i) for i in range(first, first + 1000)]
        )
    seconds = time.perf_counter() - start
    await client.aclose()
    return seconds


async def archive(url: str, prefix: str, shards: int, batch: int, to: str) -> tuple[float, int]:
    client = connect(url, timeout_seconds=30.0)
    start = time.perf_counter()
    result = await Archiver(client, stream_keys(prefix, shards), ArchiveSink(to), batch=batch).run_once()
    seconds = time.perf_counter() - start
    await client.aclose()
    return seconds, result.archived


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    prefix = f"bench-archive-{uuid.uuid4().hex[:6]}"
    folder = tempfile.mkdtemp(prefix="mqsa-archive-")
    try:
        trimmed = asyncio.run(fill(args.redis_url, prefix + "-t", args.events, args.shards, archive=False))
        kept = asyncio.run(fill(args.redis_url, prefix, args.events, args.shards, archive=True))
        seconds, n = asyncio.run(archive(args.redis_url, prefix, args.shards, args.batch, folder))
        size = sum(p.stat().st_size for p in __import__("pathlib").Path(folder).rglob("*.parquet"))
        print(f"append, streams trimmed (MAXLEN ~): {args.events / trimmed:,.0f} events/s")
        print(f"append, archive mode (no trim):     {args.events / kept:,.0f} events/s")
        print(
            f"archive {n:,} events: {seconds:.2f} s, {n / seconds:,.0f} events/s, {size / n:.1f} bytes/event on disk"
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        client = sync_redis.Redis.from_url(args.redis_url)
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
        client.close()


if __name__ == "__main__":
    main()
