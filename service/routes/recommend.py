"""POST /recommend: the top-n items for a user (scope: read)."""

from __future__ import annotations

import json
import time

from fastapi import APIRouter, Depends, Request, Response
from starlette.background import BackgroundTask

from mqsa.errors import StoreUnavailable
from mqsa.service.batching import Batcher
from mqsa.service.deps import FeedbackDep, MetricsDep, RegistryDep, SettingsDep, StoreDep, requires
from mqsa.service.feedback import Feedback, new_recommendation_id
from mqsa.service.keys import Scope
from mqsa.service.metrics import Metrics
from mqsa.service.recommender import Ask, Recommendation, recommend
from mqsa.service.registry import Served
from mqsa.service.routes import BODY_ERRORS, KEY_ERRORS, errors
from mqsa.service.schemas import FilterIn, RecommendIn, RecommendOut
from mqsa.service.store import Impression

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
    feedback: FeedbackDep,
) -> Response:
    """Reads the stored history (or uses ``recent_items``), encodes, blends, and searches once
    within the catalogue's rules, the ``filter`` and the exclusions.

    With no usable history the bundle's popular items answer (``source: popular``), under the
    same rules. If Redis cannot be read, ``recent_items`` or the popular items answer with
    ``degraded: true``. Items of the catalogue the model does not know yet may take
    MQSA_EXPLORE_SHARE of the list (``"source": "explore"``, ``"score": null``).

    With A/B traffic a stable hash of `user_id` picks the model (`model_version` says
    which); shadow models score the request after the answer is sent, and their lists
    are only logged. The answer's `recommendation_id` goes back with the user's events
    on its items (docs/feedback.md).
    """
    start = time.perf_counter()
    pick = registry.pick(body.user_id)
    served = pick.served  # this request uses this model and its rules to the end, whatever a reload does
    bundle = served.bundle
    stored, degraded = await _stored(body, store, metrics, settings.history_cap)
    history = body.recent_items if body.recent_items is not None else stored
    ask = _ask(body, stored, settings)
    batcher = request.app.state.batcher
    result = await recommend(bundle, served.rules, history, ask, body.alpha, metrics, batcher)
    recommendation_id = None
    logging = None
    if settings.log_impressions:
        version = bundle.model_version
        recommendation_id = new_recommendation_id(version)
        impression = _impression(body.user_id, recommendation_id, version, "served", result, start)
        if degraded:  # Redis failed this request already: do not try it a second time
            feedback.dropped("impressions", 1)
        else:  # once the answer is sent (docs/feedback.md, "When a list is logged")
            args = (feedback, impression, pick.shadows, history, ask, body.alpha, metrics, batcher)
            logging = BackgroundTask(_log, *args)
    # The hot path: serialised directly, not re-validated (the shape is RecommendOut's).
    payload = {
        "user_id": body.user_id,
        "items": [
            {"item_id": i, "score": s, "source": source} if source else {"item_id": i, "score": s}
            for i, s, source in result.items
        ],
        "model_version": bundle.model_version,
        "recommendation_id": recommendation_id,
        "source": result.source,
        "degraded": degraded,
    }
    content = json.dumps(payload, separators=(",", ":"))
    return Response(content=content, media_type="application/json", background=logging)


async def _stored(body: RecommendIn, store: StoreDep, metrics: Metrics, cap: int) -> tuple[list[str], bool]:
    """The user's stored history when the request needs it, and whether Redis failed to give it."""
    if body.recent_items is not None and not body.exclude_seen:
        return [], False
    try:
        with metrics.time_stage("redis"):
            return await store.history(body.user_id, cap), False
    except StoreUnavailable:
        metrics.fallbacks.labels(reason="redis_unavailable").inc()
        return [], True


def _ask(body: RecommendIn, stored: list[str], settings: SettingsDep) -> Ask:
    exclude = set(body.exclude_items)
    if body.exclude_seen:
        exclude.update(stored)
        if body.recent_items is not None:
            exclude.update(body.recent_items)
    return Ask(
        n=body.n,
        exclude=exclude,
        flt=FilterIn.rules(body.filter),
        max_per_category=body.max_per_category,
        explore_share=settings.explore_share if body.explore else 0.0,
        explore_pick=settings.explore_pick,
    )


def _impression(
    user_id: str, recommendation_id: str, model_version: str, mode: str, result: Recommendation, start: float
) -> Impression:
    return Impression(
        user_id=user_id,
        recommendation_id=recommendation_id,
        model_version=model_version,
        mode=mode,
        route="recommend",
        items=[item_id for item_id, _, _ in result.items],
        latency_seconds=time.perf_counter() - start,
        fallback=None if result.source == "model" else "no_usable_history",
    )


async def _log(
    feedback: Feedback,
    answer: Impression,
    shadows: tuple[Served, ...],
    history: list[str],
    ask: Ask,
    alpha: float | None,
    metrics: Metrics,
    batcher: Batcher,
) -> None:
    """After the answer is sent: log its list; then score the request with each shadow model
    and log their lists. A shadow that fails (its bundle, its index) is logged and counted as
    dropped; the others are logged all the same."""
    await feedback.served([answer])
    impressions = []
    for served in shadows:
        start = time.perf_counter()
        version = served.bundle.model_version
        try:
            result = await recommend(served.bundle, served.rules, history, ask, alpha, metrics, batcher)
        except Exception as exc:  # the answer is sent; one shadow must not lose the others' lists
            feedback.dropped("shadow_lists", 1, exc)
            continue
        rec_id = new_recommendation_id(version)
        impressions.append(_impression(answer.user_id, rec_id, version, "shadow", result, start))
    if impressions:
        await feedback.served(impressions)
