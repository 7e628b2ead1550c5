"""HistoryStore against a real Redis: order, caps, TTLs, de-duplication, concurrency, outages."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.crc import key_slot

from mqsa.errors import StoreUnavailable
from mqsa.service.store import AppendResult, Event, HistoryStore, bucket_of, connect, stream_keys

# Generous against a loaded machine; the outage tests use the service's 0.5 s.
TIMEOUT = 3.0


def with_store(
    url: str, prefix: str, body: Callable[..., Awaitable[Any]], timeout: float = TIMEOUT, **options: Any
) -> Any:
    """Run ``await body(store, client)`` in a fresh event loop with a fresh client."""

    async def main() -> Any:
        client = connect(url, timeout_seconds=timeout)
        try:
            return await body(HistoryStore(client, prefix=prefix, **options), client)
        finally:
            await client.aclose()

    return asyncio.run(main())


def events(user: str, items: list[str], **kwargs: Any) -> list[Event]:
    return [Event(user, item, **kwargs) for item in items]


def test_append_then_history_oldest_first(redis_url, key_prefix):
    async def body(store, client):
        first = await store.append(events("alice", ["a", "b"]))
        second = await store.append([Event("alice", "c"), Event("bob", "x"), Event("alice", "d")])
        return (
            first,
            second,
            await store.history("alice", 10),
            await store.history("alice", 2),
            await store.history("bob", 10),
            await store.history("alice", 0),
            await store.history("nobody", 10),
            await store.append([]),
        )

    first, second, alice, last_two, bob, none, nobody, empty = with_store(redis_url, key_prefix, body)
    assert first == AppendResult(accepted=2, duplicates=0)
    assert second == AppendResult(accepted=3, duplicates=0)
    assert alice == ["a", "b", "c", "d"]
    assert last_two == ["c", "d"]
    assert bob == ["x"]
    assert none == [] and nobody == []
    assert empty == AppendResult(accepted=0, duplicates=0)


def test_history_is_trimmed_to_the_cap(redis_url, key_prefix):
    async def body(store, client):
        await store.append(events("u", [f"i{n}" for n in range(3)]))
        await store.append(events("u", [f"i{n}" for n in range(3, 8)]))
        return await store.history("u", 100), await client.llen(store.items_key("u"))

    history, length = with_store(redis_url, key_prefix, body, history_cap=5)
    assert history == ["i3", "i4", "i5", "i6", "i7"]
    assert length == 5


def test_the_history_keeps_its_ttl_and_the_event_ids_their_window(redis_url, key_prefix):
    async def body(store, client):
        await store.append([Event("u", "a", event_id="e1")])
        return await client.ttl(store.items_key("u")), await client.ttl(store.events_key("u"))

    items_ttl, events_ttl = with_store(redis_url, key_prefix, body, ttl_seconds=100, dedup_window_seconds=30)
    assert 90 < items_ttl <= 100
    assert 20 < events_ttl <= 30  # the ids are kept a window, not as long as the history


def test_a_users_keys_and_its_stream_share_one_slot(redis_url, key_prefix):
    """Every key the append script touches carries the bucket's hash tag: it runs on Redis Cluster."""

    async def body(store, client):
        await store.append([Event("alice", "a", event_id="e1"), Event("bob", "b")])
        return sorted([key async for key in client.scan_iter(match=f"{key_prefix}*")])

    keys = with_store(redis_url, key_prefix, body, stream_shards=8)
    a, b = bucket_of("alice", 8), bucket_of("bob", 8)
    alice = [f"{key_prefix}:{{b{a}}}:u:alice:items", f"{key_prefix}:{{b{a}}}:u:alice:events"]
    bob = [f"{key_prefix}:{{b{b}}}:u:bob:items"]  # no event id sent, so no set of seen ids
    streams = {f"{key_prefix}:{{b{a}}}:events", f"{key_prefix}:{{b{b}}}:events"}
    assert keys == sorted([*alice, *bob, *streams])
    assert {key_slot(k.encode()) for k in [*alice, f"{key_prefix}:{{b{a}}}:events"]} == {
        key_slot(f"b{a}".encode())
    }
    assert stream_keys(key_prefix, 8)[a] == f"{key_prefix}:{{b{a}}}:events"


