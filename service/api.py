"""HTTP routes: /events, /recommend, /healthz, /readyz, /metrics, /model, /admin/reload."""

from __future__ import annotations

import hmac
import json
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import JSONResponse

from mqsa.errors import StoreUnavailable, Unauthorized
from mqsa.service.metrics import Metrics
from mqsa.service.recommender import recommend
from mqsa.service.registry import ModelRegistry
from mqsa.service.schemas import EventsIn, EventsOut, RecommendIn, RecommendOut, ReloadIn
from mqsa.service.settings import Settings
from mqsa.service.store import Event, HistoryStore


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def get_store(request: Request) -> HistoryStore:
    return request.app.state.store


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
StoreDep = Annotated[HistoryStore, Depends(get_store)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


async def require_api_key(
    settings: SettingsDep,
    x_api_key: Annotated[str | None, Header()] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> None:
    """When API keys are configured, the request must carry one (X-API-Key or Bearer)."""
    if not settings.api_keys:
        return
    offered = x_api_key
    if offered is None and authorization and authorization.lower().startswith("bearer "):
        offered = authorization[7:]
    if offered is None:
        raise Unauthorized("an API key is required (X-API-Key header or Authorization: Bearer)")
    matches = [
        hmac.compare_digest(offered.encode(), k.get_secret_value().encode()) for k in settings.api_keys
    ]
    if not any(matches):
        raise Unauthorized("the API key is not valid")


ApiKey = Depends(require_api_key)
router = APIRouter()


@router.post("/events", response_model=EventsOut, dependencies=[ApiKey], summary="Append users' events")
async def post_events(
    body: EventsIn, store: StoreDep, registry: RegistryDep, metrics: MetricsDep
) -> EventsOut:
    """Append each item to its user's history, in arrival order per user.

    Answers 2xx only once the events are stored; 503 with Retry-After when Redis is unavailable.
    """
    now = time.time()
    events = [
        Event(e.user_id, e.item_id, e.timestamp if e.timestamp is not None else now, e.event_id)
        for e in body.events
    ]
    with metrics.time_stage("redis_append"):
        result = await store.append(events)
    known = registry.bundle.item_index
    unknown = sum(1 for e, ok in zip(events, result.applied, strict=True) if ok and e.item_id not in known)
    metrics.events.labels(outcome="accepted").inc(result.accepted)
    metrics.events.labels(outcome="duplicate").inc(result.duplicates)
    return EventsOut(accepted=result.accepted, duplicates=result.duplicates, unknown_items=unknown)


@router.post(
    "/recommend",
    response_model=None,
    responses={200: {"model": RecommendOut, "description": "the recommended items"}},
    summary="Top-n items for a user",
)
async def post_recommend(
    body: RecommendIn, store: StoreDep, registry: RegistryDep, metrics: MetricsDep, settings: SettingsDep
) -> Response:
    """Reads the stored history (or uses ``recent_items``), encodes, blends, searches, filters.

    With no usable history the bundle's popular items answer (``source: popular``).
    If Redis cannot be read, ``recent_items`` or the popular items answer with ``degraded: true``.
    """
    bundle = registry.bundle  # this request uses this model to the end, whatever a reload does
    degraded = False
    stored: list[str] = []
    if body.recent_items is None or body.exclude_seen:
        try:
            with metrics.time_stage("redis"):
                stored = await store.history(body.user_id, settings.history_cap)
        except StoreUnavailable:
            degraded = True
            metrics.fallbacks.labels(reason="redis_unavailable").inc()
    history = body.recent_items if body.recent_items is not None else stored
    exclude = set(body.exclude_items)
    if body.exclude_seen:
        exclude.update(stored)
        if body.recent_items is not None:
            exclude.update(body.recent_items)
    result = recommend(bundle, history, body.n, exclude, body.alpha, metrics)
    # The hot path: serialised directly, not re-validated (the shape is RecommendOut's).
    payload = {
        "user_id": body.user_id,
        "items": [{"item_id": i, "score": s} for i, s in result.items],
        "model_version": bundle.model_version,
        "source": result.source,
        "degraded": degraded,
    }
    return Response(content=json.dumps(payload, separators=(",", ":")), media_type="application/json")


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="A bundle is loaded and Redis answers")
async def readyz(registry: RegistryDep, store: StoreDep) -> JSONResponse:
    checks = {"bundle": registry.loaded, "redis": await store.ping()}
    ready = all(checks.values())
    body = {"status": "ready" if ready else "not_ready", "checks": checks}
    if registry.loaded:
        body["model_version"] = registry.bundle.model_version
    return JSONResponse(status_code=200 if ready else 503, content=body)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics_endpoint(metrics: MetricsDep) -> Response:
    return Response(content=metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/model", summary="What model is serving")
async def model_info(registry: RegistryDep) -> dict:
    bundle = registry.bundle
    m = bundle.manifest
    return {
        "model_version": m["model_version"],
        "created_at": m.get("created_at"),
        "bundle_dir": str(bundle.path),
        "num_items": m["num_items"],
        "max_len": m["max_len"],
        "hidden_size": m["hidden_size"],
        "alpha": m["alpha"],
        "index": m.get("index"),
        "metrics": m.get("metrics"),
        "popular_items": len(bundle.popular),
    }


@router.post("/admin/reload", dependencies=[ApiKey], summary="Load the bundle again (or another one)")
async def admin_reload(
    registry: RegistryDep, metrics: MetricsDep, body: ReloadIn | None = None
) -> JSONResponse:
    """Verify and swap in a bundle; one that fails verification is refused (409), the old one serves on."""
    result = await registry.reload(body.bundle_dir if body and body.bundle_dir else None)
    content = {
        "reloaded": result.reloaded,
        "model_version": result.model_version,
        "previous_version": result.previous_version,
    }
    if not result.reloaded:
        return JSONResponse(
            status_code=409, content={**content, "error": "bundle_refused", "detail": result.reason}
        )
    metrics.set_model(result.model_version)
    return JSONResponse(status_code=200, content=content)
