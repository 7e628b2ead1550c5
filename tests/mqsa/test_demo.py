"""`mqsa demo` end to end: it trains, exports, starts Redis and the service, and recommends."""

from __future__ import annotations

import socket

from mqsa.demo import run_demo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_ends_with_a_recommendation(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MQSA_REDIS_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)  # the demo must start its own Redis
    result = run_demo(tmp_path, epochs=1, port=free_port(), keep_running=False)
    rec = result["recommendation"]
    assert rec["user_id"] == "demo-user" and rec["source"] == "model" and not rec["degraded"]
    assert len(rec["items"]) == 10 and all(item["item_id"].startswith("i") for item in rec["items"])
    assert (tmp_path / "bundles" / "current" / "manifest.json").is_file()