def test_users_spread_over_the_buckets():
    buckets = {bucket_of(f"user-{n}", 16) for n in range(1000)}
    assert buckets == set(range(16))
    with pytest.raises(ValueError, match="braces"):
        HistoryStore(None, prefix="p{x}")  # type: ignore[arg-type]


def test_duplicate_event_ids_are_applied_once(redis_url, key_prefix):
    async def body(store, client):
        first = await store.append(
            [Event("u", "a", event_id="e1"), Event("u", "b", event_id="e2"), Event("u", "a2", event_id="e1")]
        )
        resent = await store.append(
            [Event("u", "b", event_id="e2"), Event("u", "c", event_id="e3"), Event("v", "b", event_id="e2")]
        )
        stream = await client.xrange(store.stream_keys[0])
        return first, resent, await store.history("u", 10), await store.history("v", 10), stream

    first, resent, u, v, stream = with_store(redis_url, key_prefix, body)
    assert first == AppendResult(accepted=2, duplicates=1)  # within one request
    assert resent == AppendResult(accepted=2, duplicates=1)  # across requests; ids are per user
    assert u == ["a", "b", "c"]
    assert v == ["b"]
    assert [(f["user_id"], f["item_id"], f["event_id"]) for _, f in stream] == [
        ("u", "a", "e1"),
        ("u", "b", "e2"),
        ("u", "c", "e3"),
        ("v", "b", "e2"),
    ]


def test_events_without_an_id_are_always_applied(redis_url, key_prefix):
    async def body(store, client):
        one = await store.append([Event("u", "a"), Event("u", "a"), Event("u", "a", event_id="")])
        two = await store.append([Event("u", "a")])
        return one, two, await store.history("u", 10), await client.xlen(store.stream_keys[0])

    one, two, history, stream_length = with_store(redis_url, key_prefix, body)
    assert one == AppendResult(accepted=3, duplicates=0)
    assert two == AppendResult(accepted=1, duplicates=0)
    assert history == ["a", "a", "a", "a"]
    assert stream_length == 4


def test_event_ids_are_remembered_up_to_the_dedup_cap(redis_url, key_prefix):
    async def body(store, client):
        await store.append([Event("u", f"i{n}", event_id=f"e{n}") for n in range(5)])
        size = await client.zcard(store.events_key("u"))
        newest = await store.append([Event("u", "again", event_id="e4")])
        oldest = await store.append([Event("u", "again", event_id="e0")])  # forgotten, so accepted
        return size, newest, oldest

    size, newest, oldest = with_store(redis_url, key_prefix, body, dedup_cap=3)
    assert size == 3
    assert newest == AppendResult(accepted=0, duplicates=1)
    assert oldest == AppendResult(accepted=1, duplicates=0)


def test_event_ids_are_forgotten_after_the_window(redis_url, key_prefix):
    """A resend within the window is a duplicate; after it, a new event (issue 22, 9)."""

    async def body(store, client):
        first = await store.append([Event("u", "a", event_id="e1"), Event("u", "b", event_id="e2")])
        within = await store.append([Event("u", "a", event_id="e1")])
        await asyncio.sleep(1.2)
        after = await store.append([Event("u", "a", event_id="e1")])
        return first, within, after, await client.zcard(store.events_key("u"))

    first, within, after, remembered = with_store(redis_url, key_prefix, body, dedup_window_seconds=1)
    assert first.accepted == 2 and within == AppendResult(accepted=0, duplicates=1)
    assert after == AppendResult(accepted=1, duplicates=0)
    assert remembered == 1  # e2 left with the window; e1 is back


