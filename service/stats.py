"""Online metrics per model version, kept in Redis so every replica counts into the same numbers.

What is counted (the definitions are in docs/feedback.md): per model version and mode
(``served`` or ``shadow``) the lists served (impressions), the clicks carrying a
recommendation id, the lists hit by a later event of their user within the attribution
window, the purchases attributed to a list (conversions), the requests' latency
(histogram buckets) and fallbacks; per event type the accepted events; and the
distinct items served (coverage, HyperLogLog).

Keys, for a prefix ``p`` (all in one hash slot, ``{stats}``, so a window is read in
one pipeline on a cluster too):

* ``p:{stats}:m:<minute>`` – a HASH per minute (epoch seconds // 60), kept
  :data:`KEEP_SECONDS`; fields ``<version>|<mode>|<counter>`` (counters
  ``impressions``, ``attributable`` (lists with a user, which events can hit), ``clicks``,
  ``hits``, ``conversions``, ``fallback:<reason>``,
  ``lat:<bucket>``) and ``events|<event_type>``.
* ``p:{stats}:total`` – the same fields (no latency) since the first count, for
  Prometheus counters.
* ``p:{stats}:cov:<version>:<mode>:<hour>`` – a HyperLogLog of the items served in an
  hour (epoch seconds // 3600), kept :data:`KEEP_SECONDS`.
* ``p:{stats}:versions`` – a HASH of the model versions that have served a list (the time
  of the first). The counts an event brings (clicks, conversions) go to the version its
  recommendation id names only when that version is here; else to the version
  ``unknown``: a client making up ids cannot add series without bound.

An impression's counts are one script call in the pipeline that logs it
(:meth:`OnlineStats.impressions_call`): one round trip, two commands for a list, one
more for every other list logged with it. An event request's counts are one
script call (:meth:`OnlineStats.record`).
Never imports torch, ``models`` or ``training``.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from mqsa.service.metrics import LATENCY_BUCKETS
from mqsa.service.store import Impression, ScriptCall, as_text, redis_errors

KEEP_SECONDS = 8 * 24 * 3600  # a week of minutes, and a day to spare
MAX_MINUTES = 24 * 60  # the longest window /stats reads
COUNTERS = ("impressions", "attributable", "clicks", "hits", "conversions")
UNKNOWN = "unknown"  # the version of counts whose recommendation id names no model that served

# KEYS: the minute's hash, the totals, the versions, then the coverage HyperLogLogs. ARGV: keep_seconds,
# now (seconds), then per list: its coverage key's place in KEYS, "version|mode|", its flags
# ("a": attributable, then the latency bucket, then ":" and the fallback, if any: "a7:no_usable_history"),
# its items (a JSON list).
IMPRESSIONS_SCRIPT = """#!lua
local minute, total, versions = KEYS[1], KEYS[2], KEYS[3]
local keep = ARGV[1]
for i = 3, #ARGV, 4 do
  local cov, head = KEYS[tonumber(ARGV[i])], ARGV[i + 1]
  local attributable, bucket, fallback = string.match(ARGV[i + 2], '^(a?)(%d+):?(.*)$')
  local fields = {'impressions'}
  if attributable == 'a' then fields[#fields + 1] = 'attributable' end
  if fallback ~= '' then fields[#fields + 1] = 'fallback:' .. fallback end
  for _, name in ipairs(fields) do
    redis.call('HINCRBY', minute, head .. name, 1)
    redis.call('HINCRBY', total, head .. name, 1)
  end
  redis.call('HINCRBY', minute, head .. 'lat:' .. bucket, 1)
  redis.call('HSETNX', versions, string.match(head, '^([^|]*)'), ARGV[2])
  local items = cjson.decode(ARGV[i + 3])
  if #items > 0 then
    redis.call('PFADD', cov, unpack(items))
    redis.call('EXPIRE', cov, keep)
  end
end
redis.call('EXPIRE', minute, keep)
"""

# KEYS: the minute's hash, the totals, the versions. ARGV: keep_seconds, then (version, mode, counter, n)
# per count; version "events" counts events per type (mode: the type). Returns nothing.
RECORD_SCRIPT = """#!lua
local minute, total, versions = KEYS[1], KEYS[2], KEYS[3]
for i = 2, #ARGV, 4 do
  local version, mode, counter, n = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local field
  if version == 'events' then
    field = 'events|' .. mode
  else
    if redis.call('HEXISTS', versions, version) == 0 then version = 'unknown' end
    field = version .. '|' .. mode .. '|' .. counter
  end
  redis.call('HINCRBY', minute, field, n)
  redis.call('HINCRBY', total, field, n)
end
redis.call('EXPIRE', minute, ARGV[1])
"""

CountKey = tuple[str, str, str]  # (model_version, mode, counter)


@dataclass
class ModelStats:
    """The counts of one (model version, mode) over a window, with a series per minute."""

    model_version: str
    mode: str
    counts: Counter[str] = field(default_factory=Counter)
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    fallbacks: Counter[str] = field(default_factory=Counter)
    series: dict[int, Counter[str]] = field(default_factory=dict)
    series_latency: dict[int, list[int]] = field(default_factory=dict)
    distinct_items: int = 0


def latency_bucket(seconds: float) -> int:
    """The index of the histogram bucket holding ``seconds`` (the last one is +Inf)."""
    return bisect.bisect_left(LATENCY_BUCKETS, seconds)


def quantile(counts: list[int], q: float) -> float | None:
    """The q-quantile (seconds) of a bucketed histogram, interpolated linearly inside its
    bucket as Prometheus's ``histogram_quantile`` does; None when empty. A quantile in
    the +Inf bucket is the last finite bound."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i == len(LATENCY_BUCKETS):
                return LATENCY_BUCKETS[-1]
            low = LATENCY_BUCKETS[i - 1] if i else 0.0
            return low + (LATENCY_BUCKETS[i] - low) * (rank - seen) / n
        seen += n
    return LATENCY_BUCKETS[-1]


def rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


class OnlineStats:
    """Reads and queues writes of the online metrics under ``prefix``.

    Args:
        redis: the service's asyncio client.
        prefix: the service's key prefix.
    """

    def __init__(self, redis: Any, prefix: str) -> None:
        self.redis = redis
        self.base = f"{prefix}:{{stats}}"
        self._record = redis.register_script(RECORD_SCRIPT)
        self._impressions = redis.register_script(IMPRESSIONS_SCRIPT)

    def minute_key(self, minute: int) -> str:
        return f"{self.base}:m:{minute}"

    @property
    def total_key(self) -> str:
        return f"{self.base}:total"

    @property
    def versions_key(self) -> str:
        return f"{self.base}:versions"

    def coverage_key(self, version: str, mode: str, hour: int | str) -> str:
        return f"{self.base}:cov:{version}:{mode}:{hour}"

    def impressions_call(self, impressions: list[Impression], now: float) -> ScriptCall:
        """The one script call that counts these lists (impressions, attributable, latency,
        fallbacks, the versions that served, the items for coverage), for the pipeline that
        logs them (``HistoryStore.log_impressions``)."""
        hour = int(now // 3600)
        keys = [self.minute_key(int(now // 60)), self.total_key, self.versions_key]
        places: dict[str, int] = {}
        args: list[Any] = [KEEP_SECONDS, int(now)]
        for imp in impressions:
            cov = self.coverage_key(imp.model_version, imp.mode, hour)
            if cov not in places:
                keys.append(cov)
                places[cov] = len(keys)  # Lua counts from 1
            flags = ("a" if imp.user_id and imp.items else "") + str(latency_bucket(imp.latency_seconds))
            if imp.fallback:
                flags += ":" + imp.fallback
            args += [places[cov], f"{imp.model_version}|{imp.mode}|", flags, imp.items_json]
        return self._impressions, keys, args

    async def record(self, counts: Counter[CountKey], events: Counter[str], now: float) -> None:
        """Add model counts (clicks, hits, conversions) and accepted events per type, in one call;
        a count for a version that never served goes to :data:`UNKNOWN`.

        Raises:
            StoreUnavailable: when Redis fails.
        """
        args: list[Any] = [KEEP_SECONDS]
        for (version, mode, name), n in counts.items():
            if n:
                args += [version, mode, name, n]
        for event_type, n in events.items():
            if n:
                args += ["events", event_type, "", n]
        if len(args) == 1:
            return
        keys = [self.minute_key(int(now // 60)), self.total_key, self.versions_key]
        with redis_errors():
            await self._record(keys=keys, args=args)

    async def totals(self) -> dict[str, int]:
        """Every field of the totals hash (for Prometheus).

        Raises:
            StoreUnavailable: when Redis fails.
        """
        with redis_errors():
            raw = await self.redis.hgetall(self.total_key)
        return {as_text(k): int(v) for k, v in raw.items()}

    async def window(self, minutes: int, now: float) -> tuple[list[ModelStats], Counter[str], list[int]]:
        """The counts of the ``minutes`` minutes up to ``now``: per (version, mode), events per type,
        and the minutes (epoch seconds, oldest first).

        Coverage counts the distinct items of the hours the window touches.

        Raises:
            ValueError: minutes out of 1..MAX_MINUTES.
            StoreUnavailable: when Redis fails.
        """
        if not 1 <= minutes <= MAX_MINUTES:
            raise ValueError(f"minutes must be in 1..{MAX_MINUTES}, got {minutes}")
        last = int(now // 60)
        span = list(range(last - minutes + 1, last + 1))
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for minute in span:
                    pipe.hgetall(self.minute_key(minute))
                hashes = await pipe.execute()
        models: dict[tuple[str, str], ModelStats] = {}
        events: Counter[str] = Counter()
        for minute, raw in zip(span, hashes, strict=True):
            for key, value in raw.items():
                _count(models, events, minute * 60, as_text(key), int(value))
        hours = range(span[0] * 60 // 3600, last * 60 // 3600 + 1)
        found = sorted(models.values(), key=lambda m: (m.mode, -m.counts["impressions"], m.model_version))
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for m in found:
                    pipe.pfcount(*(self.coverage_key(m.model_version, m.mode, h) for h in hours))
                distinct = await pipe.execute()
        for m, n in zip(found, distinct, strict=True):
            m.distinct_items = int(n)
        return found, events, [m * 60 for m in span]


def _count(
    models: dict[tuple[str, str], ModelStats], events: Counter[str], minute: int, key: str, value: int
) -> None:
    """Add one hash field of one minute into the window's tallies."""
    parts = key.split("|")
    if len(parts) == 2 and parts[0] == "events":
        events[parts[1]] += value
        return
    if len(parts) != 3:
        return  # not ours
    version, mode, name = parts
    m = models.get((version, mode))
    if m is None:
        m = models[(version, mode)] = ModelStats(version, mode)
    if name.startswith("lat:"):
        i = int(name[4:])
        if 0 <= i <= len(LATENCY_BUCKETS):
            m.latency[i] += value
            m.series_latency.setdefault(minute, [0] * (len(LATENCY_BUCKETS) + 1))[i] += value
    elif name.startswith("fallback:"):
        m.fallbacks[name[9:]] += value
    else:
        m.counts[name] += value
        m.series.setdefault(minute, Counter())[name] += value


def to_ms(seconds: float | None) -> float | None:
    """Seconds as milliseconds rounded to 0.001 ms (None stays None)."""
    return None if seconds is None or math.isnan(seconds) else round(seconds * 1000, 3)
