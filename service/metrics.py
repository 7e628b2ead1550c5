"""Prometheus metrics of one app instance (its own registry, so tests can build many apps).

With several uvicorn workers each worker keeps its own counters; scrape each
pod, or run one worker per pod as the Kubernetes manifests do.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

ONLINE_COUNTERS = {  # the online metrics' totals in Redis (service/stats.py), cluster-wide
    "impressions": "Lists served (mode=served) or scored in shadow (mode=shadow), all replicas",
    "attributable": "Impressions of lists with a user (the ones events can hit), all replicas",
    "clicks": "Clicks carrying a recommendation id of the model, all replicas",
    "hits": "Lists hit by a later event of their user within the attribution window, all replicas",
    "conversions": "Purchases attributed to the model's lists, all replicas",
}
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Histogram(
            "mqsa_request_seconds",
            "Request latency by route and status",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stage = Histogram(
            "mqsa_stage_seconds",
            "Time in each stage: redis (history read), redis_append, encoder, search",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "mqsa_fallbacks_total",
            "Answers not from the model, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.events = Counter(
            "mqsa_events_total", "Events received, by outcome", ["outcome"], registry=self.registry
        )
        self.redis_memory = Gauge(
            "mqsa_redis_memory_used_ratio",
            "Redis used_memory / maxmemory at the last /readyz (0 when Redis sets no maxmemory); "
            "with maxmemory-policy noeviction, /events answers 503 once it reaches 1",
            registry=self.registry,
        )
        self.archive_backlog = Gauge(
            "mqsa_archive_backlog_events",
            "With MQSA_STREAM_ARCHIVE: events in Redis not yet archived, at the last /readyz "
            "(growing: the archiver is behind or stopped; nothing is dropped, Redis memory grows)",
            registry=self.registry,
        )
        self.feedback_dropped = Counter(
            "mqsa_feedback_dropped_total",
            "What was not recorded because Redis failed (the answers were sent): impressions, "
            "event_counts, shadow_lists",
            ["what"],
            registry=self.registry,
        )
        self.online = OnlineCollector()
        self.registry.register(self.online)
        self.model = Gauge(
            "mqsa_model_info", "The served model version (value 1)", ["version"], registry=self.registry
        )

    def set_model(self, version: str) -> None:
        self.model.clear()
        self.model.labels(version=version).set(1)

    @contextmanager
    def time_stage(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage.labels(stage=stage).observe(time.perf_counter() - start)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class OnlineCollector:
    """The online metrics' totals as Prometheus counters, from the last snapshot read from Redis.

    ``/metrics`` reads the totals (``OnlineStats.totals``) and hands them to :meth:`update`
    before rendering; the values are cluster-wide, the same on every replica (aggregate
    with ``max by (model_version, mode)``).
    """

    def __init__(self) -> None:
        self.totals: dict[str, int] = {}

    def update(self, totals: dict[str, int]) -> None:
        self.totals = totals

    def collect(self) -> Iterator[CounterMetricFamily]:
        families = {
            name: CounterMetricFamily(f"mqsa_online_{name}", help_text, labels=["model_version", "mode"])
            for name, help_text in ONLINE_COUNTERS.items()
        }
        events = CounterMetricFamily(
            "mqsa_online_events", "Accepted events by type, all replicas", labels=["event_type"]
        )
        fallbacks = CounterMetricFamily(
            "mqsa_online_fallbacks",
            "Lists not made by the model, by reason, all replicas",
            labels=["model_version", "mode", "reason"],
        )
        for field, value in sorted(self.totals.items()):
            parts = field.split("|")
            if len(parts) == 2 and parts[0] == "events":
                events.add_metric([parts[1]], value)
            elif len(parts) == 3 and parts[2] in families:
                families[parts[2]].add_metric(parts[:2], value)
            elif len(parts) == 3 and parts[2].startswith("fallback:"):
                fallbacks.add_metric([parts[0], parts[1], parts[2][9:]], value)
        yield from families.values()
        yield events
        yield fallbacks
