"""The model currently served, swapped atomically on reload.

A request takes ``registry.bundle`` once and uses that object to the end, so
requests in flight finish on the model they started with while a reload
swaps in the next one. A bundle that fails verification is refused and the
current one keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from mqsa.errors import BundleError
from mqsa.service.bundle import Bundle, load_bundle

log = logging.getLogger("mqsa.service")


@dataclass
class ReloadResult:
    reloaded: bool
    model_version: str
    previous_version: str | None
    reason: str | None = None


class ModelRegistry:
    """Holds the served bundle; loads, reloads and optionally watches its directory."""

    def __init__(self, bundle_dir: Path, onnx_threads: int = 1, faiss_threads: int = 1) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.onnx_threads = onnx_threads
        self.faiss_threads = faiss_threads
        self._bundle: Bundle | None = None
        self._lock = asyncio.Lock()

    @property
    def bundle(self) -> Bundle:
        """The bundle serving now. Raises BundleError before the first load."""
        if self._bundle is None:
            raise BundleError("no model bundle is loaded")
        return self._bundle

    @property
    def loaded(self) -> bool:
        return self._bundle is not None

    def load(self) -> Bundle:
        """The first load, at start: a bad bundle stops the service from starting."""
        self._bundle = load_bundle(self.bundle_dir, self.onnx_threads, self.faiss_threads)
        log.info("serving model %s from %s", self._bundle.model_version, self.bundle_dir)
        return self._bundle

    async def reload(self, bundle_dir: Path | None = None) -> ReloadResult:
        """Load a bundle off the event loop, then swap it in; refuse it if it fails verification."""
        async with self._lock:
            previous = self._bundle.model_version if self._bundle else None
            path = Path(bundle_dir) if bundle_dir else self.bundle_dir
            try:
                fresh = await asyncio.to_thread(load_bundle, path, self.onnx_threads, self.faiss_threads)
            except BundleError as exc:
                log.error("reload refused, still serving %s: %s", previous, exc)
                return ReloadResult(False, previous or "", previous, reason=str(exc))
            self._bundle = fresh
            if bundle_dir:
                self.bundle_dir = path
            log.info("reloaded: serving model %s (was %s)", fresh.model_version, previous)
            return ReloadResult(True, fresh.model_version, previous)

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
            current = self._bundle.model_version if self._bundle else None
            if on_disk and on_disk != current and on_disk != refused:
                result = await self.reload()
                refused = None if result.reloaded else on_disk
