"""The store and the service on a real 3-node Redis Cluster (started here, removed after)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from mqsa.service.app import create_app
from mqsa.service.event_log import export_events
from mqsa.service.settings import Settings
from mqsa.service.store import Event, HistoryStore, connect
from mqsa.training.prepare import read_log


def free_port() -> int:
    """A free port whose cluster bus port (port + 10000) exists and is free too."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


@pytest.fixture(scope="module")
def cluster_url() -> Iterator[str]:
    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        pytest.skip("redis-server and redis-cli are needed to start a cluster")
    root = Path(tempfile.mkdtemp(prefix="mqsa-cluster-"))
    ports = [free_port() for _ in range(3)]
    procs = []
    try:
        for port in ports:
            node = root / str(port)
            node.mkdir()
            procs.append(
                subprocess.Popen(
                    ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                     "--cluster-config-file", "nodes.conf", "--save", "", "--appendonly", "no"],
                    cwd=node, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
        for port in ports:
            deadline = time.time() + 10
            while (
                subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout
                != b"PONG\n"
            ):
                assert time.time() < deadline, f"node {port} did not start"
                time.sleep(0.1)
        nodes = [f"127.0.0.1:{p}" for p in ports]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        deadline = time.time() + 20
        while (
            b"cluster_state:ok"
            not in subprocess.run(
                ["redis-cli", "-p", str(ports[0]), "cluster", "info"], capture_output=True
            ).stdout
        ):
            assert time.time() < deadline, "the cluster did not come up"
            time.sleep(0.2)
        yield f"redis://127.0.0.1:{ports[0]}"
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


def test_store_on_a_cluster(cluster_url, tmp_path) -> None:
    """Every user's script runs in one slot; histories, de-duplication and the export work."""

    async def main() -> tuple:
        client = connect(cluster_url, timeout_seconds=2.0, cluster=True)
        try:
            store = HistoryStore(client, prefix="c", stream_shards=16)
            events = [
                Event(f"user{n % 40}", f"i{n}", timestamp=1000.0 + n, event_id=f"e{n}") for n in range(200)
            ]
            first = await store.append(events)
            again = await store.append(events[:50])
            histories = {u: await store.history(u, 100) for u in ("user0", "user39")}
            rows = await export_events(client, store.stream_keys, tmp_path / "log.csv")
            return first, again, histories, rows
        finally:
            await client.aclose()

    first, again, histories, rows = asyncio.run(main())
    assert (first.accepted, first.duplicates) == (200, 0)
    assert (again.accepted, again.duplicates) == (0, 50)
    assert histories["user0"] == [f"i{n}" for n in range(0, 200, 40)]
    assert histories["user39"] == [f"i{n}" for n in range(39, 200, 40)]
    assert rows == 200 and len(read_log(tmp_path / "log.csv").frame) == 200


def test_service_on_a_cluster(cluster_url, bundle_dir) -> None:
    settings = Settings(bundle_dir=bundle_dir, redis_url=cluster_url, redis_cluster=True, redis_prefix="svc")
    items = [f"i{n}" for n in range(1, 6)]
    with TestClient(create_app(settings)) as client:
        users = [{"user_id": f"u{n}", "item_id": i} for n in range(30) for i in items]
        stored = client.post("/events", json={"events": users})
        assert stored.json() == {"accepted": 150, "duplicates": 0, "unknown_items": 0}
        r = client.post("/recommend", json={"user_id": "u7", "n": 5})
        assert r.json()["source"] == "model" and not set(i["item_id"] for i in r.json()["items"]) & set(items)
        assert client.get("/readyz").json()["checks"] == {"bundle": True, "redis": True, "catalogue": True}
