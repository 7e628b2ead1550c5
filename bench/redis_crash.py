"""Redis killed (-9) under concurrent writers: acknowledged, stored, lost, doubled; and the cost per request.

    python bench/redis_crash.py --bundle bundles/current [--writers 50 --seconds 12]

For each durability setting (Redis's ``appendfsync`` and the service's ``MQSA_ACK``):
1. starts a private ``redis-server`` (AOF on) and ``mqsa serve`` against it;
2. runs ``--writers`` concurrent clients, each posting one event at a time with a
   unique item id; half send an ``event_id`` and resend the same event after a 503
   (a correct client), half send none and resend too (a naive one);
3. at the middle of the run kills Redis with SIGKILL and restarts it at once on the
   same port and directory (it reloads its AOF);
4. after the run reads every user's history and counts, per half: events
   acknowledged (200), stored, acknowledged but not stored (lost), stored twice
   (doubled), and the 503s.
Before the writers start, one client posts ``--latency-requests`` events one after
the other: the /events latency (p50, p99) of each setting, i.e. the cost of
durability per request, without the queueing of 50 clients on 2 cores; then 16
connections post batches of 100 events for 5 s: events/s.

A process crash loses nothing that Redis acknowledged in any setting: Redis writes
the AOF to the operating system before it replies. What ``appendfsync everysec``
risks is a crash of the machine (power, kernel), which loses what the OS had not
yet written to disk (up to about a second); this bench cannot cause one, so that
column is Redis's documented guarantee, not a measurement. The table goes to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from mqsa.demo import wait_ready

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [  # (label, appendfsync, MQSA_ACK)
    ("appendfsync everysec, ack memory", "everysec", "memory"),
    ("appendfsync always, ack memory", "always", "memory"),
    ("appendfsync always, ack disk", "always", "disk"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Tally:
    acknowledged: set[str] = field(default_factory=set)
    unavailable: int = 0


class Redis:
    def __init__(self, fsync: str) -> None:
        self.port, self.dir = free_port(), tempfile.mkdtemp(prefix="crash-redis-")
        self.args = ["redis-server", "--port", str(self.port), "--dir", self.dir, "--save", ""]
        self.args += ["--appendonly", "yes", "--appendfsync", fsync, "--loglevel", "warning"]
        self.process = self.start()

    def start(self) -> subprocess.Popen:
        process = subprocess.Popen(self.args, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        for _ in range(200):
            try:
                if client.ping():
                    return process
            except redis.RedisError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def crash_and_restart(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.process = self.start()

    def close(self) -> None:
        self.process.terminate()
        self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


async def writer(
    http: httpx.AsyncClient, user: str, with_ids: bool, tally: Tally, stop: asyncio.Event
) -> None:
    n = 0
    while not stop.is_set():
        item = f"{user}-{n}"
        event = {"user_id": user, "item_id": item, **({"event_id": item} if with_ids else {})}
        while not stop.is_set():  # resend the same event until it is acknowledged
            try:
                r = await http.post("/events", json={"events": [event]})
            except httpx.HTTPError:
                tally.unavailable += 1
                await asyncio.sleep(0.05)
                continue
            if r.status_code == 200:
                tally.acknowledged.add(item)
                break
            tally.unavailable += 1
            await asyncio.sleep(0.05)
        n += 1


def latency(url: str, requests: int) -> tuple[float, float]:
    """p50 and p99 in ms of ``requests`` single-event posts, one at a time."""
    times = []
    with httpx.Client(base_url=url, timeout=5) as http:
        for n in range(requests):
            body = {"events": [{"user_id": f"lat{n % 20}", "item_id": f"l{n}", "event_id": f"l{n}"}]}
            sent = time.perf_counter()
            assert http.post("/events", json=body).status_code == 200
            times.append(1000 * (time.perf_counter() - sent))
    times.sort()
    return statistics.median(times), times[int(0.99 * (len(times) - 1))]


async def ingest_rate(url: str, seconds: float = 5.0, connections: int = 16) -> float:
    """Events/s posted in batches of 100 by ``connections`` clients for ``seconds``."""
    done, stop = 0, time.perf_counter() + seconds

    async def client(c: int, http: httpx.AsyncClient) -> None:
        nonlocal done
        n = 0
        while time.perf_counter() < stop:
            batch = [{"user_id": f"in{c}-{k % 10}", "item_id": f"i{n}-{k}"} for k in range(100)]
            if (await http.post("/events", json={"events": batch})).status_code == 200:
                done += 100
            n += 1

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        await asyncio.gather(*(client(c, http) for c in range(connections)))
    return done / (time.perf_counter() - started)


async def run(url: str, store: Redis, writers: int, seconds: float) -> tuple[Tally, Tally]:
    tallies = (Tally(), Tally())  # with event ids, without
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=writers)
    async with httpx.AsyncClient(base_url=url, timeout=5, limits=limits) as http:
        tasks = [
            asyncio.create_task(writer(http, f"w{k}", k % 2 == 0, tallies[k % 2], stop))
            for k in range(writers)
        ]
        await asyncio.sleep(seconds / 2)
        await asyncio.to_thread(store.crash_and_restart)
        await asyncio.sleep(seconds / 2)
        stop.set()
        await asyncio.gather(*tasks)
    return tallies


def count(store: Redis, prefix: str, tally: Tally, users: list[str]) -> dict[str, int]:
    client = redis.Redis(port=store.port, decode_responses=True)
    stored: list[str] = []
    for key in client.scan_iter(match=f"{prefix}:*:u:*:items", count=1000):
        if key.split(":u:")[1].rsplit(":", 1)[0] in users:
            stored += client.lrange(key, 0, -1)
    unique = set(stored)
    return {
        "acknowledged": len(tally.acknowledged),
        "stored": len(unique),
        "lost": len(tally.acknowledged - unique),
        "doubled": len(stored) - len(unique),
        "503s": tally.unavailable,
    }


def one_setting(args: argparse.Namespace, fsync: str, ack: str) -> list[dict]:
    store = Redis(fsync)
    prefix, port = f"crash-{uuid.uuid4().hex[:6]}", free_port()
    env = {**os.environ, "MQSA_REDIS_URL": f"redis://127.0.0.1:{store.port}/0", "MQSA_REDIS_PREFIX": prefix}
    env |= {"MQSA_ACK": ack, "MQSA_STREAM_SHARDS": "1"}
    cmd = [sys.executable, "-m", "mqsa.cli", "serve", "--bundle", str(args.bundle), "--port", str(port)]
    server = subprocess.Popen([*cmd, "--log-level", "error"], cwd=ROOT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, server)
        p50, p99 = latency(url, args.latency_requests)
        rate = asyncio.run(ingest_rate(url))
        with_ids, without = asyncio.run(run(url, store, args.writers, args.seconds))
        rows = []
        for label, tally, parity in (("event ids", with_ids, 0), ("no event ids", without, 1)):
            users = [f"w{k}" for k in range(args.writers) if k % 2 == parity]
            stats = {"p50_ms": p50, "p99_ms": p99, "rate": rate}
            rows.append({"clients": label, **count(store, prefix, tally, users), **stats})
        return rows
    finally:
        server.terminate()
        server.wait(timeout=30)
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--writers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=12)
    parser.add_argument("--latency-requests", type=int, default=1000)
    args = parser.parse_args()
    print(
        "| setting | clients | acknowledged | stored | lost | doubled | 503s | /events p50 ms | p99 ms | events/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, fsync, ack in SETTINGS:
        for row in one_setting(args, fsync, ack):
            print(
                f"| {label} | {row['clients']} | {row['acknowledged']} | {row['stored']} | {row['lost']} "
                f"| {row['doubled']} | {row['503s']} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['rate']:,.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
