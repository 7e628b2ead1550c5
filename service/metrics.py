"""Prometheus metrics of one app instance (its own registry, so tests can build many apps).

With several uvicorn workers each worker keeps its own counters; scrape each
pod, or run one worker per pod as the Kubernetes manifests do.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
