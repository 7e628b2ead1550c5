"""Load test of the service: ingestion, constant-rate latency, paced connections, filters, the most
requests/s, time per stage.

    python bench/load_test.py --bundle bundles/beauty --data ../shared/data/beauty.txt

What it does, on this machine only (loopback; every loop is bounded in time):
1. starts `mqsa serve` (``--workers``) against the local Redis with a key prefix of its own;
2. posts every user's training sequence (all items but the last two) through
   POST /events in batches of 100 events, from an asyncio client with 16
   connections, and reports events/s;
3. an open-loop generator (``open_loop`` below, asyncio + uvloop, raw HTTP/1.1)
   at a constant ``--rate`` requests/s of POST /recommend for ``--duration``
   seconds, every user in turn; latency from each request's due time: p50, p95, p99, errors;
4. many slowly paced connections, as a gateway sends: ``--paced`` connections each
   at ``--rate / --paced`` req/s, once with their ticks in step (what `hey -q R -c C`
   does: all its workers start their tickers together, so every tick brings C
   requests at once) and once with each connection's phase at random (independent
   clients); latency from each request's due time;
5. with a catalogue in which every 10th item is in category "ten": the open loop
   again, each request asking ``filter: {categories: ["ten"]}`` (10% of the items);
6. `wrk` (closed loop, a Lua script rotating over all users) at several
   connection counts: the most requests/s with zero errors, and its p99;
7. the mean time per stage (Redis per request; encoder and search per call, which
   serve a batch of concurrent requests) from the service's Prometheus histograms.
The generator runs on the same 2 cores as the service. The markdown table
goes to stdout and, with ``--out``, to a file. Keys under its prefix are
deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]  # the `mqsa` package itself comes installed (make setup)

from mqsa.demo import wait_ready  # noqa: E402
from mqsa.service.store import bucket_of, stream_keys  # noqa: E402


def read_users(data: Path, item_ids: list[str]) -> dict[str, list[str]]:
    users = {}
    for line in data.read_text().splitlines():
        user, *items = line.split()
        users[f"u{user}"] = [item_ids[int(i)] for i in items[:-2]]
    return users


async def ingest(
    url: str, users: dict[str, list[str]], batch: int = 100, connections: int = 16
) -> tuple[int, float]:
    events = [{"user_id": u, "item_id": i} for u, items in users.items() for i in items]
    bodies = [{"events": events[k : k + batch]} for k in range(0, len(events), batch)]
    queue: asyncio.Queue = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    failures = 0

    async def sender(client: httpx.AsyncClient) -> None:
        nonlocal failures
        while not queue.empty():
            body = queue.get_nowait()
            r = await client.post("/events", json=body)
            failures += r.status_code != 200

    limits = httpx.Limits(max_connections=connections)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        start = time.perf_counter()
        await asyncio.gather(*(sender(client) for _ in range(connections)))
        seconds = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{failures} /events requests failed")
    return len(events), seconds


async def open_loop(
    port: int, bodies: list[bytes], rate: int, duration: int, connections: int = 64
) -> dict[str, float]:
    """Constant-rate (open-loop) POST /recommend: request i is due at start + i / rate.

    Latency runs from the due time, not from when a connection was free, so a
    slow server is charged for the queue it causes (no coordinated omission).
    Raw HTTP/1.1 keep-alive over ``connections`` sockets, a few microseconds of
    client work per request.
    """
    requests_ = [
        b"POST /recommend HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(b)}\r\n\r\n".encode()
        + b
        for b in bodies
    ]
    idle: asyncio.Queue = asyncio.Queue()
    for _ in range(connections):
        idle.put_nowait(await asyncio.open_connection("127.0.0.1", port))
    latencies: list[float] = []
    errors = 0

    async def one(i: int, due: float) -> None:
        nonlocal errors
        reader, writer = await idle.get()
        writer.write(requests_[i % len(requests_)])
        status = await _read_response(reader)
        latencies.append(time.perf_counter() - due)
        errors += status != 200
        idle.put_nowait((reader, writer))

    total = rate * duration
    start = time.perf_counter()
    tasks = []
    for i in range(total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, due)))
    await asyncio.gather(*tasks)
    seconds = time.perf_counter() - start
    while not idle.empty():
        idle.get_nowait()[1].close()
    latencies.sort()
    pick = lambda q: 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    return {
        "rps": total / seconds,
        "p50": pick(0.50),
        "p95": pick(0.95),
        "p99": pick(0.99),
        "ok": total - errors,
        "errors": errors,
    }


async def paced(
    port: int, bodies: list[bytes], connections: int, rate: float, duration: int, aligned: bool, seed: int = 0
) -> dict[str, float]:
    """``connections`` keep-alive connections, each sending ``rate`` req/s for ``duration`` s.

    ``aligned``: every connection ticks at the same instants (bursts of ``connections``
    requests); else each starts at a random phase. Latency from each request's due time.
    """
    rng = random.Random(seed)
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter() + 0.2

    async def one_connection(c: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        phase = 0.0 if aligned else rng.random() / rate
        for i in range(int(rate * duration)):
            due = start + phase + i / rate
            if (delay := due - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            body = bodies[(c * 7919 + i) % len(bodies)]
            writer.write(_post("/recommend", body))
            status = await _read_response(reader)
            latencies.append(time.perf_counter() - due)
            errors += status != 200
        writer.close()

    await asyncio.gather(*(one_connection(c) for c in range(connections)))
    return _quantiles(latencies, errors)


def _post(path: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response (status line, headers, Content-Length body); its status."""
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return status


