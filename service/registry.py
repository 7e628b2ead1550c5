"""The model currently served, swapped atomically on reload.

A request takes ``registry.bundle`` once and uses that object to the end, so
requests in flight finish on the model they started with while a reload
swaps in the next one. Reload loads only bundles under the bundle root; a bundle
that fails verification is refused (``BundleRefused``, one message whatever the
reason; the reason goes to the log) and the current one keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from mqsa.errors import BundleError, BundleRefused
from mqsa.service.bundle import Bundle, bundle_under, load_bundle

log = logging.getLogger("mqsa.service")


@dataclass
class ReloadResult:
    model_version: str
    previous_version: str | None


class ModelRegistry:
    """Holds the served bundle; loads, reloads and optionally watches its directory.

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

    def _load(self, path: Path) -> Bundle:
        return load_bundle(path, self.onnx_threads, self.faiss_threads, self.hmac_key)

    def load(self) -> Bundle:
        """The first load, at start: a bad bundle stops the service from starting."""
        self._bundle = self._load(self.bundle_dir)
        log.info("serving model %s from %s", self._bundle.model_version, self.bundle_dir)
        return self._bundle

    async def reload(self, bundle_dir: str | None = None) -> ReloadResult:
        """Load a bundle off the event loop, then swap it in.

        Args:
            bundle_dir: a bundle under the root (relative to it, or absolute); the
                configured one when None.

        Raises:
            BundleRefused: the bundle is outside the root, missing or fails verification.
        """
        async with self._lock:
            previous = self._bundle.model_version if self._bundle else None
            try:
                path = bundle_under(self.root, bundle_dir) if bundle_dir else self.bundle_dir
                fresh = await asyncio.to_thread(self._load, path)
            except BundleError as exc:
                log.error("reload refused, still serving %s: %s", previous, exc)
                raise BundleRefused("not a usable bundle") from exc
            self._bundle = fresh
            self.bundle_dir = path
            log.info("reloaded: serving model %s (was %s)", fresh.model_version, previous)
            return ReloadResult(fresh.model_version, previous)

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
                try:
                    await self.reload()
                    refused = None
                except BundleRefused:
                    refused = on_disk
