"""What routes depend on: the app's settings, model registry, store and metrics, and the API key check.

Each route declares the scope it needs with ``dependencies=[requires(Scope.READ)]``
(see ``service/keys.py``); the objects live on ``app.state``, opened in the lifespan.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request

from mqsa.errors import Forbidden, Unauthorized
from mqsa.service.catalogue import CatalogueStore
from mqsa.service.feedback import Feedback
from mqsa.service.keys import Scope, scopes_of
from mqsa.service.metrics import Metrics
from mqsa.service.registry import ModelRegistry
from mqsa.service.settings import Settings
from mqsa.service.stats import OnlineStats
from mqsa.service.store import HistoryStore
from mqsa.service.traffic import TrafficFollower


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def get_store(request: Request) -> HistoryStore:
    return request.app.state.store


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_catalogue(request: Request) -> CatalogueStore:
    return request.app.state.catalogue


async def get_traffic(request: Request) -> TrafficFollower:
    return request.app.state.traffic


async def get_feedback(request: Request) -> Feedback:
    return request.app.state.feedback


async def get_stats(request: Request) -> OnlineStats:
    return request.app.state.stats


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
StoreDep = Annotated[HistoryStore, Depends(get_store)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
CatalogueDep = Annotated[CatalogueStore, Depends(get_catalogue)]
TrafficDep = Annotated[TrafficFollower, Depends(get_traffic)]
FeedbackDep = Annotated[Feedback, Depends(get_feedback)]
StatsDep = Annotated[OnlineStats, Depends(get_stats)]


def requires(scope: Scope, open_when: str | None = None) -> Callable[..., Awaitable[None]]:
    """A dependency that lets the request through only with a key holding ``scope``.

    It reads the headers itself, with the request as its only parameter: FastAPI then
    resolves nothing else for it on the hot path (a Header() parameter and a settings
    dependency cost about 30 us a request).

    Args:
        scope: the scope the route needs.
        open_when: the name of a boolean setting that opens the route to everyone
            (``public_docs``, ``public_metrics``).

    Raises (from the dependency):
        Unauthorized: no key, or a key that matches none configured (401).
        Forbidden: a valid key without ``scope`` (403).
    """

    async def check(request: Request) -> None:
        settings: Settings = request.app.state.settings
        if not settings.api_keys or (open_when and getattr(settings, open_when)):
            return
        offered = request.headers.get("x-api-key")
        authorization = request.headers.get("authorization")
        if offered is None and authorization and authorization.lower().startswith("bearer "):
            offered = authorization[7:].strip()
        if not offered:
            raise Unauthorized("an API key is required (X-API-Key header or Authorization: Bearer)")
        granted = scopes_of(offered, settings.api_keys)
        if not granted:
            raise Unauthorized("the API key is not valid")
        if scope not in granted:
            raise Forbidden(f"the API key does not have the '{scope}' scope this route needs")

    check.__name__ = f"requires_{scope}"
    return check
