"""The traffic plan: which challengers run beside the champion, with what share, or in shadow.

A plan names challenger bundles (directories under the bundle root) and gives each a
share of the users, or puts it in shadow (it scores every request and its list is
logged, never served). The champion, the bundle ``/admin/reload`` serves, gets what is
left: ``1 - sum(shares)``. Every replica follows one plan, kept in Redis:

* ``{prefix}:traffic`` – a STRING, the plan as JSON: ``{"version", "salt", "updated_at",
  "challengers": [{"bundle_dir", "share", "shadow"}]}``; the version goes up by one at each
  write (one Lua call, :class:`TrafficStore`).

While Redis holds no plan (before the first ``PUT /admin/traffic``, or after Redis lost
its data) every worker follows the one in its settings (``MQSA_CHALLENGERS``,
version 0). :class:`TrafficFollower` polls the key (every ``MQSA_TRAFFIC_POLL_SECONDS``)
and hands a changed plan to the model registry, which loads the new challengers off the
event loop and swaps the split in at once (``service/registry.py``). A challenger that a
worker cannot load (refused, or not loaded yet) serves no one there: its share goes to
the champion, and the worker tries again every ``RETRY_SECONDS``.

The split: a user's point is ``blake2b("<salt>:<user_id>", 8 bytes)`` read as a big-endian
integer over 2**64, in [0, 1); the challengers hold consecutive intervals from 0, in the
plan's order, and the champion the rest. The same user gets the same arm on every
replica and every request; raising the first challenger's share keeps its users and
adds new ones; a new salt reshuffles everyone (a new experiment).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from mqsa.errors import StoreUnavailable
from mqsa.service.store import redis_errors

log = logging.getLogger("mqsa.service")

MAX_CHALLENGERS = 8  # each is a loaded bundle in every worker's memory
SHARE_SLACK = 1e-9  # 0.1 + 0.2 + 0.7 adds up to 1.0000000000000002: still 1
RETRY_SECONDS = 60.0  # a challenger a worker could not load is tried again this often
DEFAULT_SALT = "mqsa"
SALT_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"

# KEYS: the plan. ARGV: the plan as JSON without its version (an object, '{' first).
# Writes it with the stored version + 1 (a stored value that is not a plan counts as 0); returns it.
PUT_SCRIPT = """#!lua
local old = redis.call('GET', KEYS[1])
local version = 0
if old then
  local ok, doc = pcall(cjson.decode, old)
  if ok and type(doc) == 'table' and tonumber(doc.version) then version = tonumber(doc.version) end