def test_a_users_memory_is_bounded_by_the_dedup_cap_whatever_the_ids(redis_url, key_prefix):
    """10,000 UUID event ids used to make a 1.4 MB set per user. Ids are kept as 16-hex digests,
    at most dedup_cap of them: the set's size depends on the count, not on what clients send."""
    import uuid

    async def body(store, client):
        for start in range(0, 10_000, 1000):
            await store.append(
                [Event("heavy", f"i{n % 50}", event_id=str(uuid.uuid4())) for n in range(start, start + 1000)]
            )
        members = await client.zrange(store.events_key("heavy"), 0, -1)
        usage = await client.memory_usage(store.events_key("heavy"))
        history = await client.memory_usage(store.items_key("heavy"))
        return members, usage, history

    members, usage, history = with_store(redis_url, key_prefix, body, history_cap=200)  # dedup_cap 128
    assert len(members) == 128 and {len(m) for m in members} == {16}
    assert usage < 5_000, usage  # was about 1,400,000 for these ids
    assert history < 5_000, history


def test_concurrent_reads_go_out_together_on_one_connection(redis_server_factory):
    """Fifty requests reading at once cost one round trip: the pool opens one connection, not 50."""
    server = redis_server_factory()
    users = {f"u{k}": [f"i{k}-{j}" for j in range(k % 7 + 1)] for k in range(50)}

    async def body(store, writer):
        for user, items in users.items():
            await store.append(events(user, items))
        reader = connect(server.url, timeout_seconds=TIMEOUT)
        try:
            before = (await writer.info("stats"))["total_connections_received"]
            reading = HistoryStore(reader, prefix="t")
            limits = {user: 1 + k % 4 for k, user in enumerate(users)}
            results = await asyncio.gather(*(reading.history(user, limits[user]) for user in users))
            after = (await writer.info("stats"))["total_connections_received"]
        finally:
            await reader.aclose()
        return limits, results, after - before

    limits, results, connections = with_store(server.url, "t", body)
    assert results == [items[-limits[user] :] for user, items in users.items()]
    assert connections == 1


def test_one_users_broken_key_fails_only_that_users_read(redis_url, key_prefix):
    from redis.exceptions import ResponseError

    async def body(store, client):
        await store.append(events("a", ["x"]) + events("c", ["y", "z"]))
        await client.set(store.items_key("b"), "not a list")
        return await asyncio.gather(*(store.history(u, 10) for u in "abc"), return_exceptions=True)

    a, b, c = with_store(redis_url, key_prefix, body)
    assert a == ["x"] and c == ["y", "z"]
    assert isinstance(b, ResponseError) and "WRONGTYPE" in str(b)


def test_an_outage_fails_every_waiting_read_and_a_cancelled_read_harms_none(redis_server_factory):
    server = redis_server_factory()

    async def body(store, client):
        await store.append(events("u", ["a", "b"]))
        reads = [asyncio.ensure_future(store.history("u", 10)) for _ in range(5)]
        reads[0].cancel()
        served = await asyncio.gather(*reads[1:])
        server.stop()
        failed = await asyncio.gather(*(store.history("u", 10) for _ in range(5)), return_exceptions=True)
        return reads[0].cancelled(), served, failed

    cancelled, served, failed = with_store(server.url, "t", body, timeout=0.5)
    assert cancelled and served == [["a", "b"]] * 4
    assert all(isinstance(e, StoreUnavailable) and "redis unavailable" in str(e) for e in failed)


def test_closing_the_store_cancels_the_reads_in_flight(redis_server_factory):
    """At shutdown, requests waiting on a hung Redis are cancelled at once, not left waiting."""
    server = redis_server_factory()

    async def body(store, client):
        await store.append(events("u", ["a"]))
        server.pause()
        try:
            reads = [asyncio.ensure_future(store.history("u", 10)) for _ in range(3)]
            await asyncio.sleep(0.1)  # the pipeline is out, waiting for a reply
            started = time.monotonic()
            await store.close()
            await asyncio.gather(*reads, return_exceptions=True)
            return time.monotonic() - started, [r.cancelled() for r in reads]
        finally:
            server.resume()

    elapsed, cancelled = with_store(server.url, "t", body)  # 3 s timeout: the close must not wait for it
    assert elapsed < 1.0 and cancelled == [True, True, True]


