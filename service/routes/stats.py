"""GET /stats (scope: read): the online metrics per model version, from Redis (all replicas)."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from mqsa.service.deps import RegistryDep, SettingsDep, StatsDep, requires
from mqsa.service.keys import Scope
from mqsa.service.routes import KEY_ERRORS, errors
from mqsa.service.schemas import LatencyOut, MinuteOut, ModelStatsOut, StatsOut, WindowOut
from mqsa.service.stats import COUNTERS, MAX_MINUTES, ModelStats, quantile, rate, to_ms

router = APIRouter(tags=["stats"])


@router.get(
    "/stats",
    response_model=StatsOut,
    dependencies=[Depends(requires(Scope.READ))],
    responses=errors(*KEY_ERRORS, 422, 503),
    summary="Online metrics per model version over a window",
)
async def get_stats(
    stats: StatsDep,
    registry: RegistryDep,
    settings: SettingsDep,
    minutes: Annotated[int, Query(ge=1, le=MAX_MINUTES, description="the window ending now")] = 60,
) -> StatsOut:
    """Impressions, CTR, hit rate, conversion rate, coverage, latency and fallbacks per model
    version and mode (served or shadow), in total and per minute, over the last ``minutes``
    minutes; the events per type; the A/B plan. Every replica counts into the same Redis
    keys, so any replica answers the same. docs/feedback.md defines each number."""
    now = time.time()
    found, events, span = await stats.window(minutes, now)
    loaded = {served.bundle.model_version: (served, role) for served, role in registry.models()}
    return StatsOut(
        window=WindowOut(minutes=minutes, since=span[0], until=now),
        attribution_window_seconds=settings.attribution_window_seconds,
        models=[_model(m, loaded.get(m.model_version), span) for m in found],
        events=dict(sorted(events.items())),
        traffic=registry.traffic(),
    )


def _model(m: ModelStats, loaded: tuple | None, span: list[int]) -> ModelStatsOut:
    served, role = loaded if loaded else (None, None)
    num_items = served.bundle.num_items if served else None
    impressions = m.counts["impressions"]
    series = []
    for minute in span:
        counts = m.series.get(minute, {})
        latency = m.series_latency.get(minute)
        p99 = to_ms(quantile(latency, 0.99)) if latency else None
        series.append(MinuteOut(minute=minute, **{c: counts.get(c, 0) for c in COUNTERS}, p99_ms=p99))
    return ModelStatsOut(
        model_version=m.model_version,
        mode=m.mode,
        role=role,
        **{c: m.counts[c] for c in COUNTERS},
        ctr=rate(m.counts["clicks"], impressions),
        hit_rate=rate(m.counts["hits"], m.counts["attributable"]),
        conversion_rate=rate(m.counts["conversions"], impressions),
        distinct_items=m.distinct_items,
        num_items=num_items,
        coverage=min(1.0, m.distinct_items / num_items) if num_items else None,
        latency_ms=LatencyOut(**{f"p{q}": to_ms(quantile(m.latency, q / 100)) for q in (50, 95, 99)}),
        fallbacks=dict(m.fallbacks),
        offline_metrics=served.bundle.manifest.get("metrics") if served else None,
        series=series,
    )
