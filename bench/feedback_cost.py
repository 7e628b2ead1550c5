"""What logging a served list costs per /recommend: CPU of the service and of Redis, and
throughput, with MQSA_LOG_IMPRESSIONS on and off (and, optionally, another build).

    python bench/feedback_cost.py --bundle BUNDLE --data ../shared/data/beauty.txt --rounds 3
    python bench/feedback_cost.py ... --variant base=/tmp/basepkg:true --variant on=:true --variant off=:false

On a shared 2-core machine latency percentiles move by 2x between identical runs; CPU
time per request moves much less, so this reports it: the service process's user+system
CPU (/proc) and Redis's (INFO cpu) over a closed-loop wrk run, divided by the requests
served. Variants run interleaved, ``--rounds`` times each; the table gives each run.
Every variant starts its own `mqsa serve` (one worker) on its own key prefix, loads
the same users' histories (every Beauty user's training items, batches of 100), then
runs `wrk -t1 -c4` for ``--seconds``. Not a test: results go to docs/feedback.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import ingest, read_users, wrk

from mqsa.demo import wait_ready

ROOT = Path(__file__).resolve().parents[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children that have exited (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def run(variant: str, pythonpath: str, log: str, args: argparse.Namespace, users: dict) -> dict:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "MQSA_REDIS_PREFIX": prefix, "MQSA_LOG_IMPRESSIONS": log}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    url = f"http://127.0.0.1:{args.port}"
    bundle = str(args.bundle.resolve())
    cmd = [sys.executable, "-m", "mqsa.cli", "serve", "--bundle", bundle, "--port", str(args.port)]
    # run from the build's folder: `-m` puts the working directory first on sys.path, and this
    # tree's own mqsa/ would shadow the build's
    server = subprocess.Popen([*cmd, "--log-level", "warning"], cwd=pythonpath or ROOT, env=env)
    client = redis.Redis()
    try:
        wait_ready(url, server)
        asyncio.run(ingest(url, users))
        wrk(url, list(users), 4, 3)  # warm up
        service0, redis0, t0 = cpu_seconds(server.pid), redis_cpu(client), time.perf_counter()
        result = wrk(url, list(users), 4, args.seconds)
        service1, redis1 = cpu_seconds(server.pid), redis_cpu(client)
        served = result["rps"] * args.seconds
        return {
            "variant": variant,
            "rps": result["rps"],
            "p99": result["p99"],
            "service_us": 1e6 * (service1 - service0) / served,
            "redis_us": 1e6 * (redis1 - redis0) / served,
            "errors": result["errors"],
            "wall": time.perf_counter() - t0,
        }
    finally:
        server.terminate()
        server.wait(timeout=30)
        for key in client.scan_iter(f"{prefix}*", count=10_000):
            client.delete(key)
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME=PYTHONPATH:LOG (true/false), repeatable; default: this tree with logging on and off",
    )
    args = parser.parse_args()
    variants = [] if args.variant else [("on", "", "true"), ("off", "", "false")]
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        path, _, log = rest.rpartition(":")
        variants.append((name, path, log))
    item_ids = json.loads((args.bundle / "items.json").read_text())["item_ids"]
    users = read_users(args.data, item_ids)
    runs = [run(name, path, log, args, users) for _ in range(args.rounds) for name, path, log in variants]
    print("| variant | req/s (wrk -c4) | p99 ms | service CPU us/request | Redis CPU us/request |")
    print("|---|---|---|---|---|")
    for r in runs:
        print(
            f"| {r['variant']} | {r['rps']:,.0f} | {r['p99']:.2f} | {r['service_us']:.0f} | {r['redis_us']:.0f} |"
        )
    print()
    print("| variant | median req/s | median service CPU us/request | median Redis CPU us/request |")
    print("|---|---|---|---|")
    for name, _, _ in variants:
        mine = [r for r in runs if r["variant"] == name]
        med = {k: statistics.median(r[k] for r in mine) for k in ("rps", "service_us", "redis_us")}
        print(f"| {name} | {med['rps']:,.0f} | {med['service_us']:.0f} | {med['redis_us']:.0f} |")


if __name__ == "__main__":
    main()
