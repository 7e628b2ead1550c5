"""The model currently served, with the catalogue's rules over its items, swapped atomically.

A request takes ``registry.served`` once and uses that pair (the bundle and the
rules built for its items) to the end, so requests in flight finish on the model
they started with while a reload swaps in the next one. Reload loads only bundles
under the bundle root; a bundle that fails verification is refused
(``BundleRefused``, one message whatever the reason; the reason goes to the log) and
the current one keeps serving. Catalogue changes go to the current rules; a reload
and a change never interleave (one lock), so no change is lost in a swap.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from mqsa.errors import BundleError, BundleRefused
from mqsa.service.bundle import Bundle, bundle_under, load_bundle
from mqsa.service.catalogue import ItemRecord
from mqsa.service.rules import Rules

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


@dataclass
class ReloadResult:
    model_version: str
    previous_version: str | None


class ModelRegistry:
    """Holds the served bundle and rules; loads, reloads and optionally watches the bundle directory.

    Args:
        bundle_dir: the configured bundle.
        root: the directory reloads may load bundles from (default: ``bundle_dir``'s parent).
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
        self._lock = asyncio.Lock()

    @property
    def served(self) -> Served:
        """The bundle and rules serving now. Raises BundleError before the first load."""
        if self._served is None:
            raise BundleError("no model bundle is loaded")
        return self._served

    @property
    def bundle(self) -> Bundle:
        return self.served.bundle

    @property
    def loaded(self) -> bool:
        return self._served is not None

    def _load(self, path: Path, records: dict[str, ItemRecord]) -> Served:
        bundle = load_bundle(path, self.onnx_threads, self.faiss_threads, self.hmac_key)
        return Served(bundle, Rules(bundle.item_ids, records, bundle.item_index))

    def load(self) -> Bundle:
        """The first load, at start: a bad bundle stops the service from starting."""
        self._served = self._load(self.bundle_dir, {})
        freeze_heap()
        log.info("serving model %s from %s", self.bundle.model_version, self.bundle_dir)
        return self.bundle

    async def reload(self, bundle_dir: str | None = None) -> ReloadResult:
        """Load a bundle (and its rules) off the event loop, then swap it in.

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
            freeze_heap()
            log.info("reloaded: serving model %s (was %s)", fresh.bundle.model_version, previous)
            return ReloadResult(fresh.bundle.model_version, previous)

    async def replace_catalogue(self, records: dict[str, ItemRecord]) -> None:
        """Rebuild the rules from every record (at start, or after falling behind), off the loop."""
        async with self._lock:
            bundle = self.served.bundle
            rules = await asyncio.to_thread(Rules, bundle.item_ids, records, bundle.item_index)
            self._served = Served(bundle, rules)
            freeze_heap()

    async def apply_catalogue(self, changes: dict[str, ItemRecord | None]) -> None:
        """Apply changed records to the current rules."""
        async with self._lock:
            self.served.rules.apply(changes)
            if len(changes) >= FREEZE_AFTER:
                freeze_heap()

    def _version_on_disk(self) -> str | None:
        try:
            return json.loads((self.bundle_dir / "manifest.json").read_text()).get("model_version")
        except (OSError, ValueError):
            return None

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
