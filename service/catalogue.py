"""The catalogue: what the service knows about items beyond the model, shared by every replica.

An item's record holds its categories, its labels (``{"brand": "acme"}``), whether it
is available and when it expires. It lives in Redis, under one hash tag (one slot,
so the scripts run on Redis Cluster too):

* ``{prefix}:{cat}:items`` – a HASH item_id -> the record as JSON;
* ``{prefix}:{cat}:changes`` – a STREAM of changed item ids (trimmed near 100,000);
* ``{prefix}:{cat}:version`` – a counter, one more after every write;
* ``{prefix}:{cat}:epoch`` – a random token set by the first write: a Redis that lost
  its data (restarted empty, failed over) gets a new one, and workers reload.

Writes (:meth:`CatalogueStore.upsert`, :meth:`CatalogueStore.delete`) are one Lua
call each: merge the patch into the stored record (a field left out keeps its
value), record the change, bump the version. Every worker follows the version
(:class:`CatalogueFollower`, a few times a second) and applies only the changed
items to its in-memory rules (``service/rules.py``), so a change is seen everywhere
within about a second, and a worker that fell too far behind (the change stream was
trimmed past it), or that finds another epoch or a smaller version, reloads the whole
catalogue. An item with no record is available
and in no category.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as redis_exceptions

from mqsa.errors import StoreUnavailable
from mqsa.service.store import redis_errors

log = logging.getLogger("mqsa.service")

CHANGES_MAXLEN = 100_000
FIELDS = ("categories", "labels", "available", "expires_at")

# KEYS: items hash, changes stream, version counter, epoch.
# ARGV: now, changes maxlen, an epoch token (kept only if there is none), then (item_id,
# patch as JSON) pairs. Returns the new version.
UPSERT_SCRIPT = """#!lua
local items, changes, version = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[1])
redis.call('SET', KEYS[4], ARGV[3], 'NX')
for i = 4, #ARGV, 2 do
  local id, patch = ARGV[i], cjson.decode(ARGV[i + 1])
  local old = redis.call('HGET', items, id)
  local doc
  if old then
    doc = cjson.decode(old)
  else
    doc = {available = true, created_at = now}
  end
  for k, v in pairs(patch) do doc[k] = v end
  doc.updated_at = now
  redis.call('HSET', items, id, cjson.encode(doc))
  redis.call('XADD', changes, 'MAXLEN', '~', ARGV[2], '*', 'item_id', id)
end
return redis.call('INCR', version)
"""

# KEYS as above; ARGV: changes maxlen, item_id. Returns {version, 1 if it existed else 0}.
# (A record exists only after an upsert, which set the epoch.)
DELETE_SCRIPT = """#!lua
local existed = redis.call('HDEL', KEYS[1], ARGV[2])
if existed == 1 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'item_id', ARGV[2])
  return {redis.call('INCR', KEYS[3]), 1}
