"""What happened to what was served: recommendation ids, impressions and the events' attribution.

A list served by ``/recommend`` or ``/items/{item_id}/similar`` gets a recommendation id
that names its model (:func:`new_recommendation_id`) and is logged as an impression
(:meth:`Feedback.served`): on the user's stream bucket (so the archive keeps it), in the
user's recent lists (so later events can hit it) and in the online metrics
(``service/stats.py``), in one round trip. The events of ``/events`` come back with the
lists they hit or converted (the store's script finds them); :meth:`Feedback.events`
counts those, the clicks and purchases carrying a recommendation id, and the events per
type. docs/feedback.md defines every number.

The lists of the requests that are ready at the same time are logged together, in one
pipeline (one round trip for a burst), as the history reads are (``service/store.py``).

Logging never fails a request: whatever Redis answers (down, full, a refused command),
the answer is still sent, or the events' 200, and ``mqsa_feedback_dropped_total``
counts what was not recorded (the log says why).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter
from collections.abc import Sequence

from mqsa.service.metrics import Metrics
from mqsa.service.settings import Settings
from mqsa.service.stats import CountKey, OnlineStats
from mqsa.service.store import AppendResult, Event, HistoryStore, Impression

log = logging.getLogger("mqsa.service")


def new_recommendation_id(model_version: str, now: float | None = None) -> str:
    """``<model_version>-<ms, 12 hex>-<8 random hex>``: unique, ordered in time, naming its model."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{model_version}-{ms:012x}-{secrets.token_hex(4)}"


def model_of(recommendation_id: str) -> str:
    """The model version a recommendation id names (its first part)."""
    return recommendation_id.partition("-")[0]


class Feedback:
    """Logs impressions and counts the events' outcomes, per model version.

    Args:
        store: the history store (its streams and scripts).
        stats: the online metrics.
        settings: which event types click and convert.
        metrics: the process's Prometheus metrics (what could not be recorded).
    """

    def __init__(self, store: HistoryStore, stats: OnlineStats, settings: Settings, metrics: Metrics) -> None:
        self.store = store
        self.stats = stats
        self.click_type = settings.click_event_type
        self.conversion_type = settings.conversion_event_type
        self.metrics = metrics
        self._pending: list[tuple[list[Impression], asyncio.Future]] = []
        self._tasks: set[asyncio.Task] = set()

    async def served(self, impressions: list[Impression]) -> None:
        """Log the lists and count them, with those of the other requests ready now; never raises
        (a failure counts them as dropped)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((impressions, future))
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        await future

    def _flush(self) -> None:
        task = asyncio.ensure_future(self._log_together())
        self._tasks.add(task)  # the loop holds tasks weakly
        task.add_done_callback(self._tasks.discard)

    async def _log_together(self) -> None:
        pending, self._pending = self._pending, []
        impressions = [imp for batch, _ in pending for imp in batch]
        now = time.time()
        try:
            await self.store.log_impressions(
                impressions, now, [self.stats.impressions_call(impressions, now)]
            )
        except Exception as exc:  # never fail an answer over its log (counted, logged)
            self.dropped("impressions", len(impressions), exc)
        finally:
            for _, future in pending:
                if not future.done():
                    future.set_result(None)

    def dropped(self, what: str, n: int, exc: Exception | None = None) -> None:
        self.metrics.feedback_dropped.labels(what=what).inc(n)
        if exc is not None:
            log.warning("%d %s not recorded: %s", n, what, exc)

    async def events(self, events: Sequence[Event], result: AppendResult) -> None:
        """Count the accepted events: per type, clicks and purchases carrying a recommendation id
        (for the id's model), and the lists they hit or converted."""
        counts: Counter[CountKey] = Counter()
        types: Counter[str] = Counter()
        for event, applied, attributed in zip(events, result.applied, result.attributions, strict=True):
            if not applied:
                continue
            types[event.event_type] += 1
            if event.recommendation_id:
                version = model_of(event.recommendation_id)
                if event.event_type == self.click_type:
                    counts[(version, "served", "clicks")] += 1
                if event.event_type == self.conversion_type:
                    counts[(version, "served", "conversions")] += 1
            for kind, version, mode in attributed:
                counts[(version, mode, "hits" if kind == "h" else "conversions")] += 1
        try:
            await self.stats.record(counts, types, time.time())
        except Exception as exc:  # the events are stored: their 200 stands
            self.dropped("event_counts", sum(types.values()), exc)
