"""When /events answers (MQSA_ACK): the plan for each server, and real servers keeping it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from mqsa.errors import ConfigError, StoreUnavailable
from mqsa.service.app import create_app
from mqsa.service.durability import AckPolicy, plan
from mqsa.service.settings import Settings
from mqsa.service.store import Event, HistoryStore, connect

EVERYSEC = {"appendonly": "yes", "appendfsync": "everysec"}
ALWAYS = {"appendonly": "yes", "appendfsync": "always"}


def test_memory_acks_say_what_they_guarantee() -> None:
    assert plan(AckPolicy(), (7, 0, 15), EVERYSEC, cluster=False).guarantee == (
        "applied in memory, on disk within about a second (appendfsync everysec)"
    )
    assert (
        plan(AckPolicy(), (7, 0), ALWAYS, cluster=False).guarantee == "applied on disk (appendfsync always)"
    )
    assert "unknown" in plan(AckPolicy(), (7, 0), None, cluster=False).guarantee
    assert plan(AckPolicy(), (7, 0), EVERYSEC, cluster=False).command is None


def test_disk_acks_wait_for_the_aof_where_redis_can_say_so() -> None:
    assert plan(AckPolicy("disk"), (7, 2, 4), EVERYSEC, cluster=False).command == ("WAITAOF", 1, 0, 1000)
    assert plan(AckPolicy("disk", replicas=2), (8, 0), None, cluster=False).command == ("WAITAOF", 1, 2, 1000)
    always = plan(AckPolicy("disk"), (7, 0, 15), ALWAYS, cluster=False)
    assert always.command is None and "appendfsync always" in always.guarantee  # Redis fsyncs before replying
    with pytest.raises(
        ConfigError, match=r"needs Redis >= 7\.2 \(WAITAOF\) or appendonly yes \+ appendfsync always"
    ):
        plan(AckPolicy("disk"), (7, 0, 15), EVERYSEC, cluster=False)
    with pytest.raises(ConfigError, match="CONFIG refused"):
        plan(AckPolicy("disk"), (7, 0), None, cluster=False)
    with pytest.raises(ConfigError, match="not supported on Redis Cluster"):
        plan(AckPolicy(replicas=1), (7, 2), ALWAYS, cluster=True)


def test_replica_acks_wait_for_the_replicas() -> None:
    assert plan(AckPolicy(replicas=1, timeout_ms=50), (7, 0), EVERYSEC, cluster=False).command == (
        "WAIT",
        1,
        50,
    )


def append_once(url: str, prefix: str, **policy: Any) -> Any:
    async def main() -> Any:
        client = connect(url, timeout_seconds=2.0)
        try:
            return await HistoryStore(client, prefix=prefix, **policy).append(
                [Event("u", "a", event_id="e1")]
            )
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_the_service_refuses_a_disk_ack_it_cannot_keep(bundle_dir, key_prefix, redis_server_factory) -> None:
    """Redis 7.0 with appendfsync everysec cannot promise disk: the service does not start."""
    server = redis_server_factory("--appendonly", "yes", "--appendfsync", "everysec")
    settings = Settings(bundle_dir=bundle_dir, redis_url=server.url, redis_prefix=key_prefix, ack="disk")
    with pytest.raises(ConfigError, match="MQSA_ACK=disk needs"), TestClient(create_app(settings)):
        pass


def test_a_disk_ack_on_an_fsync_always_server(key_prefix, redis_server_factory) -> None:
    server = redis_server_factory("--appendonly", "yes", "--appendfsync", "always")
    assert append_once(server.url, key_prefix, ack="disk").accepted == 1


def test_replica_acks_on_real_replicas(key_prefix, redis_server_factory) -> None:
    """With a replica up the append answers once it has the events; with it gone, after the
    timeout, a 503 that says the events are applied but not confirmed."""
    primary = redis_server_factory()
    replica = redis_server_factory("--replicaof", "127.0.0.1", str(primary.port))
    import redis

    probe = redis.Redis.from_url(replica.url)
    deadline = time.monotonic() + 20
    while probe.info("replication").get("master_link_status") != "up":  # until the first sync is done
        assert time.monotonic() < deadline, "the replica never synced"
        time.sleep(0.05)
    assert append_once(primary.url, key_prefix, ack_replicas=1, ack_timeout_ms=1000).accepted == 1
    assert redis.Redis.from_url(replica.url).lrange(f"{key_prefix}:{{b0}}:u:u:items", 0, -1) == [b"a"]
    replica.stop()
    with pytest.raises(StoreUnavailable, match=r"applied but not confirmed within 200 ms .*replicas: 0 of 1"):
        append_once(primary.url, f"{key_prefix}:2", ack_replicas=1, ack_timeout_ms=200)
    probe.close()
