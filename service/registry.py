"""The models served (the champion and its challengers), each with the catalogue's rules over
its items, and the split between them, swapped atomically.

A request takes ``registry.pick(user_id)`` (or ``registry.served``, the champion) once
and uses what it got (a bundle and the rules built for its items) to the end, so
requests in flight finish on the model they started with while a reload swaps in the
next one. Reload loads only bundles under the bundle root; a bundle that fails
verification is refused (``BundleRefused``, one message whatever the reason; the reason
goes to the log) and the current one keeps serving.

Challengers come from the traffic plan (``service/traffic.py``): :meth:`ModelRegistry.follow_plan`
loads the plan's bundles off the event loop (from under the same root, verified the same
way), drops those it no longer names, and swaps in a new :class:`Routing`: the split,
precomputed, so that :meth:`ModelRegistry.pick` is a hash and a walk over the arms, with no
Redis call. A challenger that cannot be loaded is left out (logged): its share goes to
the champion, and serving goes on.

Catalogue changes go to the rules of every loaded model (champion, challengers, and
bundles staged for a plan about to be stored); loads and changes never interleave (one
lock), so no change is lost in a swap.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mqsa.errors import BundleError, BundleRefused
from mqsa.service.bundle import Bundle, bundle_under, load_bundle
from mqsa.service.catalogue import ItemRecord
from mqsa.service.rules import Rules
from mqsa.service.traffic import TrafficPlan, split_point

log = logging.getLogger("mqsa.service")


FREEZE_AFTER = 1000  # changed records in one go: worth a collection (cheap: the rest is frozen)


def freeze_heap() -> None:
    """Move what is loaded now (bundle, vocabulary, rules: millions of objects for a large
    catalogue) out of the garbage collector's sight.

    Without it, each full collection walks them all: 0.1-0.3 s pauses, every few seconds
    under load, with a million items. What is replaced later is freed by reference
    counting as usual; only cycles among frozen objects would stay (there are none here).
    """
    gc.collect()
    gc.freeze()


@dataclass(frozen=True)
class Served:
    """What answers a request: a bundle and the catalogue's rules over its items."""

    bundle: Bundle
    rules: Rules


@dataclass(frozen=True)
class Pick:
    """Which model answers one request, and which others score it in shadow.

    Attributes:
        served: the bundle and rules that answer.
        role: "champion" or "challenger".
        shadows: models that score the request too; their lists are logged, never served.
    """

    served: Served
    role: str
    shadows: tuple[Served, ...] = ()


@dataclass(frozen=True)
class Routing:
    """The split in force, precomputed; built again after every change and swapped in at once.

    Attributes:
        salt: the plan's salt (``traffic.split_point``).
        champion: the pick of every user outside the challengers' intervals.
        arms: (upper bound, pick) of each challenger serving a share, bounds increasing.
        models: every model in force with its role, the champion first.
        traffic: ``{"champion": version, "shares": {version: share}, "shadow": [versions]}``.
        in_force: bundle_dir -> model version of the plan's challengers in force here.
    """

    salt: str
    champion: Pick
    arms: tuple[tuple[float, Pick], ...]
    models: tuple[tuple[Served, str], ...]
    traffic: dict[str, Any]
    in_force: dict[str, str]


@dataclass
class ReloadResult:
    model_version: str
    previous_version: str | None