def test_a_bug_is_not_reported_as_redis_being_down(redis_url, key_prefix):
    """WRONGTYPE is not Redis's state but a bug: it keeps its own error (a 500), not a 503."""
    from redis.exceptions import ResponseError

    async def body(store, client):
        await client.set(store.items_key("u"), "not a list")
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await store.history("u", 10)
        return True

    assert with_store(redis_url, key_prefix, body)


def test_a_full_redis_is_unavailable_not_a_bug(key_prefix, redis_server_factory):
    """Under maxmemory with noeviction, Redis refuses writes: that is a 503 with Retry-After."""
    server = redis_server_factory("--maxmemory", "2mb", "--maxmemory-policy", "noeviction")

    async def body(store, client):
        await client.config_set("maxmemory", "0")
        await client.set("filler", "x" * 3_000_000)
        await client.config_set("maxmemory", "2mb")  # now over the limit
        with pytest.raises(StoreUnavailable, match="OutOfMemoryError"):
            await store.append([Event("u", "a")])
        return True

    assert with_store(server.url, key_prefix, body)


def test_concurrent_appends_lose_nothing_and_keep_each_requests_order(redis_url, key_prefix):
    rng = random.Random(0)
    requests = [[f"r{r}-{k}" for k in range(rng.randint(1, 3))] for r in range(200)]

    async def body(store, client):
        results = await asyncio.gather(*(store.append(events("hot", items)) for items in requests))
        return results, await store.history("hot", 10_000), await client.xlen(store.stream_keys[0])

    results, history, stream_length = with_store(redis_url, key_prefix, body, history_cap=10_000)
    total = sum(len(items) for items in requests)
    assert sum(r.accepted for r in results) == total and not any(r.duplicates for r in results)
    assert len(history) == total and stream_length == total
    assert sorted(history) == sorted(item for items in requests for item in items)
    for items in requests:  # each request's events are contiguous and in order
        start = history.index(items[0])
        assert history[start : start + len(items)] == items


def test_stream_entries_match_the_accepted_events(redis_url, key_prefix):
    async def body(store, client):
        before = time.time()
        await store.append(
            [Event("u", "a", timestamp=1_700_000_000.5, event_id="e1"), Event("v", "b"), Event("u", "c")]
        )
        after = time.time()
        return before, after, await client.xrange(store.stream_keys[0])

    before, after, stream = with_store(redis_url, key_prefix, body)
    fields = [f for _, f in stream]
    assert [(f["user_id"], f["item_id"], f["event_id"]) for f in fields] == [
        ("u", "a", "e1"),
        ("u", "c", ""),
        ("v", "b", ""),
    ]  # grouped by user, in order of the users' first events
    assert float(fields[0]["timestamp"]) == 1_700_000_000.5
    assert before <= float(fields[1]["timestamp"]) == float(fields[2]["timestamp"]) <= after


def test_stream_is_capped_near_maxlen(redis_url, key_prefix):
    async def body(store, client):
        for r in range(30):
            await store.append([Event(f"u{r % 3}", f"i{r}-{k}") for k in range(10)])
        stream = await client.xrange(store.stream_keys[0], count=1000)
        return stream, await client.xrevrange(store.stream_keys[0], count=1)

    stream, newest = with_store(redis_url, key_prefix, body, stream_maxlen=10)
    assert 10 <= len(stream) <= 10 + 100  # MAXLEN ~ trims whole nodes (100 entries each by default)
    assert newest[0][1]["item_id"] == "i29-9"


def test_script_is_reloaded_after_script_flush(redis_server_factory):
    server = redis_server_factory()

    async def body(store, client):
        await store.append([Event("u", "a")])
        await client.script_flush()
        result = await store.append([Event("u", "b", event_id="e"), Event("v", "c")])
        return result, await store.history("u", 10), await store.history("v", 10)

    result, u, v = with_store(server.url, "t", body)
    assert result == AppendResult(accepted=2, duplicates=0)
    assert u == ["a", "b"] and v == ["c"]


