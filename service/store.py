"""Per-user item histories in Redis, with event-id de-duplication and an event stream.

Keys, for a prefix ``p`` (default ``mqsa``) and the user's bucket
``b = crc32(user_id) % stream_shards``:

* ``p:{b<b>}:u:<user_id>:items`` – a LIST of external item ids, newest at the
  right, trimmed to ``history_cap``.
* ``p:{b<b>}:u:<user_id>:events`` – a ZSET of the user's recent event ids, scored
  by arrival (a per-user sequence number), trimmed to the ``dedup_cap`` newest.
* ``p:{b<b>}:events`` – the bucket's STREAM of every accepted event (fields
  ``user_id``, ``item_id``, ``timestamp``, ``event_id``), capped near
  ``stream_maxlen / stream_shards``; :mod:`mqsa.service.event_log` exports all the
  buckets' streams as the raw log that training reads.

All three keys carry the bucket's hash tag ``{b<b>}``, so a user's keys and the
stream the script appends to live in one slot: the script runs on Redis
Cluster, and ``stream_shards`` buckets spread users over that many slots (one
bucket = one slot; the service's default is 16). The per-user keys share the
TTL: every append refreshes it.

Design: :meth:`HistoryStore.append` groups a request's events by user and sends
one Lua script call (EVALSHA) per user, all in one non-transactional pipeline:
one round trip per request. The script is atomic per user: it skips events
whose id the user has already sent, pushes the others to the history, records
their ids and XADDs them to the stream, then trims and refreshes the TTLs. A
duplicate thus never reaches the history or the stream, and concurrent appends
for one user never interleave. A request spanning several users is atomic per
user only: if Redis fails half-way, some users' events may be stored and others
not, and the request fails; resending it with the same event ids is safe.

Needs Redis >= 6.2 (``XRANGE`` with exclusive ranges, in the exporter). Redis
errors are translated into :class:`~mqsa.errors.StoreUnavailable` in one
place, :func:`redis_errors`. Never imports torch, ``models`` or ``training``.
"""

from __future__ import annotations

import asyncio
import math
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from mqsa.errors import StoreUnavailable

# KEYS: items list, event-id zset, stream.
# ARGV: user_id, history_cap, ttl_seconds, stream_maxlen, dedup_cap, then
#       (item_id, timestamp, event_id) per event, event_id '' when absent.
# Returns one flag per event: 1 accepted, 0 duplicate.
APPEND_SCRIPT = """
local items, seen, stream = KEYS[1], KEYS[2], KEYS[3]
local user_id = ARGV[1]
local cap = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local maxlen = ARGV[4]
local dedup_cap = tonumber(ARGV[5])
local seq = 0
local last = redis.call('ZRANGE', seen, -1, -1, 'WITHSCORES')
if last[2] then seq = tonumber(last[2]) end
local flags = {}
for i = 6, #ARGV, 3 do
  local item, ts, eid = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local fresh = 1
  if eid ~= '' then
    if redis.call('ZSCORE', seen, eid) then
      fresh = 0
    else
      seq = seq + 1
      redis.call('ZADD', seen, seq, eid)
    end
  end
  if fresh == 1 then
    redis.call('RPUSH', items, item)
    redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*',
      'user_id', user_id, 'item_id', item, 'timestamp', ts, 'event_id', eid)
  end
  flags[#flags + 1] = fresh
end
local extra = redis.call('ZCARD', seen) - dedup_cap
if extra > 0 then redis.call('ZREMRANGEBYRANK', seen, 0, extra - 1) end
redis.call('LTRIM', items, -cap, -1)
redis.call('EXPIRE', items, ttl)
redis.call('EXPIRE', seen, ttl)
return flags
"""


@dataclass
class Event:
    """One interaction: a user saw/bought/clicked an item.

    Attributes:
        user_id: the external user id, non-empty.
        item_id: the external item id, non-empty.
        timestamp: seconds since the epoch; the server's clock when None.
        event_id: the client's id for this event, for de-duplication of resends;
            None (or empty) when the event is never resent.
    """

    user_id: str
    item_id: str
    timestamp: float | None = None
    event_id: str | None = None


@dataclass
class AppendResult:
    """What one :meth:`HistoryStore.append` call did, summed over its events.

    Attributes:
        accepted: events added to histories and to the stream.
        duplicates: events skipped because their user had already sent their event id.
        applied: per event, in request order, whether it was accepted.
    """

    accepted: int
    duplicates: int
    applied: list[bool] = field(default_factory=list, compare=False)


