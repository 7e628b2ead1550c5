"""`mqsa demo` end to end, as a user runs it: it trains, exports, starts Redis and the service,
recommends, and says how the model compares with the baselines on its own test table."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from mqsa.demo import verdict

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_default_demo_beats_both_baselines_and_ends_with_a_recommendation(tmp_path) -> None:
    """The demo's defaults (synthetic data, 60 epochs): its printed test table shows MQSA-TED's
    NDCG@10 at least 10% above Item Transition and above Popularity, and it says so in one line."""
    env = {k: v for k, v in os.environ.items() if k not in ("MQSA_REDIS_URL", "REDIS_URL")}  # its own Redis
    cmd = [sys.executable, "-m", "mqsa.cli", "demo", "--no-wait", "--workdir", str(tmp_path)]
    result = subprocess.run(
        [*cmd, "--port", str(free_port())], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    table = out[out.index("test metrics (full ranking)") :]
    ndcg10 = {}
    for name in ("MQSA", "Popularity", "ItemTransition"):
        row = re.search(rf"^\| {name}[^|]* \|(.*)\|$", table, re.M).group(1).split("|")
        ndcg10[name] = float(row[3])  # HR@5, NDCG@5, HR@10, NDCG@10, ...
    assert ndcg10["MQSA"] >= 1.10 * ndcg10["ItemTransition"], ndcg10
    assert ndcg10["MQSA"] > ndcg10["Popularity"], ndcg10
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    line = verdict(metrics)
    assert line in out.splitlines()
    above = float(re.search(r"(\d+)% above Item Transition", line).group(1))
    assert above >= 10
    rec = json.loads(out[out.index('{\n  "user_id": "demo-user"') :].split("\n}\n")[0] + "\n}")
    assert rec["source"] == "model" and not rec["degraded"]
    assert len(rec["items"]) == 10 and all(item["item_id"].startswith("i") for item in rec["items"])
    assert (tmp_path / "bundles" / "current" / "manifest.json").is_file()


def test_verdict_says_above_or_below_each_baseline() -> None:
    metrics = {
        "test": {"NDCG@10": 0.30},
        "baselines": {
            "ItemTransition": {"test": {"NDCG@10": 0.25}},
            "Popularity": {"test": {"NDCG@10": 0.40}},
        },
    }
    assert verdict(metrics) == (
        "Test NDCG@10: MQSA-TED 0.3000, 20% above Item Transition (0.2500) and 25% below Popularity (0.4000)."
    )