def test_invalid_events_are_refused_before_redis(redis_url, key_prefix):
    async def body(store, client):
        for bad in (Event("", "a"), Event("u", ""), Event("u", "a", timestamp=float("nan"))):
            with pytest.raises(ValueError):
                await store.append([Event("u", "ok"), bad])
        return await store.history("u", 10)

    assert with_store(redis_url, key_prefix, body) == []
    with pytest.raises(ValueError):
        HistoryStore(None, history_cap=0)  # type: ignore[arg-type]


def test_stopped_redis_fails_fast_and_recovers_after_restart(redis_server_factory):
    server = redis_server_factory()

    async def body(store, client):
        assert await store.append([Event("u", "a")]) == AppendResult(1, 0)
        assert await store.ping() is True
        server.stop()
        for call in (store.append([Event("u", "b")]), store.history("u", 10)):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="redis unavailable") as info:
                await call
            assert time.monotonic() - started < 2.0
            assert info.value.status_code == 503 and info.value.__cause__ is not None
        assert await store.ping() is False
        server.start()  # empty again: nothing is persisted
        assert await store.ping() is True
        assert await store.append([Event("u", "c")]) == AppendResult(1, 0)
        return await store.history("u", 10)

    assert with_store(server.url, "t", body, timeout=0.5) == ["c"]


def test_hung_redis_fails_within_the_timeout(redis_server_factory):
    server = redis_server_factory()

    async def body(store, client):
        await store.append([Event("u", "a")])  # opens a pooled connection
        server.pause()
        try:
            for call in (store.append([Event("u", "b")]), store.history("u", 10)):
                started = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    await call
                assert time.monotonic() - started < 2.0
        finally:
            server.resume()
        return await store.history("u", 10)

    # The timed-out append may still have run once Redis woke up: clients resend with event ids.
    assert with_store(server.url, "t", body, timeout=0.5) in (["a"], ["a", "b"])


def test_applied_flags_follow_request_order_across_users(redis_url, key_prefix):
    async def body(store: HistoryStore, client) -> AppendResult:
        await store.append([Event("a", "x", event_id="1")])
        return await store.append(
            [
                Event("b", "y", event_id="1"),
                Event("a", "z", event_id="1"),  # seen before for user a
                Event("a", "w", event_id="2"),
                Event("b", "v", event_id="1"),  # seen earlier in this request for user b
            ]
        )

    result = with_store(redis_url, key_prefix, body)
    assert result.applied == [True, False, True, False]
    assert (result.accepted, result.duplicates) == (2, 2)


def test_a_redis_restart_costs_no_request(key_prefix, redis_server_factory):
    """60 pooled connections, then Redis is killed (-9) and restarted on its port: every pooled
    connection is dead. Each call finds that out and retries once on a fresh connection, so the
    next 60 concurrent appends all succeed (before: 59 of 60 answered 503; issue 22, 6)."""
    server = redis_server_factory()

    async def main() -> tuple[int, list[Any]]:
        client = connect(server.url, timeout_seconds=TIMEOUT, health_check_seconds=30)
        store = HistoryStore(client, prefix=key_prefix)
        try:
            await asyncio.gather(*(store.append(events(f"u{n}", ["a"])) for n in range(60)))
            pool = client.connection_pool
            pooled = len(pool._available_connections) + len(pool._in_use_connections)
            server.kill()
            server.start()
            outcomes = await asyncio.gather(
                *(store.append(events(f"u{n}", ["b"])) for n in range(60)), return_exceptions=True
            )
            return pooled, outcomes
        finally:
            await client.aclose()

    pooled, outcomes = asyncio.run(main())
    assert pooled >= 30  # the burst really filled the pool with connections that then died
    failures = [o for o in outcomes if isinstance(o, Exception)]
    assert failures == [], failures[:3]
    assert all(o.accepted == 1 for o in outcomes)
