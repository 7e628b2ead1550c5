"""GET /healthz and /readyz (always open) and /metrics (scope: admin unless MQSA_PUBLIC_METRICS)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from mqsa.errors import StoreUnavailable
from mqsa.service.deps import MetricsDep, RegistryDep, StatsDep, StoreDep, requires
from mqsa.service.keys import Scope
from mqsa.service.routes import KEY_ERRORS, errors
from mqsa.service.schemas import HealthOut, ReadyOut, RedisMemory

router = APIRouter(tags=["health"])
log = logging.getLogger("mqsa.service")


@router.get("/healthz", response_model=HealthOut, summary="The process is alive")
async def healthz() -> HealthOut:
    return HealthOut(status="ok")


@router.get(
    "/readyz",
    response_model=ReadyOut,
    responses={503: {"model": ReadyOut, "description": "not ready: the bundle or Redis is missing"}},
    summary="A bundle and the catalogue are loaded and Redis answers",
)
async def readyz(
    request: Request, registry: RegistryDep, store: StoreDep, metrics: MetricsDep
) -> JSONResponse:
    """Ready when the bundle is loaded and Redis answers. Redis's memory use is reported (and
    exported as a metric) but does not decide: when Redis is full, /events fails but
    /recommend still answers, so taking every replica out of rotation would be worse."""
    follower = request.app.state.catalogue_follower  # until the catalogue is read, nothing is hidden
    checks = {"bundle": registry.loaded, "redis": await store.ping(), "catalogue": follower.loaded}
    ready = all(checks.values())
    memory = await store.memory() if checks["redis"] else None
    redis_memory = None
    if memory is not None:
        used, limit = memory
        ratio = used / limit if limit else 0.0
        metrics.redis_memory.set(ratio)
        redis_memory = RedisMemory(used_bytes=used, max_bytes=limit, used_ratio=ratio)
    backlog = None
    if checks["redis"] and store.stream_archive:
        try:
            backlog = await store.unarchived()
            metrics.archive_backlog.set(backlog)
        except StoreUnavailable:  # Redis went away since the ping: the check above already says so
            pass
    body = ReadyOut(
        status="ready" if ready else "not_ready",
        checks=checks,
        model_version=registry.bundle.model_version if registry.loaded else None,
        redis_memory=redis_memory,
        catalogue_version=follower.version if follower.loaded else None,
        archive_backlog=backlog,
    )
    return JSONResponse(status_code=200 if ready else 503, content=body.model_dump())


@router.get(
    "/metrics",
    dependencies=[Depends(requires(Scope.ADMIN, open_when="public_metrics"))],
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text"},
        **errors(*KEY_ERRORS),
    },
    response_class=Response,
    summary="Prometheus metrics",
)
async def metrics_endpoint(metrics: MetricsDep, stats: StatsDep) -> Response:
    """This process's counters, and the online metrics' cluster-wide totals read from Redis now
    (``mqsa_online_*``; left at their last values when Redis does not give them: a scrape
    never fails over them)."""
    try:
        metrics.online.update(await stats.totals())
    except Exception as exc:
        log.warning("/metrics without fresh online totals: %s", exc)
    return Response(content=metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