@contextmanager
def redis_errors() -> Iterator[None]:
    """Translate every Redis failure in the block into :class:`StoreUnavailable`.

    The one place where redis-py's exceptions (connection refused or lost,
    timeouts, pool exhausted, error replies) and socket-level ``OSError`` become
    the service's 503.

    Raises:
        StoreUnavailable: from the original exception.
    """
    try:
        yield
    except (RedisError, OSError) as exc:
        raise StoreUnavailable(f"redis unavailable: {type(exc).__name__}: {exc}") from exc


def connect(
    url: str,
    timeout_seconds: float = 0.5,
    max_connections: int = 64,
    pool_timeout_seconds: float = 2.0,
    connect_timeout_seconds: float = 2.0,
    cluster: bool = False,
) -> aioredis.Redis | aioredis.RedisCluster:
    """An asyncio Redis client for the store, with its own bounded connection pool.

    Every send and read times out after ``timeout_seconds``, opening a
    connection after ``connect_timeout_seconds`` (a burst opens many at once);
    waiting for a free connection when all ``max_connections`` are busy times
    out after ``pool_timeout_seconds`` (a burst of requests queues briefly
    instead of failing); nothing is retried (a retried pipeline could apply
    events twice, and a hung Redis must fail a request, not stall it).
    Replies are decoded to ``str``. Close it with ``await client.aclose()``,
    which also closes the pool. No connection is opened until the first command.

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` or ``unix://``;
            with ``cluster``, any node of the cluster.
        timeout_seconds: the limit on each socket operation.
        max_connections: the most connections the pool opens (per node on a cluster).
        pool_timeout_seconds: the limit on waiting for a free connection.
        connect_timeout_seconds: the limit on opening a connection.
        cluster: talk to a Redis Cluster (every command routed to its slot's node).

    Returns:
        The client; it owns the pool.
    """
    if cluster:
        return aioredis.RedisCluster.from_url(
            url,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=connect_timeout_seconds,
            max_connections=max_connections,
            decode_responses=True,
            retry=Retry(NoBackoff(), 0),
        )
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=pool_timeout_seconds,
        socket_timeout=timeout_seconds,
        socket_connect_timeout=connect_timeout_seconds,
        decode_responses=True,
        retry=Retry(NoBackoff(), 0),
    )
    return aioredis.Redis.from_pool(pool)


def bucket_of(user_id: str, shards: int) -> int:
    """The user's bucket: crc32 of the id modulo the shard count (stable across processes)."""
    return zlib.crc32(user_id.encode()) % shards


def stream_keys(prefix: str, shards: int) -> list[str]:
    """Every bucket's stream key, bucket 0 first."""
    return [f"{prefix}:{{b{b}}}:events" for b in range(shards)]


