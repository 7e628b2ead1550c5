"""A million-item catalogue with 100,000 items hidden: one search per request, and its latency.

    python bench/big_catalogue.py [--items 1000000 --hidden 100000 --index hnsw]

1. makes a model of ``--items`` items with random weights (no training: the point is
   the size) and exports it (``--index``, HNSW by default: M 16, efSearch 64);
2. serves it (one worker), hides ``--hidden`` random items through PUT /items and waits
   until the worker has applied them;
3. posts 5-20 events for each of 2,000 users, then runs the open-loop generator of
   ``bench/load_test.py`` at ``--rate`` req/s: p50, p95, p99;
4. checks every answer against the hidden set (none may come back) and reads the
   service's metrics: searches per request (one, or less with batching) and the
   worker's memory.
The markdown table goes to stdout. The bundle is kept under ``--workdir`` for reruns.
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
import time
import uuid
from pathlib import Path

import httpx
import redis
import torch
from load_test import open_loop  # bench/: the same generator as the load test

from mqsa.demo import wait_ready
from mqsa.models.mqsa import MQSA, MQSAConfig
from mqsa.training.checkpoint import BestEpoch, Checkpoint
from mqsa.training.export import ExportConfig, export_bundle

ROOT = Path(__file__).resolve().parents[1]


def make_bundle(workdir: Path, items: int, index: str) -> tuple[Path, float]:
    bundle = workdir / f"bundle-{items}-{index}"
    if (bundle / "manifest.json").is_file():
        return bundle, 0.0
    torch.manual_seed(0)
    model = MQSA(MQSAConfig(num_items=items))
    with torch.no_grad():
        model.item_emb.weight[:items].normal_(0.0, 0.5)  # spread out, as trained embeddings are
    counts = [int(1e6 / (rank + 1)) + 1 for rank in range(items)]
    ckpt = Checkpoint(
        model.config.to_dict(),
        model.state_dict(),
        best=BestEpoch(1),
        item_ids=[f"x{i}" for i in range(items)],
        item_counts=counts,
    )
    ckpt.save(workdir / "big.pt")
    started = time.perf_counter()
    export_bundle(workdir / "big.pt", bundle, ExportConfig(index=index, hnsw_m=16, ef_search=64), force=True)
    return bundle, time.perf_counter() - started


def hide(url: str, items: int, hidden: int) -> set[str]:
    rng = random.Random(1)
    chosen = {f"x{i}" for i in rng.sample(range(items), hidden)}
    ordered = sorted(chosen)
    version = 0
    with httpx.Client(base_url=url, timeout=60) as http:
        for k in range(0, len(ordered), 1000):
            r = http.put(
                "/items", json={"items": [{"item_id": i, "available": False} for i in ordered[k : k + 1000]]}
            )
            r.raise_for_status()
            version = r.json()["catalogue_version"]
        while http.get("/readyz").json().get("catalogue_version", -1) < version:
            time.sleep(0.2)
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--hidden", type=int, default=100_000)
    parser.add_argument("--index", default="hnsw", choices=["flat", "ivf", "hnsw"])
    parser.add_argument("--rate", type=int, default=300)
    parser.add_argument("--duration", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "results" / "big")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    bundle, export_seconds = make_bundle(args.workdir, args.items, args.index)
    prefix, port = f"big-{uuid.uuid4().hex[:6]}", 8791
    env = {**os.environ, "MQSA_REDIS_PREFIX": prefix, "MQSA_EXPLORE_SHARE": "0"}
    cmd = [sys.executable, "-m", "mqsa.cli", "serve", "--bundle", str(bundle), "--port", str(port)]
    server = subprocess.Popen([*cmd, "--log-level", "warning"], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, server, timeout=600)
        started = time.perf_counter()
        hidden = hide(url, args.items, args.hidden)
        hide_seconds = time.perf_counter() - started
        rng = random.Random(2)
        users = {
            f"u{n}": [f"x{rng.randrange(args.items)}" for _ in range(rng.randint(5, 20))] for n in range(2000)
        }
        events = [{"user_id": u, "item_id": i} for u, items in users.items() for i in items]
        with httpx.Client(base_url=url, timeout=60) as http:
            for k in range(0, len(events), 1000):
                http.post("/events", json={"events": events[k : k + 1000]}).raise_for_status()
            leaked = set()
            for u in list(users)[:200]:
                answer = http.post("/recommend", json={"user_id": u, "n": 50}).json()
                leaked |= {i["item_id"] for i in answer["items"]} & hidden
        bodies = [json.dumps({"user_id": u, "n": 10}).encode() for u in users]
        run = asyncio.run(open_loop(port, bodies, args.rate, args.duration))
        metrics = httpx.get(f"{url}/metrics").text
        rss = int(Path(f"/proc/{server.pid}/status").read_text().split("VmRSS:")[1].split()[0]) // 1024
    finally:
        server.terminate()
        server.wait(timeout=60)
        client = redis.Redis()
        keys = list(client.scan_iter(match=f"{prefix}*", count=5000))
        for k in range(0, len(keys), 1000):
            client.delete(*keys[k : k + 1000])

    def value(name: str) -> float:
        return sum(float(v) for v in re.findall(re.escape(name) + r" ([\d.e+-]+)", metrics))

    requests_ = value('mqsa_request_seconds_count{method="POST",route="/recommend",status="200"}')
    searches = value('mqsa_stage_seconds_count{stage="search"}')
    search_ms = 1000 * value('mqsa_stage_seconds_sum{stage="search"}') / max(searches, 1)
    rows = [
        f"| catalogue | {args.items:,} items, {args.index} index, {args.hidden:,} hidden |",
        f"| export (model, ONNX, index) | {export_seconds:.0f} s (0 s: the bundle existed) |",
        f"| hiding {args.hidden:,} items (PUT /items, 1,000 a request, until the worker applied them) | {hide_seconds:.1f} s |",
        f"| hidden items in 200 answers of 50 | {len(leaked)} |",
        f"| /recommend at {args.rate} req/s for {args.duration} s | p50 {run['p50']:.2f} ms, p95 {run['p95']:.2f} ms, "
        f"p99 {run['p99']:.2f} ms, {run['errors']} errors |",
        f"| searches per request | {searches / max(requests_, 1):.2f} (one per batch of concurrent requests), "
        f"{search_ms:.2f} ms each |",
        f"| worker memory (RSS) | {rss:,} MB |",
    ]
    print("| what | measured |\n|---|---|\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
