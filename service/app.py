"""The FastAPI application factory: lifespan (bundle, Redis pool, watcher), middleware, errors.

    from mqsa.service.app import create_app
    app = create_app()          # settings from MQSA_* environment variables

Routes are in ``service/routes/`` (one router per resource). Every error answer has
one shape, ``{"error", "detail", "fields"}`` (``schemas.ErrorOut``): the handlers
here turn validation errors, routing errors (404, 405) and the service's own errors
into it. Nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from mqsa import __version__
from mqsa.errors import ServiceError, StoreUnavailable
from mqsa.service.batching import Batcher
from mqsa.service.catalogue import CatalogueFollower, CatalogueStore, seed_catalogue
from mqsa.service.edge import EdgeMiddleware
from mqsa.service.feedback import Feedback
from mqsa.service.metrics import Metrics
from mqsa.service.registry import ModelRegistry
from mqsa.service.routes import dashboard, docs, events, health, items, model, recommend, stats, traffic
from mqsa.service.settings import Settings, load_settings
from mqsa.service.stats import OnlineStats
from mqsa.service.store import HistoryStore, connect
from mqsa.service.traffic import TrafficFollower, TrafficPlan, TrafficStore

log = logging.getLogger("mqsa.service")
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 415: "unsupported_media_type"}


def error_response(
    status: int, code: str, detail: str, fields: Iterable[dict] = (), headers: dict[str, str] | None = None
) -> JSONResponse:
    """An answer in the API's one error shape."""
    content = {"error": code, "detail": detail, "fields": list(fields)}
    return JSONResponse(status_code=status, content=content, headers=headers)


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(400, "malformed_json", "the body is not valid JSON")
    fields = [{"field": _field(tuple(e.get("loc", ()))), "message": e.get("msg", "invalid")} for e in errors]
    return error_response(422, "invalid_request", "the request does not fit the API (see fields)", fields)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)


async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    headers = {"Retry-After": "1"} if isinstance(exc, StoreUnavailable) else None
    code = "".join("_" + c.lower() if c.isupper() else c for c in type(exc).__name__).lstrip("_")
    return error_response(exc.status_code, code, str(exc), exc.fields, headers=headers)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "an unexpected error; the service's log has the details")