end
version = version + 1
redis.call('SET', KEYS[1], '{"version": ' .. version .. ', ' .. string.sub(ARGV[1], 2))
return version
"""


@dataclass(frozen=True)
class Challenger:
    """One challenger of a plan.

    Attributes:
        bundle_dir: its bundle, under the bundle root (relative to it, or absolute).
        share: the share of users it serves, in [0, 1] (0 in shadow).
        shadow: it scores every request and its lists are logged, never served.
    """

    bundle_dir: str
    share: float = 0.0
    shadow: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"bundle_dir": self.bundle_dir, "share": self.share, "shadow": self.shadow}


@dataclass(frozen=True)
class TrafficPlan:
    """The challengers in force and the split's salt.

    Attributes:
        version: 0 for the settings' plan; the stored plan's version (1, 2, ...) otherwise.
        salt: what the users' points are hashed with; a new one reshuffles them.
        challengers: in the order their intervals take [0, 1).
        updated_at: when it was stored (seconds since the epoch); None for the settings' plan.
    """

    version: int = 0
    salt: str = DEFAULT_SALT
    challengers: tuple[Challenger, ...] = field(default_factory=tuple)
    updated_at: float | None = None

    def body(self) -> str:
        """The plan as stored, without its version (the store's script adds it)."""
        challengers = [c.to_dict() for c in self.challengers]
        return json.dumps({"salt": self.salt, "updated_at": self.updated_at, "challengers": challengers})

    @classmethod
    def from_json(cls, text: str) -> TrafficPlan:
        """A stored plan.

        Raises:
            ValueError: the text is not a plan (written by hand?).
        """
        try:
            doc = json.loads(text)
            challengers = tuple(
                Challenger(str(c["bundle_dir"]), float(c.get("share", 0.0)), bool(c.get("shadow", False)))
                for c in doc.get("challengers") or []
            )
            updated_at = doc.get("updated_at")
            plan = cls(
                int(doc["version"]),
                str(doc.get("salt") or DEFAULT_SALT),
                challengers,
                None if updated_at is None else float(updated_at),
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"the stored traffic plan is not one ({type(exc).__name__}: {exc})") from exc
        check_shares(plan.challengers)
        return plan


def check_shares(challengers: tuple[Challenger, ...] | list[Challenger]) -> None:
    """Refuse shares out of [0, 1], a share in shadow, more than 1 in all, or a bundle named twice.

    Raises:
        ValueError: naming what is wrong (never the bundle directory).
    """
    if len(challengers) > MAX_CHALLENGERS:
        raise ValueError(f"at most {MAX_CHALLENGERS} challengers")
    for n, c in enumerate(challengers, start=1):
        if not (math.isfinite(c.share) and 0.0 <= c.share <= 1.0):
            raise ValueError(f"challenger {n}: its share must be in [0, 1]")
        if c.shadow and c.share:
            raise ValueError(f"challenger {n}: a challenger in shadow serves no one (its share must be 0)")
    if sum(c.share for c in challengers) > 1.0 + SHARE_SLACK:
        raise ValueError("the challengers' shares add up to more than 1")
    if len({c.bundle_dir for c in challengers}) != len(challengers):
        raise ValueError("a bundle directory is named twice")


def parse_challengers(text: str) -> list[Challenger]:
    """``MQSA_CHALLENGERS``: comma-separated ``BUNDLE_DIR=SHARE`` or ``BUNDLE_DIR=shadow``
    entries, e.g. ``v2=0.1,v3=shadow``.

    Raises:
        ValueError: naming the entry's position and what is wrong.
    """
    out = []
    for n, raw in enumerate((e.strip() for e in text.split(",")), start=1):
        if not raw:
            continue
        bundle_dir, sep, value = (part.strip() for part in raw.rpartition("="))
        if not sep or not bundle_dir:
            raise ValueError(f"entry {n} is not BUNDLE_DIR=SHARE or BUNDLE_DIR=shadow")
        if value.lower() == "shadow":
            out.append(Challenger(bundle_dir, 0.0, True))
            continue
        try:
            share = float(value)
        except ValueError:
            raise ValueError(f"entry {n}: after '=' comes a share in [0, 1] or 'shadow'") from None
        out.append(Challenger(bundle_dir, share))
    check_shares(out)
    return out


def split_point(salt: str, user_id: str) -> float:
    """The user's point in [0, 1): ``blake2b("<salt>:<user_id>", 8 bytes)`` / 2**64."""
    digest = hashlib.blake2b(f"{salt}:{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


class TrafficStore:
    """The plan in Redis.

    Args:
        redis: an asyncio client (``decode_responses=True``).
        prefix: the service's key prefix.
    """

    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self.redis = redis
        self.key = f"{prefix}:traffic"
        self._put = redis.register_script(PUT_SCRIPT)

    async def get(self) -> TrafficPlan | None:
        """The stored plan; None when there is none.

        Raises:
            StoreUnavailable: Redis did not answer.
            ValueError: what is stored is not a plan.
        """
        with redis_errors():
            text = await self.redis.get(self.key)
        return None if text is None else TrafficPlan.from_json(text)

    async def put(self, salt: str, challengers: tuple[Challenger, ...]) -> TrafficPlan:
        """Store a plan in place of the one stored; returns it with its version.

        Raises:
            StoreUnavailable: Redis did not answer (the plan may or may not be stored).
        """
        plan = TrafficPlan(0, salt, challengers, time.time())
        with redis_errors():
            version = int(await self._put(keys=[self.key], args=[plan.body()]))
        return TrafficPlan(version, plan.salt, plan.challengers, plan.updated_at)


class TrafficFollower:
    """Keeps a worker on the plan in Redis (or the settings' plan while Redis has none).

    Args:
        store: the plan in Redis.
        apply: awaited with a plan to follow; returns whether every challenger is loaded.
        initial: the settings' plan.
        interval_seconds: how often the stored plan is read.
    """

    def __init__(
        self,
        store: TrafficStore,
        apply: Callable[[TrafficPlan], Awaitable[bool]],
        initial: TrafficPlan,
        interval_seconds: float = 1.0,
    ) -> None:
        self.store, self.apply, self.initial = store, apply, initial
        self.interval_seconds = interval_seconds
        self.plan: TrafficPlan | None = None  # the plan followed now
        self.complete = True
        self.retry_at = 0.0
        self._lock = asyncio.Lock()  # a read and its apply, or a PUT's apply: one at a time

    async def _adopt(self, plan: TrafficPlan) -> None:
        self.complete = await self.apply(plan)
        self.plan = plan
        if not self.complete:
            self.retry_at = time.monotonic() + RETRY_SECONDS

    async def adopt(self, plan: TrafficPlan) -> None:
        """Follow ``plan`` now: one this worker has just stored. (A poll that read the plan before
        it was stored finishes first, so it cannot bring the old plan back.)"""
        async with self._lock:
            await self._adopt(plan)

    async def load(self) -> None:
        """At start: the stored plan, or the settings' one while Redis has none or is down."""
        async with self._lock:
            try:
                plan = await self.store.get() or self.initial
            except (StoreUnavailable, ValueError) as exc:
                log.warning("the traffic plan is not read yet (following MQSA_CHALLENGERS): %s", exc)
                plan = self.initial
            await self._adopt(plan)

    async def catch_up(self) -> bool:
        """Follow the stored plan if it changed (or retry challengers not loaded); whether it did."""
        async with self._lock:
            plan = await self.store.get() or self.initial
            if plan == self.plan and (self.complete or time.monotonic() < self.retry_at):
                return False
            if plan != self.plan:
                log.info("following traffic plan %d (was %s)", plan.version, self.plan and self.plan.version)
            await self._adopt(plan)
            return True

    async def follow(self) -> None:
        """Poll forever (a background task). A Redis outage or a bad stored plan is logged and
        waited out (the plan in force stays); any other error is logged with its traceback."""
        while True:
            await asyncio.sleep(self.interval_seconds)
            try:
                await self.catch_up()
            except (StoreUnavailable, ValueError) as exc:
                log.warning("traffic plan not refreshed: %s", exc)
            except Exception:  # the follower must outlive a bug or an odd reply
                log.exception("traffic plan not refreshed")
