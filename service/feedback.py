"""What happened to what was served: recommendation ids, impressions and the events' attribution.

A list served by ``/recommend`` or ``/items/{item_id}/similar`` gets a recommendation id
that names its model (:func:`new_recommendation_id`) and is logged as an impression
(:meth:`Feedback.served`): on the user's stream bucket (so the archive keeps it), in the
user's recent lists (so later events can hit it) and in the online metrics
(``service/stats.py``), in one round trip. The events of ``/events`` come back with the
lists they hit or converted (the store's script finds them); :meth:`Feedback.events`
counts those, the clicks and purchases carrying a recommendation id, and the events per
type. docs/feedback.md defines every number.

Logging never fails a request: when Redis cannot take it, the answer is still sent and
``mqsa_feedback_dropped_total`` counts what was not recorded.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter
from collections.abc import Sequence

from mqsa.errors import StoreUnavailable
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

    async def served(self, impressions: list[Impression]) -> None:
        """Log the lists and count them; on a Redis failure, count them as dropped."""
        now = time.time()

        def count(pipe) -> None:
            for imp in impressions:
                self.stats.add_impression(pipe, imp, now)

        try:
            await self.store.log_impressions(impressions, now, count)
        except StoreUnavailable as exc:
            self.dropped("impressions", len(impressions), exc)

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
        except StoreUnavailable as exc:
            self.dropped("event_counts", sum(types.values()), exc)