async def _shut_down(tasks: list[asyncio.Task], store: HistoryStore, redis: Any, timeout: float) -> None:
    """Stop the background tasks and close the pool, each bounded by ``timeout`` seconds.

    Closing a redis-py client can wait forever for a socket that never reports closed
    (redis/redis-py#3941); a stopping worker logs that and goes on rather than hanging.
    """
    for task in tasks:
        task.cancel()
    steps = (asyncio.gather(*tasks, return_exceptions=True), store.close(), redis.aclose())
    for name, step in zip(("background tasks", "pending reads", "redis pool"), steps, strict=True):
        try:
            await asyncio.wait_for(step, timeout)
        except TimeoutError:
            log.warning("shutdown: %s did not stop within %.1f s; going on", name, timeout)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. The bundle and the Redis pool are opened in the lifespan, not here."""
    settings = settings or load_settings()
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.registry = _registry(settings)
        app.state.registry.load()
        redis = connect(
            settings.redis_url.get_secret_value(),
            settings.redis_timeout_seconds,
            health_check_seconds=settings.redis_health_check_seconds,
            cluster=settings.redis_cluster,
        )
        app.state.store = _store(settings, redis)
        app.state.stats = OnlineStats(redis, settings.redis_prefix)
        app.state.feedback = Feedback(app.state.store, app.state.stats, settings, metrics)
        await app.state.store.check_durability()
        app.state.catalogue = CatalogueStore(redis, settings.redis_prefix)
        follower = await _follow_catalogue(app.state.registry, app.state.catalogue, settings)
        app.state.catalogue_follower = follower
        metrics.set_model(app.state.registry.bundle.model_version)
        app.state.traffic = await _follow_traffic(app.state.registry, redis, settings)
        tasks = [asyncio.create_task(follower.follow()), asyncio.create_task(app.state.traffic.follow())]
        if settings.watch_bundle:
            tasks.append(asyncio.create_task(app.state.registry.watch(settings.watch_interval_seconds)))
        try:
            yield
        finally:
            await _shut_down(tasks, app.state.store, redis, settings.redis_timeout_seconds)

    app = FastAPI(
        title="MQSA-TED recommendations",
        version=__version__,
        description="Sequential recommendations from a user's recent items (MQSA-TED, WSDM 2024).",
        lifespan=lifespan,
        docs_url=None,  # served by routes/docs.py, behind the read scope unless MQSA_PUBLIC_DOCS
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.batcher = Batcher(metrics)
    app.add_middleware(
        EdgeMiddleware,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_seconds=settings.body_timeout_seconds,
        metrics=metrics,
    )
    app.openapi = lambda: _openapi(app, settings)  # type: ignore[method-assign]
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(Exception, _unexpected_error)
    for module in (events, recommend, items, model, stats, traffic, health, docs, dashboard):
        app.include_router(module.router)
    return app


def _openapi(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """FastAPI's document, with what this service's settings accept: the event types."""
    if app.openapi_schema is None:
        document = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        event = document["components"]["schemas"]["EventIn"]["properties"]["event_type"]
        for option in event.get("anyOf", [event]):
            if option.get("type") == "string":
                option["enum"] = list(settings.event_types)
        app.openapi_schema = document
    return app.openapi_schema


async def _follow_catalogue(
    registry: ModelRegistry, catalogue: CatalogueStore, settings: Settings
) -> CatalogueFollower:
    """Seed the catalogue from the bundle if Redis has none yet, load it, and return its follower.

    With Redis down at start the rules stay empty (nothing hidden) and ``/readyz`` says
    the catalogue is not loaded until the follower manages to.
    """
    follower = CatalogueFollower(
        catalogue,
        apply=registry.apply_catalogue,
        replace=registry.replace_catalogue,
        interval_seconds=settings.catalogue_poll_seconds,
    )
    try:
        await seed_catalogue(catalogue, registry.bundle.path)
        await follower.load()
    except StoreUnavailable as exc:
        log.warning("the catalogue is not loaded yet: %s", exc)
    return follower


async def _follow_traffic(registry: ModelRegistry, redis: Any, settings: Settings) -> TrafficFollower:
    """Follow the traffic plan in Redis, or ``MQSA_CHALLENGERS`` while there is none: its
    challengers are loaded (after the catalogue, whose rules they get) before the first request."""
    initial = TrafficPlan(0, settings.traffic_salt, tuple(settings.challengers))
    store = TrafficStore(redis, settings.redis_prefix)
    follower = TrafficFollower(store, registry.follow_plan, initial, settings.traffic_poll_seconds)
    await follower.load()
    return follower


def _registry(settings: Settings) -> ModelRegistry:
    hmac_key = settings.bundle_hmac_key.get_secret_value() if settings.bundle_hmac_key else None
    return ModelRegistry(
        settings.bundle_dir, settings.reload_root, settings.onnx_threads, settings.faiss_threads, hmac_key
    )


def _store(settings: Settings, redis: Any) -> HistoryStore:
    return HistoryStore(
        redis,
        prefix=settings.redis_prefix,
        history_cap=settings.history_cap,
        ttl_seconds=settings.history_ttl_seconds,
        stream_maxlen=settings.stream_maxlen,
        dedup_window_seconds=settings.dedup_window_seconds,
        dedup_cap=settings.dedup_cap,
        stream_shards=settings.stream_shards,
        ack=settings.ack,
        ack_replicas=settings.ack_replicas,
        ack_timeout_ms=settings.ack_timeout_ms,
        stream_archive=settings.stream_archive,
        history_types=settings.history_types,
        attribution_window_seconds=settings.attribution_window_seconds,
        conversion_event_type=settings.conversion_event_type,
    )