class HistoryStore:
    """Recent item histories per user, appended atomically with de-duplication by event id.

    Args:
        redis: an asyncio client, best made by :func:`connect` (``decode_responses=True``
            and no retries).
        prefix: the first part of every key.
        history_cap: the most items kept per user (the newest).
        ttl_seconds: a user's keys expire this long after their last append.
        stream_maxlen: the event stream is trimmed to about this many entries
            (``MAXLEN ~``: Redis trims whole nodes, so it may hold up to about a
            hundred more).
        dedup_cap: the most event ids remembered per user (the newest); an event
            resent after this many newer ones is accepted again.
        stream_shards: how many buckets (hash-tag slots, one stream each) users are
            spread over; 1 keeps everything in one slot.

    Raises:
        ValueError: for a cap, TTL, length or shard count below 1, or a prefix with braces.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str = "mqsa",
        history_cap: int = 200,
        ttl_seconds: int = 30 * 24 * 3600,
        stream_maxlen: int = 1_000_000,
        dedup_cap: int = 10_000,
        stream_shards: int = 1,
    ) -> None:
        for name, value in (
            ("history_cap", history_cap),
            ("ttl_seconds", ttl_seconds),
            ("stream_maxlen", stream_maxlen),
            ("dedup_cap", dedup_cap),
            ("stream_shards", stream_shards),
        ):
            if int(value) < 1:
                raise ValueError(f"{name} must be at least 1, got {value!r}")
        self.redis = redis
        self.prefix = prefix
        self.history_cap = int(history_cap)
        self.ttl_seconds = int(ttl_seconds)
        self.stream_maxlen = int(stream_maxlen)
        self._shard_maxlen = max(1, self.stream_maxlen // max(1, int(stream_shards)))
        self.dedup_cap = int(dedup_cap)
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"the key prefix must not contain braces (hash tags), got {prefix!r}")
        self.stream_shards = int(stream_shards)
        self.stream_keys = stream_keys(prefix, self.stream_shards)
        self._script = redis.register_script(APPEND_SCRIPT)

    def _tagged(self, user_id: str) -> str:
        return f"{self.prefix}:{{b{bucket_of(user_id, self.stream_shards)}}}"

    def items_key(self, user_id: str) -> str:
        """The user's history list: ``{prefix}:{b<bucket>}:u:<user_id>:items``."""
        return f"{self._tagged(user_id)}:u:{user_id}:items"

    def events_key(self, user_id: str) -> str:
        """The user's set of seen event ids: ``{prefix}:{b<bucket>}:u:<user_id>:events``."""
        return f"{self._tagged(user_id)}:u:{user_id}:events"

    def stream_key_for(self, user_id: str) -> str:
        """The stream of the user's bucket: ``{prefix}:{b<bucket>}:events``."""
        return f"{self._tagged(user_id)}:events"

    async def append(self, events: list[Event]) -> AppendResult:
        """Add events to their users' histories and to the stream, skipping resent event ids.

        Events are grouped by user in order of arrival; each user's events are
        applied in one atomic script call, and all users' calls go in one
        pipeline round trip. Events without a timestamp get ``time.time()``.

        Args:
            events: the request's events, in arrival order; may mix users.

        Returns:
            How many events were accepted and how many were duplicates.

        Raises:
            ValueError: for an empty user or item id or a timestamp that is not finite.
            StoreUnavailable: when Redis fails; some users' events may then have been stored.
        """
        if not events:
            return AppendResult(accepted=0, duplicates=0, applied=[])
        now = time.time()
        groups: dict[str, list[str]] = {}
        for event in events:
            if not event.user_id or not event.item_id:
                raise ValueError(f"empty user or item id in {event!r}")
            stamp = now if event.timestamp is None else float(event.timestamp)
            if not math.isfinite(stamp):
                raise ValueError(f"timestamp is not finite in {event!r}")
            groups.setdefault(event.user_id, []).extend((event.item_id, repr(stamp), event.event_id or ""))
        calls = [
            (
                [self.items_key(user), self.events_key(user), self.stream_key_for(user)],
                [user, self.history_cap, self.ttl_seconds, self._shard_maxlen, self.dedup_cap, *triples],
            )
            for user, triples in groups.items()
        ]
        with redis_errors():
            results = await self._run_scripts(calls)
        flags = {user: iter(result) for user, result in zip(groups, results, strict=True)}
        applied = [bool(int(next(flags[event.user_id]))) for event in events]  # back in request order
        accepted = sum(applied)
        return AppendResult(accepted=accepted, duplicates=len(events) - accepted, applied=applied)

    async def _run_scripts(self, calls: list[tuple[list[str], list[Any]]]) -> list[list[int]]:
        """EVALSHA each (keys, args) in one pipeline (concurrently on a cluster); load the
        script and rerun the calls that got NOSCRIPT.

        A NOSCRIPT reply means that call did nothing, so rerunning only those is safe.
        (redis-py's ``Script`` in a pipeline would send ``SCRIPT EXISTS`` first, every time.)
        """
        sha = self._script.sha
        results: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        for attempt in range(2):
            if isinstance(self.redis, aioredis.RedisCluster):
                # Cluster pipelines refuse EVALSHA: send the calls concurrently, each to its slot's node
                # (after the slot map is loaded: concurrent first calls would race to load it).
                await self.redis.initialize()
                replies = await asyncio.gather(
                    *(self.redis.evalsha(sha, len(calls[i][0]), *calls[i][0], *calls[i][1]) for i in pending),
                    return_exceptions=True,
                )
            else:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for i in pending:
                        keys, args = calls[i]
                        pipe.evalsha(sha, len(keys), *keys, *args)
                    replies = await pipe.execute(raise_on_error=False)
            missing = []
            for i, reply in zip(pending, replies, strict=True):
                if isinstance(reply, NoScriptError) and attempt == 0:
                    missing.append(i)
                elif isinstance(reply, Exception):
                    raise reply
                else:
                    results[i] = reply
            if not missing:
                break
            sha = self._script.sha = await self.redis.script_load(self._script.script)
            pending = missing
        return results

    async def history(self, user_id: str, limit: int) -> list[str]:
        """The user's last ``limit`` item ids, oldest first; empty for an unknown user.

        Raises:
            StoreUnavailable: when Redis fails.
        """
        if limit <= 0:
            return []
        with redis_errors():
            items = await self.redis.lrange(self.items_key(user_id), -limit, -1)
        return [item.decode() if isinstance(item, bytes) else item for item in items]

    async def ping(self) -> bool:
        """Whether Redis answers; False (never an exception) when it does not."""
        try:
            with redis_errors():
                return bool(await self.redis.ping())
        except StoreUnavailable:
            return False
