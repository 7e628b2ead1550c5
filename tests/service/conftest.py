"""Real Redis for the service tests (never an imitation).

* ``redis_url`` (session): ``$REDIS_URL`` when set, else the local server on
  127.0.0.1:6379 when it answers PING, else a throwaway ``redis-server``
  started for the session on a free port (the tests skip when there is none).
* ``key_prefix`` (function): a fresh key prefix per test under the run's
  ``test-<hex>`` prefix; every key under it is deleted at the end of the run.
* ``redis_server_factory`` (function): starts private ``redis-server``
  processes that a test may stop, restart, pause and resume.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

LOCAL_URL = "redis://127.0.0.1:6379/0"


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str, timeout: float = 0.5) -> bool:
    """Whether a Redis server at ``url`` answers PING."""
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


class RedisServer:
    """A private, non-persistent ``redis-server`` on one port, which can be stopped and restarted.

    Data does not survive :meth:`stop`: a restarted server is empty.
    """

    def __init__(self, port: int | None = None, args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.args = args
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="redis-test-")
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start it (same port as before) and wait until it answers PING."""
        if self.process is not None:
            return self
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self.dir,
                "--loglevel", "warning",
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not answers(self.url, timeout=0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL) and wait until it has exited."""
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)  # in case it is paused
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash: no shutdown, no save; wait until it has exited."""
        if self.process is None:
            return
        process, self.process = self.process, None
        process.send_signal(signal.SIGCONT)
        process.kill()
        process.wait()

    def pause(self) -> None:
        """Freeze it (SIGSTOP): connections open but nothing is answered, like a hung server."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo :meth:`pause`."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def close(self) -> None:
        """Stop it and remove its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis for the session's tests: ``$REDIS_URL``, the local one, or a throwaway server."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    if answers(LOCAL_URL):
        yield LOCAL_URL
        return
    if shutil.which("redis-server") is None:
        pytest.skip("no Redis answers and redis-server is not installed")
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture(scope="session")
def run_prefix(redis_url: str) -> Iterator[str]:
    """This run's key prefix; every key under it is deleted at the end of the session."""
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    yield prefix
    client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        batch = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for i in range(0, len(batch), 500):
            client.delete(*batch[i : i + 500])
    except (redis.RedisError, OSError):
        pass
    finally:
        client.close()


@pytest.fixture
def key_prefix(run_prefix: str) -> str:
    """A key prefix of this test's own (under the run's prefix)."""
    return f"{run_prefix}:{uuid.uuid4().hex[:6]}"


@pytest.fixture
def redis_server_factory() -> Iterator[Callable[..., RedisServer]]:
    """Call it to start a private redis-server (``.url``, ``.stop()``, ``.kill()``, ``.start()``,
    ``.pause()``, ``.resume()``), with extra ``redis-server`` arguments if given; all are stopped
    and removed when the test ends."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    servers: list[RedisServer] = []

    def start(*args: str) -> RedisServer:
        server = RedisServer(args=args)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.close()
