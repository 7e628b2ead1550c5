"""Per-user item histories in Redis, with event-id de-duplication and an event stream.

Keys, for a prefix ``p`` (default ``mqsa``) and the user's bucket
``b = crc32(user_id) % stream_shards``:

* ``p:{b<b>}:u:<user_id>:items`` – a LIST of external item ids, newest at the
  right, trimmed to ``history_cap``.
* ``p:{b<b>}:u:<user_id>:events`` – a ZSET of 64-bit digests of the user's recent
  event ids (:func:`dedup_key`), scored by arrival time in ms: ids older than
  ``dedup_window_seconds`` are dropped, and at most the ``dedup_cap`` newest are
  kept; the key expires a window after the user's last event id.
* ``p:{b<b>}:events`` – the bucket's STREAM of every accepted event (fields
  ``user_id``, ``item_id``, ``timestamp``, ``event_id``), capped near
  ``stream_maxlen / stream_shards``; :mod:`mqsa.service.event_log` exports all the
  buckets' streams as the raw log that training reads. With ``stream_archive`` the
  service never trims them: the archiver (:mod:`mqsa.service.archive`) removes what it
  has stored durably, so no event is dropped before it is archived.

All three keys carry the bucket's hash tag ``{b<b>}``, so a user's keys and the
stream the script appends to live in one slot: the script runs on Redis
Cluster, and ``stream_shards`` buckets spread users over that many slots (one
bucket = one slot; the service's default is 16). The per-user keys share the
TTL: every append refreshes it.

De-duplication is bounded by time and count, so a user's memory is too: an
event id resent after ``dedup_window_seconds`` (default a day), or after more than
``dedup_cap`` (default 128) newer ids of the same user, is accepted again. The set
never holds more than the cap, so with the default (Redis's
``zset-max-listpack-entries`` is 128) it stays in Redis's compact encoding.

Design: :meth:`HistoryStore.append` groups a request's events by user and sends
one Lua script call (EVALSHA) per user, all in one non-transactional pipeline:
one round trip per request. The script is atomic per user: it skips events
whose id the user has already sent, pushes the others to the history, records
their ids and XADDs them to the stream, then trims and refreshes the TTLs. A
duplicate thus never reaches the history or the stream, and concurrent appends
for one user never interleave. A request spanning several users is atomic per
user only: if Redis fails half-way, some users' events may be stored and others
not, and the request fails; resending it with the same event ids is safe.

Connections: a pooled connection idle for ``health_check_seconds`` is PINGed before
use, and a call that fails on a closed or refused connection is retried once on a
fresh one (after a Redis restart every pooled connection is dead). A retry can only
apply events twice if Redis applied them and died before answering; event ids make
even that exact. Timeouts are never retried: a hung Redis fails the request. When
the answer is sent, see ``service/durability.py``.

Needs Redis >= 7.0 (the script's shebang; ``XRANGE`` with exclusive ranges, in the exporter). Redis
errors are translated into :class:`~mqsa.errors.StoreUnavailable` in one
place, :func:`redis_errors`. Never imports torch, ``models`` or ``training``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as redis_exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from mqsa.errors import ConfigError, StoreUnavailable
from mqsa.service.durability import AckPlan, AckPolicy, plan, version_of

log = logging.getLogger("mqsa.service")

# KEYS: items list, event-id zset, stream, served lists.
# ARGV: user_id, history_cap, ttl_seconds, stream_maxlen (0: never trim), dedup_cap, now_ms, window_ms,
#       attribution_ms, conversion type, then (item_id, timestamp, event_id, dedup_key, event_type,
#       recommendation_id, to_history) per event: event_id, dedup_key and recommendation_id '' when
#       absent, to_history '1' or '0'.
# Returns per event {0} (a duplicate) or {1, kind, model_version, mode, ...}: the lists it is
# attributed to, kind 'h' (the list's first hit) or 'c' (a conversion).
#
# The shebang (Redis >= 7) makes it a declared write script: on an out-of-memory server it is
# refused before it runs, never half-way (without it, Redis checks memory at the first write
# command that may grow it, and a ZREMRANGEBYSCORE first would let every later write through).
APPEND_SCRIPT = """#!lua
local items, seen, stream, served = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local user_id = ARGV[1]
local cap = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local maxlen = ARGV[4]
local dedup_cap = tonumber(ARGV[5])
local now = tonumber(ARGV[6])
local window = tonumber(ARGV[7])
local attribution = tonumber(ARGV[8])
local conversion = ARGV[9]
-- the lists served to the user within the attribution window, newest first, read once, and
-- for each item the lists holding it (built once: a call's cost is O(events + listed items))
local lists, holding = nil, nil
local function served_lists()
  if lists == nil then
    lists, holding = {}, {}
    for i, entry in ipairs(redis.call('LRANGE', served, 0, -1)) do
      local rec, model, mode, ms, flags, members =
        string.match(entry, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
      if rec and now - tonumber(ms) <= attribution then
        local l = {i - 1, rec, model, mode, ms, flags, members, false}
        lists[#lists + 1] = l
        for item in string.gmatch(members, '[^\\31]+') do
          local at = holding[item]
          if at then at[#at + 1] = l else holding[item] = {l} end
        end
      end
    end
  end
  return holding
end
-- a list's first hit marks it ('h' in its flags); a conversion goes to the newest list of each
-- shadow model holding the item, and to the newest served one unless the event names its list
local function attribute(item, kind, rec_id, out)
  local at = served_lists()[item]
  if not at then return end
  local converted = {}
  if rec_id ~= '' then converted['served'] = true end
  for _, l in ipairs(at) do
    if not string.find(l[6], 'h', 1, true) then
      l[6] = l[6] .. 'h'
      l[8] = true
      out[#out + 1] = 'h'; out[#out + 1] = l[3]; out[#out + 1] = l[4]
    end
    local slot = l[4] == 'served' and 'served' or l[3]
    if kind == conversion and not converted[slot] then
      converted[slot] = true
      out[#out + 1] = 'c'; out[#out + 1] = l[3]; out[#out + 1] = l[4]
    end
  end
end
-- scores are integers, ms * 1000 + the event's place in this call: ordered, and compact
redis.call('ZREMRANGEBYSCORE', seen, '-inf', '(' .. ((now - window) * 1000))
local size = redis.call('ZCARD', seen)
local flags = {}
local n = 0
for i = 10, #ARGV, 7 do
  local item, ts, eid, key = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local kind, rec_id, to_history = ARGV[i + 4], ARGV[i + 5], ARGV[i + 6]
  local fresh = 1
  if key ~= '' then
    if redis.call('ZSCORE', seen, key) then
      fresh = 0
    else
      if size >= dedup_cap then  -- make room first: the set never grows past the cap
        redis.call('ZREMRANGEBYRANK', seen, 0, size - dedup_cap)
        size = dedup_cap - 1
      end
      n = n + 1
      redis.call('ZADD', seen, now * 1000 + n, key)
      size = size + 1
    end
  end
  local out = {fresh}
  if fresh == 1 then
    if to_history == '1' then redis.call('RPUSH', items, item) end
    local fields = {'user_id', user_id, 'item_id', item, 'timestamp', ts, 'event_id', eid,
      'event_type', kind, 'recommendation_id', rec_id}
    if maxlen == '0' then  -- archived streams: only the archiver trims, what it has stored
      redis.call('XADD', stream, '*', unpack(fields))
    else
      redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', unpack(fields))
    end
    attribute(item, kind, rec_id, out)
  end
  flags[#flags + 1] = out
end
if lists then  -- write back the lists that got their first hit
  for _, l in ipairs(lists) do
    if l[8] then
      redis.call('LSET', served, l[1], table.concat({l[2], l[3], l[4], l[5], l[6], l[7]}, '|'))
    end
  end
end
redis.call('LTRIM', items, -cap, -1)
redis.call('EXPIRE', items, ttl)
if size > 0 then redis.call('PEXPIRE', seen, window) end
return flags
"""

# KEYS: served lists, stream. ARGV: user_id, recommendation_id, model_version, mode, route, items (a
# JSON list of strings), then "now_ms timestamp stream_maxlen attribution_ms served_cap remember" in one
# argument (remember: 1 keeps the list for attribution; stream_maxlen 0: never trim). Few arguments:
# redis-py packs each in Python, and that was most of a logged list's cost.
IMPRESSION_SCRIPT = """#!lua
local served, stream = KEYS[1], KEYS[2]
local a = ARGV
local now_ms, ts, maxlen, attribution, cap, remember =
  string.match(a[7], '^(%S+) (%S+) (%S+) (%S+) (%S+) (%S+)$')
local fields = {'user_id', a[1], 'item_id', '', 'timestamp', ts, 'event_id', '', 'event_type', 'impression',
  'recommendation_id', a[2], 'items', a[6], 'model_version', a[3], 'route', a[5], 'mode', a[4]}
if maxlen == '0' then
  redis.call('XADD', stream, '*', unpack(fields))
else
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', unpack(fields))
end
if remember == '1' then  -- the items between unit separators (31), a control character never in an id
  local members = '\\31' .. table.concat(cjson.decode(a[6]), '\\31') .. '\\31'
  redis.call('LPUSH', served, a[2] .. '|' .. a[3] .. '|' .. a[4] .. '|' .. now_ms .. '||' .. members)
  redis.call('LTRIM', served, 0, tonumber(cap) - 1)
  redis.call('PEXPIRE', served, attribution)
end
return 1
"""
SERVED_CAP = 50  # lists kept per user for attribution (more within the window: the oldest go)


def dedup_key(event_id: str) -> str:
    """The member a user's de-duplication set keeps for an event id: 64 bits of its BLAKE2b.

    16 hex characters whatever the id's length (a UUID is 36): the set's memory is bounded
    by its count, not by what clients send. Two ids of one user collide with probability
    about n^2 / 2^65 (5e-16 for 128 ids).
    """
    return hashlib.blake2b(event_id.encode(), digest_size=8).hexdigest()


@dataclass
class Event:
    """One interaction: a user saw/bought/clicked an item.

    Attributes:
        user_id: the external user id, non-empty.
        item_id: the external item id, non-empty.
        timestamp: seconds since the epoch; the server's clock when None.
        event_id: the client's id for this event, for de-duplication of resends;
            None (or empty) when the event is never resent.
        event_type: what happened (``view``, ``click``, ...; the service's settings say
            which types there are).
        recommendation_id: the answer the item was taken from, if any.
    """

    user_id: str
    item_id: str
    timestamp: float | None = None
    event_id: str | None = None
    event_type: str = "view"
    recommendation_id: str | None = None


@dataclass
class Impression:
    """One list served (or scored in shadow), as logged and counted.

    Attributes:
        user_id: the user it was made for ("" for a similar-items list without a user).
        recommendation_id: its id (``recommendation_id`` of the answer).
        model_version: the model that made it.
        mode: "served" or "shadow".
        route: "recommend" or "similar".
        items: the listed item ids, in order.
        latency_seconds: the time to make it.
        fallback: why the model did not make it (None: it did).
    """

    user_id: str
    recommendation_id: str
    model_version: str
    mode: str
    route: str
    items: list[str]
    latency_seconds: float
    fallback: str | None = None

    @cached_property
    def items_json(self) -> str:
        """The items as the stream and the scripts take them: a JSON list (UTF-8, compact); made
        once, for the stream entry and for the counts."""
        return json.dumps(self.items, ensure_ascii=False, separators=(",", ":"))


ScriptCall = tuple[Any, list[str], list[Any]]  # a registered script, its keys (one slot), its args
Attribution = tuple[str, str, str]  # kind ("h": a list's first hit, "c": a conversion), model_version, mode


@dataclass
class AppendResult:
    """What one :meth:`HistoryStore.append` call did, summed over its events.

    Attributes:
        accepted: events added to the stream (and, of the history types, to histories).
        duplicates: events skipped because their user had already sent their event id.
        applied: per event, in request order, whether it was accepted.
        attributions: per event, in request order, the served lists it hit or converted.
    """

    accepted: int
    duplicates: int
    applied: list[bool] = field(default_factory=list, compare=False)
    attributions: list[list[Attribution]] = field(default_factory=list, compare=False)


# Failures of Redis as a service (down, hung, full, read-only, loading, failing over): a 503.
# Anything else redis-py raises (WRONGTYPE, a bad argument) is a bug and keeps its traceback.
UNAVAILABLE = (
    redis_exceptions.ConnectionError,  # includes BusyLoadingError, AuthenticationError
    redis_exceptions.TimeoutError,
    redis_exceptions.OutOfMemoryError,
    redis_exceptions.ReadOnlyError,
    redis_exceptions.MasterDownError,
    redis_exceptions.TryAgainError,
    redis_exceptions.ClusterDownError,
    redis_exceptions.MaxConnectionsError,
    OSError,
)


@contextmanager
def redis_errors() -> Iterator[None]:
    """Translate Redis being unavailable into :class:`StoreUnavailable`, in one place.

    Connection refused or lost, timeouts, a full pool, and the server refusing writes
    (out of memory under ``noeviction``, a read-only replica, loading, a cluster that is
    down) become the service's 503; other errors are not Redis's state but a bug, and
    propagate.

    Raises:
        StoreUnavailable: from the original exception.
    """
    try:
        yield
    except UNAVAILABLE as exc:
        raise _unavailable(exc) from exc


def _unavailable(exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"redis unavailable: {type(exc).__name__}: {exc}")


def _translated(exc: Exception) -> Exception:
    """``exc`` as :func:`redis_errors` would raise it (for errors handed on, not raised)."""
    if not isinstance(exc, UNAVAILABLE):
        return exc
    unavailable = _unavailable(exc)
    unavailable.__cause__ = exc
    return unavailable


def as_text(value: Any) -> str:
    """A Redis reply part as text, whether the client decodes replies or not."""
    return value.decode() if isinstance(value, bytes) else str(value)


def connect(
    url: str,
    timeout_seconds: float = 0.5,
    max_connections: int = 64,
    pool_timeout_seconds: float = 2.0,
    connect_timeout_seconds: float = 2.0,
    health_check_seconds: float = 5.0,
    cluster: bool = False,
) -> aioredis.Redis | aioredis.RedisCluster:
    """An asyncio Redis client for the store, with its own bounded connection pool.

    Every send and read times out after ``timeout_seconds``, opening a connection
    after ``connect_timeout_seconds`` (a burst opens many at once); waiting for a free
    connection when all ``max_connections`` are busy times out after
    ``pool_timeout_seconds`` (a burst of requests queues briefly instead of failing).
    A connection idle for ``health_check_seconds`` is PINGed before use (0: always).
    A call that fails on a closed or refused connection is retried once, at once, on
    a fresh one; a timeout is never retried (a hung Redis must fail a request, not
    stall it). Replies are decoded to ``str``. Close it with ``await client.aclose()``,
    which also closes the pool. No connection is opened until the first command.

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` or ``unix://``;
            with ``cluster``, any node of the cluster.
        timeout_seconds: the limit on each socket operation.
        max_connections: the most connections the pool opens (per node on a cluster).
        pool_timeout_seconds: the limit on waiting for a free connection.
        connect_timeout_seconds: the limit on opening a connection.
        health_check_seconds: idle time after which a connection is checked before use.
        cluster: talk to a Redis Cluster (every command routed to its slot's node).

    Returns:
        The client; it owns the pool.
    """
    retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    options = {
        "socket_timeout": timeout_seconds,
        "socket_connect_timeout": connect_timeout_seconds,
        "decode_responses": True,
        "retry": retry,
        "health_check_interval": health_check_seconds,
    }
    if cluster:
        return aioredis.RedisCluster.from_url(url, max_connections=max_connections, **options)
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=pool_timeout_seconds, **options
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
        redis: an asyncio client, best made by :func:`connect` (``decode_responses=True``).
        prefix: the first part of every key.
        history_cap: the most items kept per user (the newest).
        ttl_seconds: a user's history expires this long after their last append.
        stream_maxlen: the event stream is trimmed to about this many entries
            (``MAXLEN ~``: Redis trims whole nodes, so it may hold up to about a
            hundred more).
        dedup_window_seconds: an event id is remembered this long.
        dedup_cap: the most event ids remembered per user (the newest).
        stream_shards: how many buckets (hash-tag slots, one stream each) users are
            spread over; 1 keeps everything in one slot.
        ack: "memory" or "disk": when ``append`` returns (``service/durability.py``).
        ack_replicas: also wait for this many replicas.
        ack_timeout_ms: the longest wait for the disk or the replicas.
        stream_archive: never trim the streams (``mqsa events archive`` trims what it has
            archived); ``stream_maxlen`` is then unused.
        history_types: the event types that enter histories (None: every type).
        attribution_window_seconds: how long a served list can be hit (docs/feedback.md).
        conversion_event_type: the event type that converts a list.

    Raises:
        ValueError: for a cap, TTL, window, length or shard count below 1, or a prefix with braces.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str = "mqsa",
        history_cap: int = 200,
        ttl_seconds: int = 30 * 24 * 3600,
        stream_maxlen: int = 1_000_000,
        dedup_window_seconds: int = 24 * 3600,
        dedup_cap: int = 128,
        stream_shards: int = 1,
        ack: str = "memory",
        ack_replicas: int = 0,
        ack_timeout_ms: int = 200,
        stream_archive: bool = False,
        history_types: frozenset[str] | None = None,
        attribution_window_seconds: int = 1800,
        conversion_event_type: str = "purchase",
    ) -> None:
        limits = {"history_cap": history_cap, "ttl_seconds": ttl_seconds, "stream_maxlen": stream_maxlen}
        limits |= {"dedup_window_seconds": dedup_window_seconds, "dedup_cap": dedup_cap}
        for name, value in (*limits.items(), ("stream_shards", stream_shards)):
            if int(value) < 1:
                raise ValueError(f"{name} must be at least 1, got {value!r}")
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"the key prefix must not contain braces (hash tags), got {prefix!r}")
        self.redis = redis
        self.prefix = prefix
        self.history_cap = int(history_cap)
        self.ttl_seconds = int(ttl_seconds)
        self.stream_maxlen = int(stream_maxlen)
        self.stream_archive = bool(stream_archive)
        self._shard_maxlen = 0 if stream_archive else max(1, self.stream_maxlen // max(1, int(stream_shards)))
        self.dedup_window_ms = int(dedup_window_seconds) * 1000
        self.dedup_cap = int(dedup_cap)
        self.stream_shards = int(stream_shards)
        self.stream_keys = stream_keys(prefix, self.stream_shards)
        self.ack_policy = AckPolicy(ack, int(ack_replicas), int(ack_timeout_ms))  # type: ignore[arg-type]
        self._ack_plan: AckPlan | None = None  # chosen at the first write (or at start, if Redis answers)
        self._reads: list[tuple[str, int, asyncio.Future]] = []  # history reads waiting to go out together
        self._tasks: set[asyncio.Task] = set()  # the flushes under way (a task needs a reference)
        self.history_types = history_types
        self.attribution_ms = int(attribution_window_seconds) * 1000
        self.conversion_event_type = conversion_event_type
        self._script = redis.register_script(APPEND_SCRIPT)
        self._impression_script = redis.register_script(IMPRESSION_SCRIPT)

    def _tagged(self, user_id: str) -> str:
        return f"{self.prefix}:{{b{bucket_of(user_id, self.stream_shards)}}}"

    def items_key(self, user_id: str) -> str:
        """The user's history list: ``{prefix}:{b<bucket>}:u:<user_id>:items``."""
        return f"{self._tagged(user_id)}:u:{user_id}:items"

    def events_key(self, user_id: str) -> str:
        """The user's set of recent event-id digests: ``{prefix}:{b<bucket>}:u:<user_id>:events``."""
        return f"{self._tagged(user_id)}:u:{user_id}:events"

    def served_key(self, user_id: str) -> str:
        """Lists served to the user lately, for attribution: ``{prefix}:{b<bucket>}:u:<user_id>:served``."""
        return f"{self._tagged(user_id)}:u:{user_id}:served"

    def stream_key_for(self, user_id: str) -> str:
        """The stream of the user's bucket: ``{prefix}:{b<bucket>}:events``."""
        return f"{self._tagged(user_id)}:events"

    async def unarchived(self) -> int:
        """Events not yet archived, over every bucket's stream.

        With ``stream_archive`` a stream holds exactly what the archiver has not
        acknowledged yet (it trims what it has stored), so this is the sum of the
        streams' lengths, O(1) each.

        Raises:
            StoreUnavailable: when Redis fails.
        """
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in self.stream_keys:
                    pipe.xlen(key)
                lengths = await pipe.execute()
        return sum(int(n) for n in lengths)

    async def check_durability(self) -> AckPlan | None:
        """Choose how to keep the ack policy on this server; None if Redis does not answer now.

        Raises:
            ConfigError: the policy cannot be kept on this server (e.g. MQSA_ACK=disk on
                Redis 7.0 with appendfsync everysec).
        """
        if isinstance(self.redis, aioredis.RedisCluster):  # no wait is offered there: nothing to ask
            self._ack_plan = plan(self.ack_policy, (0,), None, cluster=True)
            return self._ack_plan
        try:
            with redis_errors():
                info = await self.redis.info("server")
                try:
                    config = await self.redis.config_get("appendonly", "appendfsync")
                except redis_exceptions.ResponseError:  # CONFIG renamed or refused (managed Redis)
                    config = None
        except StoreUnavailable:
            return None
        self._ack_plan = plan(self.ack_policy, version_of(info), config, cluster=False)
        log.info("events are acknowledged once %s", self._ack_plan.guarantee)
        return self._ack_plan

    async def append(self, events: list[Event]) -> AppendResult:
        """Add events to their users' histories and to the stream, skipping resent event ids.

        Events are grouped by user in order of arrival; each user's events are
        applied in one atomic script call, and all users' calls go in one
        pipeline round trip (with the durability wait, if any, at its end).
        Events without a timestamp get ``time.time()``.

        Args:
            events: the request's events, in arrival order; may mix users.

        Returns:
            How many events were accepted and how many were duplicates.

        Raises:
            ValueError: for an empty user or item id or a timestamp that is not finite.
            StoreUnavailable: when Redis fails or the wait falls short; some users' events
                may then have been stored.
        """
        if not events:
            return AppendResult(accepted=0, duplicates=0, applied=[])
        if self._ack_plan is None:
            try:
                if await self.check_durability() is None:
                    raise StoreUnavailable("redis unavailable: it did not answer the first call")
            except ConfigError as exc:  # Redis was down at start; now it answers, but cannot keep MQSA_ACK
                raise StoreUnavailable(str(exc)) from exc
        now = time.time()
        groups = self._script_args(events, now)
        head = (
            self.history_cap,
            self.ttl_seconds,
            self._shard_maxlen,
            self.dedup_cap,
            int(now * 1000),
            self.dedup_window_ms,
            self.attribution_ms,
            self.conversion_event_type,
        )
        keys = (self.items_key, self.events_key, self.stream_key_for, self.served_key)
        calls = [([key(user) for key in keys], [user, *head, *rest]) for user, rest in groups.items()]
        with redis_errors():
            results = await self._run_scripts([(self._script, keys, args) for keys, args in calls])
        replies = {user: iter(result) for user, result in zip(groups, results, strict=True)}
        outcomes = [next(replies[event.user_id]) for event in events]  # back in request order
        applied = [bool(int(out[0])) for out in outcomes]
        attributions = [
            [tuple(as_text(x) for x in out[i : i + 3]) for i in range(1, len(out), 3)] for out in outcomes
        ]
        accepted = sum(applied)
        return AppendResult(accepted, len(events) - accepted, applied, attributions)  # type: ignore[arg-type]

    def _script_args(self, events: list[Event], now: float) -> dict[str, list[str]]:
        """Each user's events as the append script's per-event arguments, in arrival order.

        Raises:
            ValueError: for an empty user or item id or a timestamp that is not finite.
        """
        groups: dict[str, list[str]] = {}
        for event in events:
            if not event.user_id or not event.item_id:
                raise ValueError(f"empty user or item id in {event!r}")
            stamp = now if event.timestamp is None else float(event.timestamp)
            if not math.isfinite(stamp):
                raise ValueError(f"timestamp is not finite in {event!r}")
            eid = event.event_id or ""
            to_history = self.history_types is None or event.event_type in self.history_types
            groups.setdefault(event.user_id, []).extend(
                (
                    event.item_id,
                    repr(stamp),
                    eid,
                    eid and dedup_key(eid),
                    event.event_type,
                    event.recommendation_id or "",
                    "1" if to_history else "0",
                )
            )
        return groups

    async def _run_scripts(self, calls: list[ScriptCall], wait: bool = True) -> list[Any]:
        """EVALSHA each (script, keys, args) in one pipeline (concurrently on a cluster), the ack
        wait last; load the scripts and rerun the calls that got NOSCRIPT.

        A NOSCRIPT reply means that call did nothing, so rerunning only those is safe.
        (redis-py's ``Script`` in a pipeline would send ``SCRIPT EXISTS`` first, every time.)

        Args:
            calls: (registered script, keys, args) per call; each call's keys in one slot.
            wait: wait for the ack policy (``MQSA_ACK``) after the calls.
        """
        results: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        for attempt in range(2):
            replies = await self._send(calls, pending, wait)
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
            for script in {id(calls[i][0]): calls[i][0] for i in missing}.values():
                script.sha = await self.redis.script_load(script.script)
            pending = missing
        return results

    async def _send(self, calls: list[ScriptCall], pending: list[int], wait: bool) -> list[Any]:
        """One round of script calls; the replies in ``pending``'s order (errors as values)."""
        if isinstance(self.redis, aioredis.RedisCluster):
            # Cluster pipelines refuse EVALSHA: send the calls concurrently, each to its slot's node
            # (after the slot map is loaded: concurrent first calls would race to load it).
            await self.redis.initialize()
            return await asyncio.gather(
                *(
                    self.redis.evalsha(calls[i][0].sha, len(calls[i][1]), *calls[i][1], *calls[i][2])
                    for i in pending
                ),
                return_exceptions=True,
            )
        command = self._ack_plan.command if self._ack_plan and wait else None
        async with self.redis.pipeline(transaction=False) as pipe:
            for i in pending:
                script, keys, args = calls[i]
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            if command:  # on the same connection, after the writes: it waits for them
                pipe.execute_command(*command)
            replies = await pipe.execute(raise_on_error=False)
        if command:
            wait_reply = replies.pop()
            if isinstance(wait_reply, Exception):
                raise wait_reply
            self._ack_plan.check(wait_reply, self.ack_policy)
        return replies

    async def log_impressions(
        self, impressions: list[Impression], now: float, also: Sequence[ScriptCall] = ()
    ) -> None:
        """Append each list to its user's stream bucket as an ``impression`` entry and keep it for
        attribution (users only), with the ``also`` script calls (the online metrics' counts)
        in the same pipeline: one round trip.

        Raises:
            StoreUnavailable: when Redis fails (some lists may have been logged).
        """
        head = f"{int(now * 1000)} {now!r} {self._shard_maxlen} {self.attribution_ms} {SERVED_CAP}"
        calls: list[ScriptCall] = []
        for imp in impressions:
            remember = "1" if imp.user_id and imp.items else "0"
            args = [
                imp.user_id,
                imp.recommendation_id,
                imp.model_version,
                imp.mode,
                imp.route,
                imp.items_json,
                f"{head} {remember}",
            ]
            keys = [self.served_key(imp.user_id), self.stream_key_for(imp.user_id)]
            calls.append((self._impression_script, keys, args))
        with redis_errors():
            await self._run_scripts([*calls, *also], wait=False)

    async def history(self, user_id: str, limit: int) -> list[str]:
        """The user's last ``limit`` item ids, oldest first; empty for an unknown user.

        Reads of concurrent requests go out together, in one pipeline (one round trip, one
        socket to wake up for), once every task that is ready now has asked; on a cluster
        each read goes alone.

        Raises:
            StoreUnavailable: when Redis fails.
        """
        if limit <= 0:
            return []
        if isinstance(self.redis, aioredis.RedisCluster):
            with redis_errors():
                return list(await self.redis.lrange(self.items_key(user_id), -limit, -1))
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._reads.append((self.items_key(user_id), limit, future))
        if len(self._reads) == 1:
            loop.call_soon(self._flush_reads)
        return await future

    def _flush_reads(self) -> None:
        task = asyncio.ensure_future(self._read_together())
        self._tasks.add(task)  # the loop holds tasks weakly; this keeps the flush alive
        task.add_done_callback(self._tasks.discard)

    async def _read_together(self) -> None:
        reads, self._reads = self._reads, []
        try:
            with redis_errors():
                async with self.redis.pipeline(transaction=False) as pipe:
                    for key, limit, _ in reads:
                        pipe.lrange(key, -limit, -1)
                    replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # Redis is down (or a bug): every waiting request gets it
            replies = [exc] * len(reads)
        except asyncio.CancelledError:  # shutting down: the waiting requests are cancelled too
            for _, _, future in reads:
                future.cancel()
            raise
        for (_, _, future), reply in zip(reads, replies, strict=True):
            if future.done():  # its request was cancelled meanwhile
                continue
            if isinstance(reply, Exception):  # one key's error (WRONGTYPE) is that request's alone
                future.set_exception(_translated(reply))
            else:
                future.set_result(list(reply))

    async def close(self) -> None:
        """Cancel reads still in flight (at shutdown); their requests get the cancellation."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for _, _, future in self._reads:
            future.cancel()
        self._reads = []

    async def ping(self) -> bool:
        """Whether Redis answers; False (never an exception) when it does not."""
        try:
            with redis_errors():
                return bool(await self.redis.ping())
        except StoreUnavailable:
            return False

    async def memory(self) -> tuple[int, int] | None:
        """Redis's (used_memory, maxmemory) in bytes (maxmemory 0: no limit); None when unreadable."""
        try:
            with redis_errors():
                info = await self.redis.info("memory")
        except StoreUnavailable:
            return None
        if isinstance(self.redis, aioredis.RedisCluster):  # the fullest node decides
            nodes = [v for v in info.values() if isinstance(v, dict)] or [info]
            info = max(nodes, key=lambda n: int(n.get("used_memory", 0)) / max(1, int(n.get("maxmemory", 0))))
        return int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
