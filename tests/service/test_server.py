"""`mqsa serve` as a process, for what only a real server shows: slow clients are timed out."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mqsa.demo import wait_ready

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(bundle_dir, redis_url, run_prefix) -> Iterator[int]:
    """A served bundle with a 1 s limit on request headers and on the body."""
    port = free_port()
    env = {
        **os.environ,
        "MQSA_REDIS_URL": redis_url,
        "MQSA_REDIS_PREFIX": f"{run_prefix}:server",
        "MQSA_HEADER_TIMEOUT_SECONDS": "1",
        "MQSA_BODY_TIMEOUT_SECONDS": "1",
    }
    cmd = [sys.executable, "-m", "mqsa.cli", "serve", "--bundle", str(bundle_dir), "--port", str(port)]
    server = subprocess.Popen([*cmd, "--log-level", "warning"], cwd=ROOT, env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}", server)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)


def closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing, or None if it was still open after ``seconds``."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except TimeoutError:
        return None
    return received


def test_a_client_that_never_finishes_its_headers_is_closed(served) -> None:
    """A thousand such clients used to hold a thousand connections open (issue 22, 10)."""
    socks = []
    for _ in range(50):
        s = socket.create_connection(("127.0.0.1", served))
        s.sendall(b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application")  # and nothing more
        socks.append(s)
    deadline = time.monotonic() + 4  # the limit is 1 s: all should be closed well before this
    outcomes = [closed_within(s, max(0.05, deadline - time.monotonic())) for s in socks]
    assert all(o == b"" for o in outcomes), outcomes[:3]  # closed, nothing sent
    for s in socks:
        s.close()


def test_a_body_that_does_not_arrive_is_a_408(served) -> None:
    with socket.create_connection(("127.0.0.1", served)) as s:
        head = (
            b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
        )
        s.sendall(head + b"\r\n{")
        answer = closed_within(s, 5)
    assert answer is not None and answer.startswith(b"HTTP/1.1 408")
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body == {
        "error": "request_timeout",
        "detail": "the request body did not arrive within 1 s",
        "fields": [],
    }


def test_a_slow_but_timely_client_is_served(served) -> None:
    with socket.create_connection(("127.0.0.1", served)) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\n")
        time.sleep(0.4)
        s.sendall(b"Host: x\r\nConnection: close\r\n\r\n")
        answer = closed_within(s, 5)
    assert answer is not None and answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"status":"ok"}')


def test_catalogue_load_sends_a_file_to_a_running_service(served, tmp_path) -> None:

    catalogue = tmp_path / "items.csv"
    catalogue.write_text(
        "item_id,categories,available\n" + "".join(f"c{n},cat{n % 3},true\n" for n in range(2500))
    )
    cmd = [
        sys.executable,
        "-m",
        "mqsa.cli",
        "catalogue",
        "load",
        str(catalogue),
        "--url",
        f"http://127.0.0.1:{served}",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "loaded 2500 items" in result.stdout

    got = httpx.get(f"http://127.0.0.1:{served}/items/c2499").json()
    assert got["categories"] == ["cat0"] and got["known_to_model"] is False
    bad = subprocess.run(
        [*cmd[:5], str(tmp_path / "none.csv"), *cmd[6:]], cwd=ROOT, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "none.csv: no such file" in bad.stderr