end
return {tonumber(redis.call('GET', KEYS[3]) or '0'), 0}
"""


@dataclass(frozen=True)
class ItemRecord:
    """One item's catalogue record.

    Attributes:
        categories: the item's categories.
        labels: label name -> value.
        available: False hides the item from every answer.
        expires_at: seconds since the epoch after which the item is hidden; None: never.
        created_at: when the record was first written (the newest items are explored first).
        updated_at: when it was last written.
    """

    categories: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    available: bool = True
    expires_at: float | None = None
    created_at: float = 0.0
    updated_at: float = 0.0

    def visible(self, now: float) -> bool:
        """Available and not expired at ``now``."""
        return self.available and (self.expires_at is None or self.expires_at > now)

    @classmethod
    def from_json(cls, text: str) -> ItemRecord:
        """A stored record. Lua's JSON writes an empty list as ``{}``: both mean none."""
        doc = json.loads(text)
        categories = doc.get("categories") or []
        labels = doc.get("labels") or {}
        return cls(
            categories=tuple(categories) if isinstance(categories, list) else (),
            labels=dict(labels) if isinstance(labels, dict) else {},
            available=bool(doc.get("available", True)),
            expires_at=doc.get("expires_at"),
            created_at=float(doc.get("created_at", 0.0)),
            updated_at=float(doc.get("updated_at", 0.0)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "categories": list(self.categories),
            "labels": dict(self.labels),
            "available": self.available,
            "expires_at": self.expires_at,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


class CatalogueStore:
    """The catalogue in Redis: read, write, follow.

    Args:
        redis: an asyncio client (``decode_responses=True``).
        prefix: the service's key prefix.
    """

    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self.redis = redis
        tag = f"{prefix}:{{cat}}"
        self.keys = [f"{tag}:items", f"{tag}:changes", f"{tag}:version", f"{tag}:epoch"]
        self._upsert = redis.register_script(UPSERT_SCRIPT)
        self._delete = redis.register_script(DELETE_SCRIPT)

    async def upsert(self, patches: Iterable[tuple[str, dict[str, Any]]]) -> int:
        """Merge each (item_id, fields) into the item's record; returns the new version.

        Raises:
            StoreUnavailable: when Redis fails (the write may then be partly applied).
        """
        args: list[Any] = [time.time(), CHANGES_MAXLEN, uuid.uuid4().hex]
        for item_id, patch in patches:
            args += [item_id, json.dumps({k: list(v) if k == "categories" else v for k, v in patch.items()})]
        with redis_errors():
            return int(await self._upsert(keys=self.keys, args=args))

    async def delete(self, item_id: str) -> bool:
        """Remove an item's record; whether there was one."""
        with redis_errors():
            _, existed = await self._delete(keys=self.keys, args=[CHANGES_MAXLEN, item_id])
        return bool(existed)

    async def get(self, item_id: str) -> ItemRecord | None:
        with redis_errors():
            text = await self.redis.hget(self.keys[0], item_id)
        return None if text is None else ItemRecord.from_json(text)

    async def get_many(self, item_ids: list[str]) -> dict[str, ItemRecord | None]:
        with redis_errors():
            texts = await self.redis.hmget(self.keys[0], item_ids) if item_ids else []
        return {
            i: None if t is None else ItemRecord.from_json(t) for i, t in zip(item_ids, texts, strict=True)
        }

    async def version(self) -> int:
        with redis_errors():
            return int(await self.redis.get(self.keys[2]) or 0)

    async def state(self) -> tuple[int, str | None]:
        """The version and the epoch (None before the first write), in one round trip."""
        with redis_errors():
            version, epoch = await self.redis.mget(self.keys[2], self.keys[3])
        return int(version or 0), epoch

    async def last_change(self) -> str:
        """The id of the newest change ("0-0" when there is none)."""
        with redis_errors():
            newest = await self.redis.xrevrange(self.keys[1], count=1)
        return newest[0][0] if newest else "0-0"

    async def changed_since(self, last: str, page: int = 10_000) -> tuple[set[str], str] | None:
        """The item ids changed after change ``last``, and the newest change id; None when the
        change stream was trimmed past ``last`` (the caller must reload everything)."""
        with redis_errors():
            try:
                info = await self.redis.xinfo_stream(self.keys[1])
            except redis_exceptions.ResponseError:  # no stream: it was deleted
                return None
        deleted = info.get("max-deleted-entry-id", "0-0")
        if _id_key(deleted) > _id_key(last):
            return None
        changed: set[str] = set()
        while True:
            with redis_errors():
                entries = await self.redis.xrange(self.keys[1], min=f"({last}", max="+", count=page)
            changed.update(fields["item_id"] for _, fields in entries)
            if entries:
                last = entries[-1][0]
            if len(entries) < page:
                return changed, last

    async def load_all(self, page: int = 10_000) -> dict[str, ItemRecord]:
        """Every record (HSCAN, ``page`` at a time)."""
        out: dict[str, ItemRecord] = {}
        cursor = 0
        while True:
            with redis_errors():
                cursor, chunk = await self.redis.hscan(self.keys[0], cursor, count=page)
            out.update((item_id, ItemRecord.from_json(text)) for item_id, text in chunk.items())
            if cursor == 0:
                return out


def _id_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms or 0), int(seq or 0)


class CatalogueFollower:
    """Keeps a worker's rules in step with the catalogue in Redis.

    Args:
        store: the catalogue in Redis.
        apply: awaited with {item_id: record or None (deleted)} for the changed items.
        replace: awaited with every record, at the start and after falling behind.
        interval_seconds: how often the version is polled.
    """

    def __init__(
        self,
        store: CatalogueStore,
        apply: Callable[[dict[str, ItemRecord | None]], Awaitable[None]],
        replace: Callable[[dict[str, ItemRecord]], Awaitable[None]],
        interval_seconds: float = 0.25,
    ) -> None:
        self.store, self.apply, self.replace = store, apply, replace
        self.interval_seconds = interval_seconds
        self.version = -1
        self.epoch: str | None = None
        self.last_change = "0-0"
        self.reload_next = False  # after an unexpected error

    async def load(self) -> None:
        """Everything, from scratch (the change id first, so no change is missed)."""
        (version, epoch), last = await self.store.state(), await self.store.last_change()
        await self.replace(await self.store.load_all())
        self.version, self.epoch, self.last_change = version, epoch, last

    @property
    def loaded(self) -> bool:
        """Whether the catalogue was read at least once (else nothing is hidden yet)."""
        return self.version >= 0

    async def catch_up(self) -> bool:
        """Apply what changed since the last look; whether anything did."""
        version, epoch = await self.store.state()
        if (version, epoch) == (self.version, self.epoch):
            return False
        if epoch != self.epoch or version < self.version:
            log.warning("the catalogue in Redis was replaced (its data was lost?): reloading all of it")
            await self.load()
            return True
        changed = await self.store.changed_since(self.last_change)
        if changed is None:
            log.warning("the catalogue's change stream was trimmed past this worker: reloading all of it")
            await self.load()
            return True
        item_ids, last = changed
        await self.apply(await self.store.get_many(sorted(item_ids)))
        self.version, self.last_change = version, last
        return True

    async def follow(self) -> None:
        """Poll forever (a background task). A Redis outage is logged and waited out; any
        other error is logged with its traceback and the next poll reloads everything."""
        while True:
            await asyncio.sleep(self.interval_seconds)
            try:
                if self.version < 0 or self.reload_next:
                    await self.load()
                    self.reload_next = False
                else:
                    await self.catch_up()
            except StoreUnavailable as exc:
                log.warning("catalogue not refreshed: %s", exc)
            except Exception:  # the follower must outlive a bug or an odd reply
                log.exception("catalogue not refreshed; reloading it at the next poll")
                self.reload_next = True


SEED_FILE = "catalogue.jsonl"  # optional in a bundle: `mqsa export --catalogue FILE` writes it


async def seed_catalogue(store: CatalogueStore, bundle_dir: Path, batch: int = 1000) -> int:
    """Load the bundle's catalogue into Redis if Redis has none yet (only one worker does it).

    Returns:
        The records written (0 when there is no seed or the catalogue exists already).
    """
    path = bundle_dir / SEED_FILE
    if not path.is_file() or await store.version() > 0:
        return 0
    with redis_errors():
        if not await store.redis.set(store.keys[2].replace(":version", ":seeded"), "1", nx=True):
            return 0  # another worker is seeding
    written = 0
    patches: list[tuple[str, dict[str, Any]]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            doc = json.loads(line)
            patches.append((doc.pop("item_id"), {k: v for k, v in doc.items() if k in FIELDS}))
        if len(patches) == batch:
            written += len(patches)
            await store.upsert(patches)
            patches = []
    if patches:
        written += len(patches)
        await store.upsert(patches)
    log.info("seeded the catalogue with %d records from %s", written, path)
    return written
