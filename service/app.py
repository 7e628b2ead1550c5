"""The FastAPI application factory: lifespan (bundle, Redis pool, watcher), middleware, errors.

    from mqsa.service.app import create_app
    app = create_app()          # settings from MQSA_* environment variables

Routes are in ``service/api.py``. Nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from mqsa import __version__
from mqsa.errors import ServiceError, StoreUnavailable
from mqsa.service.api import router
from mqsa.service.metrics import Metrics
from mqsa.service.registry import ModelRegistry
from mqsa.service.settings import Settings, load_settings
from mqsa.service.store import HistoryStore, connect


class EdgeMiddleware:
    """Pure ASGI middleware: refuses oversize bodies (413) and times every request.

    The latency histogram is labelled with the route template (not the raw
    path), the method and the status.
    """

    def __init__(self, app: Any, max_body_bytes: int, metrics: Metrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}
        limit = self.max_body_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_json(
                send, 413, {"error": "body_too_large", "detail": f"request body exceeds {limit} bytes"}
            )
            self._observe(scope, 413, start)
            return
        if declared is None and scope["method"] in ("POST", "PUT", "PATCH"):
            # No declared length (chunked): read up to the limit here, then replay it to the app.
            body = bytearray()
            while True:
                message = await receive()
                body += message.get("body", b"")
                if len(body) > limit:
                    await _send_json(
                        send,
                        413,
                        {"error": "body_too_large", "detail": f"request body exceeds {limit} bytes"},
                    )
                    self._observe(scope, 413, start)
                    return
                if not message.get("more_body", False):
                    break
            replay = [{"type": "http.request", "body": bytes(body), "more_body": False}]

            async def replayed_receive() -> dict:
                return replay.pop() if replay else await receive()

            receive = replayed_receive

        async def recorded_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        await self.app(scope, receive, recorded_send)
        self._observe(scope, status["code"], start)

    def _observe(self, scope: dict, status: int, start: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", "unmatched")
        self.metrics.requests.labels(route=path, method=scope["method"], status=str(status)).observe(
            time.perf_counter() - start
        )


async def _send_json(send: Any, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    detail = [
        {"field": _field(tuple(e.get("loc", ()))), "message": e.get("msg", "invalid")} for e in exc.errors()
    ]
    return JSONResponse(status_code=422, content={"error": "invalid_request", "detail": detail})


async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    headers = {"Retry-After": "1"} if isinstance(exc, StoreUnavailable) else None
    name = "".join("_" + c.lower() if c.isupper() else c for c in type(exc).__name__).lstrip("_")
    return JSONResponse(
        status_code=exc.status_code, content={"error": name, "detail": str(exc)}, headers=headers
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. The bundle and the Redis pool are opened in the lifespan, not here."""
    settings = settings or load_settings()
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = ModelRegistry(settings.bundle_dir, settings.onnx_threads, settings.faiss_threads)
        registry.load()
        redis = connect(
            settings.redis_url.get_secret_value(),
            settings.redis_timeout_seconds,
            cluster=settings.redis_cluster,
        )
        app.state.registry = registry
        app.state.store = HistoryStore(
            redis,
            prefix=settings.redis_prefix,
            history_cap=settings.history_cap,
            ttl_seconds=settings.history_ttl_seconds,
            stream_maxlen=settings.stream_maxlen,
            stream_shards=settings.stream_shards,
        )
        metrics.set_model(registry.bundle.model_version)
        watcher = None
        if settings.watch_bundle:
            watcher = asyncio.create_task(registry.watch(settings.watch_interval_seconds))
        try:
            yield
        finally:
            if watcher:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            await redis.aclose()

    app = FastAPI(
        title="MQSA-TED recommendations",
        version=__version__,
        description="Sequential recommendations from a user's recent items (MQSA-TED, WSDM 2024).",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.add_middleware(EdgeMiddleware, max_body_bytes=settings.max_body_bytes, metrics=metrics)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ServiceError, _service_error)
    app.include_router(router)
    return app