class ModelRegistry:
    """Holds the served bundles and rules; loads, reloads and optionally watches the bundle directory.

    Args:
        bundle_dir: the configured bundle.
        root: the directory reloads and challengers may load bundles from (default:
            ``bundle_dir``'s parent).
        onnx_threads: onnxruntime threads.
        faiss_threads: FAISS threads.
        hmac_key: when set, only bundles whose manifest is signed with it load.
    """

    def __init__(
        self,
        bundle_dir: Path,
        root: Path | None = None,
        onnx_threads: int = 1,
        faiss_threads: int = 1,
        hmac_key: str | None = None,
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.root = Path(root or self.bundle_dir.parent).resolve()
        self.onnx_threads = onnx_threads
        self.faiss_threads = faiss_threads
        self.hmac_key = hmac_key
        self._served: Served | None = None
        self._plan = TrafficPlan()
        self._challengers: dict[str, Served] = {}  # the plan's bundle_dir -> loaded model
        self._staged: dict[str, Served] = {}  # loaded for a plan not stored yet (PUT /admin/traffic)
        self._routing: Routing | None = None
        self._lock = asyncio.Lock()

    @property
    def served(self) -> Served:
        """The champion's bundle and rules. Raises BundleError before the first load."""
        if self._served is None:
            raise BundleError("no model bundle is loaded")
        return self._served

    def pick(self, user_id: str | None) -> Pick:
        """The model that answers ``user_id`` (a stable hash of it decides the A/B arm), and the
        shadow models. None (a request without a user) always gets the champion.

        Raises:
            BundleError: before the first load.
        """
        routing = self._routing
        if routing is None:
            raise BundleError("no model bundle is loaded")
        if user_id is None or not routing.arms:
            return routing.champion
        point = split_point(routing.salt, user_id)
        for bound, pick in routing.arms:
            if point < bound:
                return pick
        return routing.champion

    def models(self) -> list[tuple[Served, str]]:
        """Every loaded model with its role ("champion" first, then "challenger"s)."""
        return list(self._routing.models) if self._routing else []

    def traffic(self) -> dict:
        """The A/B plan in force: ``{"champion": v, "shares": {v: share}, "shadow": [versions]}``."""
        if self._routing is None:
            return {"champion": None, "shares": {}, "shadow": []}
        traffic = self._routing.traffic  # a copy: the caller may change it
        return {**traffic, "shares": dict(traffic["shares"]), "shadow": list(traffic["shadow"])}

    @property
    def plan(self) -> TrafficPlan:
        """The traffic plan this worker follows."""
        return self._plan

    def in_force(self) -> dict[str, str]:
        """bundle_dir -> model version of each challenger of the plan in force here (loaded, and
        not the champion's model or another challenger's)."""
        return dict(self._routing.in_force) if self._routing else {}

    @property
    def bundle(self) -> Bundle:
        return self.served.bundle

    @property
    def loaded(self) -> bool:
        return self._served is not None

    def _load(self, path: Path, records: dict[str, ItemRecord]) -> Served:
        bundle = load_bundle(path, self.onnx_threads, self.faiss_threads, self.hmac_key)
        return Served(bundle, Rules(bundle.item_ids, records, bundle.item_index))

    def _everything(self) -> list[Served]:
        """Every loaded model, whose rules follow the catalogue."""
        return [self.served, *self._challengers.values(), *self._staged.values()]

    def load(self) -> Bundle:
        """The first load, at start: a bad bundle stops the service from starting."""
        self._served = self._load(self.bundle_dir, {})
        self._route()
        freeze_heap()
        log.info("serving model %s from %s", self.bundle.model_version, self.bundle_dir)
        return self.bundle

    async def reload(self, bundle_dir: str | None = None) -> ReloadResult:
        """Load a bundle (and its rules) off the event loop, then swap it in as the champion.

        Args:
            bundle_dir: a bundle under the root (relative to it, or absolute); the
                configured one when None.

        Raises:
            BundleRefused: the bundle is outside the root, missing or fails verification.
        """
        async with self._lock:
            previous = self._served.bundle.model_version if self._served else None
            records = self._served.rules.all_records() if self._served else {}
            try:
                path = bundle_under(self.root, bundle_dir) if bundle_dir else self.bundle_dir
                fresh = await asyncio.to_thread(self._load, path, records)
            except BundleError as exc:
                log.error("reload refused, still serving %s: %s", previous, exc)
                raise BundleRefused("not a usable bundle") from exc
            self._served = fresh
            self.bundle_dir = path
            self._route()
            freeze_heap()
            log.info("reloaded: serving model %s (was %s)", fresh.bundle.model_version, previous)
            return ReloadResult(fresh.bundle.model_version, previous)

    def _loaded_from(self, bundle_dir: str) -> Served | None:
        """The model already loaded from ``bundle_dir``, unless the directory now holds another."""
        served = self._challengers.get(bundle_dir) or self._staged.get(bundle_dir)
        if served is None:
            return None
        try:
            on_disk = _version_in(bundle_under(self.root, bundle_dir))
        except BundleError:
            return None
        return served if on_disk == served.bundle.model_version else None

    async def _load_challenger(self, bundle_dir: str, records: dict[str, ItemRecord]) -> Served:
        """Raises BundleError (logged by the caller) when the bundle is outside the root or unusable."""
        path = bundle_under(self.root, bundle_dir)
        return await asyncio.to_thread(self._load, path, records)

    async def stage(self, bundle_dir: str) -> str:
        """Load (or find loaded) a challenger for a plan about to be stored; its model version.

        It stays loaded (following the catalogue) until the next :meth:`follow_plan`.

        Raises:
            BundleRefused: outside the root, missing or failing verification (the reason is logged).
        """
        async with self._lock:
            served = self._loaded_from(bundle_dir)
            if served is None:
                try:
                    served = await self._load_challenger(bundle_dir, self.served.rules.all_records())
                except BundleError as exc:
                    log.error("challenger refused: %s", exc)
                    raise BundleRefused("not a usable bundle") from exc
                self._staged[bundle_dir] = served
                freeze_heap()
            return served.bundle.model_version

    def unstage(self) -> None:
        """Drop the challengers staged for a plan that was not stored after all."""
        self._staged = {}

    async def follow_plan(self, plan: TrafficPlan) -> bool:
        """Load the plan's challengers (those not loaded yet), drop the others, swap the split in.

        A challenger that cannot be loaded is left out (logged): its share goes to the champion.

        Returns:
            Whether every challenger of the plan is loaded.
        """
        async with self._lock:
            records: dict[str, ItemRecord] | None = None
            loaded: dict[str, Served] = {}
            fresh = False
            for challenger in plan.challengers:
                served = self._loaded_from(challenger.bundle_dir)
                if served is None:
                    if records is None:
                        records = self.served.rules.all_records()
                    try:
                        served = await self._load_challenger(challenger.bundle_dir, records)
                    except BundleError as exc:
                        log.error("challenger refused (its share goes to the champion): %s", exc)
                        continue
                    fresh = True
                loaded[challenger.bundle_dir] = served
            self._challengers, self._staged, self._plan = loaded, {}, plan
            self._route()
            if fresh:
                freeze_heap()
            return len(loaded) == len(plan.challengers)

    def _route(self) -> None:
        """Build the split of the plan over the models loaded now, and swap it in."""
        champion = self.served
        version = champion.bundle.model_version
        models: list[tuple[Served, str]] = [(champion, "champion")]
        in_force: dict[str, str] = {}
        arms: list[tuple[float, Served]] = []
        shadows: list[Served] = []
        shares: dict[str, float] = {}
        bound = 0.0
        for challenger in self._plan.challengers:
            served = self._challengers.get(challenger.bundle_dir)
            if served is None:
                continue  # not loaded here: its share stays with the champion
            if served.bundle.model_version in {version, *in_force.values()}:
                log.warning("challenger %s is a model served already: left out", challenger.bundle_dir)
                continue
            in_force[challenger.bundle_dir] = served.bundle.model_version
            models.append((served, "challenger"))
            if challenger.shadow:
                shadows.append(served)
            else:
                bound += challenger.share
                arms.append((bound, served))
                shares[served.bundle.model_version] = challenger.share
        shadowing = tuple(shadows)
        self._routing = Routing(
            salt=self._plan.salt,
            champion=Pick(champion, "champion", shadowing),
            arms=tuple((b, Pick(s, "challenger", shadowing)) for b, s in arms),
            models=tuple(models),
            traffic={
                "champion": version,
                "shares": {version: round(max(0.0, 1.0 - bound), 12), **shares},
                "shadow": [s.bundle.model_version for s in shadows],
            },
            in_force=in_force,
        )

    async def replace_catalogue(self, records: dict[str, ItemRecord]) -> None:
        """Rebuild every loaded model's rules from every record (at start, or after falling
        behind), off the loop."""
        async with self._lock:
            self._served = await asyncio.to_thread(_with_rules, self.served, records)
            for loaded in (self._challengers, self._staged):
                for bundle_dir, served in loaded.items():
                    loaded[bundle_dir] = await asyncio.to_thread(_with_rules, served, records)
            self._route()
            freeze_heap()

    async def apply_catalogue(self, changes: dict[str, ItemRecord | None]) -> None:
        """Apply changed records to every loaded model's rules."""
        async with self._lock:
            for served in self._everything():
                served.rules.apply(changes)
            if len(changes) >= FREEZE_AFTER:
                freeze_heap()

    def _version_on_disk(self) -> str | None:
        return _version_in(self.bundle_dir)

    async def watch(self, interval_seconds: float) -> None:
        """Poll the bundle directory; reload when its manifest names another model version."""
        refused: str | None = None
        while True:
            await asyncio.sleep(interval_seconds)
            on_disk = self._version_on_disk()
            current = self._served.bundle.model_version if self._served else None
            if on_disk and on_disk != current and on_disk != refused:
                try:
                    await self.reload()
                    refused = None
                except BundleRefused:
                    refused = on_disk


def _with_rules(served: Served, records: dict[str, ItemRecord]) -> Served:
    """The same bundle with rules built from ``records``."""
    bundle = served.bundle
    return Served(bundle, Rules(bundle.item_ids, records, bundle.item_index))


def _version_in(bundle_dir: Path) -> str | None:
    """The model version a bundle directory's manifest names (None when it cannot be read)."""
    try:
        return json.loads((bundle_dir / "manifest.json").read_text()).get("model_version")
    except (OSError, ValueError, AttributeError):
        return None