def _quantiles(latencies: list[float], errors: int) -> dict[str, float]:
    latencies.sort()
    pick = lambda q: 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99), "n": len(latencies), "errors": errors}


def tag_every_tenth(url: str, item_ids: list[str]) -> None:
    """Category "ten" on every 10th item, through PUT /items; wait until the worker has it."""
    items = [
        {"item_id": i, "categories": ["ten"] if k % 10 == 0 else ["other"]} for k, i in enumerate(item_ids)
    ]
    version = 0
    for k in range(0, len(items), 1000):
        r = httpx.put(f"{url}/items", json={"items": items[k : k + 1000]}, timeout=30)
        r.raise_for_status()
        version = r.json()["catalogue_version"]
    deadline = time.time() + 30
    while httpx.get(f"{url}/readyz").json().get("catalogue_version", -1) < version:
        if time.time() > deadline:
            raise RuntimeError("the worker did not apply the catalogue")
        time.sleep(0.1)


WRK_SCRIPT = """
local users = {}
for line in io.lines("%s") do users[#users + 1] = line end
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i %% #users + 1
  return wrk.format(nil, "/recommend", nil, '{"user_id": "' .. users[i] .. '", "n": 10}')
end
local errors = 0
response = function(status) if status ~= 200 then errors = errors + 1 end end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %%d %%d %%.3f %%.3f %%.3f\\n", summary.requests, summary.errors.status
    + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, summary.duration / 1e6))
end
"""


def wrk(url: str, users: list[str], connections: int, duration: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "users.txt").write_text("\n".join(users) + "\n")
        script = Path(tmp) / "rotate.lua"
        script.write_text(WRK_SCRIPT % (Path(tmp) / "users.txt"))
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "-s", str(script), url],
            capture_output=True,
            text=True,
            check=True,
            timeout=duration + 60,
        ).stdout
    requests_, errors, p50, p99, seconds = re.search(
        r"RESULT (\d+) (\d+) ([\d.]+) ([\d.]+) ([\d.]+)", out
    ).groups()
    return {
        "connections": connections,
        "rps": int(requests_) / float(seconds),
        "errors": int(errors),
        "p50": float(p50),
        "p99": float(p99),
    }


def stage_means(metrics_text: str) -> dict[str, float]:
    """Mean ms per stage and per /recommend request from the Prometheus text."""

    def value(pattern: str) -> float:
        found = re.findall(pattern + r" ([\d.e+-]+)", metrics_text)
        return sum(float(v) for v in found)

    out = {}
    route = r'{method="POST",route="/recommend",status="200"}'
    requests_ = value(re.escape("mqsa_request_seconds_count" + route))
    out["request"] = 1000 * value(re.escape("mqsa_request_seconds_sum" + route)) / max(requests_, 1)
    for stage in ("redis", "encoder", "search"):
        count = value(rf'mqsa_stage_seconds_count{{stage="{stage}"}}')
        total = value(rf'mqsa_stage_seconds_sum{{stage="{stage}"}}')
        out[stage] = 1000 * total / max(count, 1)  # per call
        out[f"{stage}_per_request"] = 1000 * total / max(requests_, 1)
        out[f"{stage}_calls"] = count
    out["requests"] = requests_
    return out


