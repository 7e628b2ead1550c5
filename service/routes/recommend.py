"""POST /recommend: the top-n items for a user (scope: read)."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request, Response

from mqsa.errors import StoreUnavailable
from mqsa.service.deps import MetricsDep, RegistryDep, SettingsDep, StoreDep, requires
from mqsa.service.keys import Scope
from mqsa.service.recommender import Ask, recommend
from mqsa.service.routes import BODY_ERRORS, KEY_ERRORS, errors
from mqsa.service.schemas import FilterIn, RecommendIn, RecommendOut

router = APIRouter(tags=["recommend"])


@router.post(
    "/recommend",
    response_model=None,
    dependencies=[Depends(requires(Scope.READ))],
    responses={
        200: {"model": RecommendOut, "description": "the recommended items"},
        **errors(*BODY_ERRORS, *KEY_ERRORS, 500, 503),
    },
    summary="Top-n items for a user",
)
async def post_recommend(
    request: Request,
    body: RecommendIn,
    store: StoreDep,
    registry: RegistryDep,
    metrics: MetricsDep,
    settings: SettingsDep,
) -> Response:
    """Reads the stored history (or uses ``recent_items``), encodes, blends, and searches once
    within the catalogue's rules, the ``filter`` and the exclusions.

    With no usable history the bundle's popular items answer (``source: popular``), under the
    same rules. If Redis cannot be read, ``recent_items`` or the popular items answer with
    ``degraded: true``. Items of the catalogue the model does not know yet may take
    MQSA_EXPLORE_SHARE of the list (``"source": "explore"``, ``"score": null``).
    """
    served = registry.served  # this request uses this model and its rules to the end, whatever a reload does
    bundle = served.bundle
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
    ask = Ask(
        n=body.n,
        exclude=exclude,
        flt=FilterIn.rules(body.filter),
        max_per_category=body.max_per_category,
        explore_share=settings.explore_share if body.explore else 0.0,
        explore_pick=settings.explore_pick,
    )
    result = await recommend(
        bundle, served.rules, history, ask, body.alpha, metrics, request.app.state.batcher
    )
    # The hot path: serialised directly, not re-validated (the shape is RecommendOut's).
    payload = {
        "user_id": body.user_id,
        "items": [
            {"item_id": i, "score": s, "source": source} if source else {"item_id": i, "score": s}
            for i, s, source in result.items
        ],
        "model_version": bundle.model_version,
        "source": result.source,
        "degraded": degraded,
    }
    return Response(content=json.dumps(payload, separators=(",", ":")), media_type="application/json")