def main() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--rate", type=int, default=300)
    parser.add_argument("--duration", type=int, default=30)
    parser.add_argument("--connections", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--paced", type=int, default=10, help="slowly paced connections sharing --rate")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    url = f"http://127.0.0.1:{args.port}"
    env = {**os.environ, "MQSA_REDIS_URL": args.redis_url, "MQSA_REDIS_PREFIX": prefix}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mqsa.cli",
            "serve",
            "--bundle",
            str(args.bundle),
            "--port",
            str(args.port),
            "--workers",
            str(args.workers),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
    )
    rows: list[str] = []
    try:
        wait_ready(url, server)
        item_ids = json.loads((args.bundle / "items.json").read_text())["item_ids"]
        users = read_users(args.data, item_ids)
        events, seconds = asyncio.run(ingest(url, users))
        rows.append(
            f"| /events ingestion, batches of 100 | {events / seconds:,.0f} events/s ({events:,} events in {seconds:.1f} s) |"
        )
        sample = list(users)[:: max(1, len(users) // 500)]
        client = redis.Redis.from_url(args.redis_url)
        shards = int(os.environ.get("MQSA_STREAM_SHARDS", "16"))
        per_user = [
            sum(
                client.memory_usage(f"{prefix}:{{b{bucket_of(u, shards)}}}:u:{u}:{kind}") or 0
                for kind in ("items", "events")
            )
            for u in sample
        ]
        events_per_user = sum(len(users[u]) for u in sample) / len(sample)
        stream_bytes = sum(client.memory_usage(k) or 0 for k in stream_keys(prefix, shards))
        rows.append(
            f"| Redis memory per user | {sum(per_user) / len(per_user):,.0f} bytes (mean over {len(sample)} users "
            f"with {events_per_user:.1f} events each, no event ids); stream {stream_bytes / events:,.0f} bytes/event |"
        )
        bodies = [json.dumps({"user_id": u, "n": 10}).encode() for u in users]
        constant = asyncio.run(open_loop(args.port, bodies, args.rate, args.duration))
        rows.append(
            f"| /recommend at {args.rate} req/s for {args.duration} s (open loop, all users in turn) | p50 {constant['p50']:.2f} ms, "
            f"p95 {constant['p95']:.2f} ms, p99 {constant['p99']:.2f} ms, {constant['rps']:.0f} req/s achieved, "
            f"{constant['errors']} errors of {constant['ok'] + constant['errors']} |"
        )
        for aligned in (True, False):
            run = asyncio.run(
                paced(args.port, bodies, args.paced, args.rate / args.paced, args.duration, aligned)
            )
            shape = "ticks in step, as hey's" if aligned else "random phases"
            rows.append(
                f"| /recommend, {args.paced} connections x {args.rate / args.paced:g} req/s, {shape} | "
                f"p50 {run['p50']:.2f} ms, p95 {run['p95']:.2f} ms, p99 {run['p99']:.2f} ms, "
                f"{run['errors']} errors of {run['n']} |"
            )
        tag_every_tenth(url, item_ids)
        filtered = [
            json.dumps({"user_id": u, "n": 10, "filter": {"categories": ["ten"]}}).encode() for u in users
        ]
        run = asyncio.run(open_loop(args.port, filtered, args.rate, args.duration))
        rows.append(
            f"| /recommend at {args.rate} req/s with a filter keeping 10% of the items | p50 {run['p50']:.2f} ms, "
            f"p95 {run['p95']:.2f} ms, p99 {run['p99']:.2f} ms, {run['errors']} errors |"
        )
        runs = [wrk(url, list(users), c, args.duration) for c in args.connections]
        for run in runs:
            rows.append(
                f"| /recommend closed loop, {run['connections']} connections (wrk) | {run['rps']:,.0f} req/s, "
                f"p50 {run['p50']:.2f} ms, p99 {run['p99']:.2f} ms, {run['errors']} errors |"
            )
        clean = [r for r in runs if r["errors"] == 0]
        if clean:
            best = max(clean, key=lambda r: r["rps"])
            rows.append(
                f"| most req/s with zero errors | {best['rps']:,.0f} req/s (p99 {best['p99']:.2f} ms) |"
            )
        st = stage_means(httpx.get(f"{url}/metrics").text)
        batch = st["requests"] / max(st["encoder_calls"], 1)
        rest = st["request"] - st["redis_per_request"] - st["encoder_per_request"] - st["search_per_request"]
        rows.append(
            f"| mean time per /recommend | Redis {st['redis']:.3f} ms; encoder {st['encoder']:.3f} ms and search "
            f"{st['search']:.3f} ms per call, a call serving {batch:.2f} requests on average; the rest "
            f"{rest:.3f} ms (of {st['request']:.3f} ms) |"
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
        client = redis.Redis.from_url(args.redis_url)
        keys = list(client.scan_iter(match=f"{prefix}*", count=5000))
        for k in range(0, len(keys), 1000):
            client.delete(*keys[k : k + 1000])
    table = f"workers: {args.workers}\n\n| what | measured |\n|---|---|\n" + "\n".join(rows) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
