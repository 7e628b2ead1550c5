"""The catalogue over HTTP: PUT /items, GET and DELETE /items/{item_id} (write, read, write),
and the items similar to one: GET or POST /items/{item_id}/similar (read)."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Depends, Path, Query

from mqsa.errors import NotFound
from mqsa.service.deps import CatalogueDep, FeedbackDep, MetricsDep, RegistryDep, SettingsDep, requires
from mqsa.service.feedback import new_recommendation_id
from mqsa.service.keys import Scope
from mqsa.service.recommender import Ask, similar
from mqsa.service.routes import BODY_ERRORS, KEY_ERRORS, errors
from mqsa.service.schemas import (
    ID_PATTERN,
    MAX_ID_LENGTH,
    MAX_N,
    FilterIn,
    ItemOut,
    ItemsIn,
    ItemsOut,
    ScoredItem,
    SimilarIn,
    SimilarOut,
)
from mqsa.service.store import Impression

router = APIRouter(tags=["items"])
DEFAULTS = {"categories": [], "labels": {}, "available": True, "expires_at": None}  # what null sets
ItemId = Annotated[str, Path(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN)]


@router.put(
    "/items",
    response_model=ItemsOut,
    dependencies=[Depends(requires(Scope.WRITE))],
    responses=errors(*BODY_ERRORS, *KEY_ERRORS, 503),
    summary="Add or update items in the catalogue",
)
async def put_items(body: ItemsIn, catalogue: CatalogueDep) -> ItemsOut:
    """Merge each item into its record: a field left out keeps its value, a field set to null
    goes back to its default (no categories, no labels, available, no expiry). Every worker
    applies the change within about a second."""
    patches = []
    for item in body.items:
        given = item.model_dump(exclude={"item_id"}, exclude_unset=True)
        patches.append((item.item_id, {k: DEFAULTS[k] if v is None else v for k, v in given.items()}))
    version = await catalogue.upsert(patches)
    return ItemsOut(upserted=len(patches), catalogue_version=version)


@router.get(
    "/items/{item_id}",
    response_model=ItemOut,
    dependencies=[Depends(requires(Scope.READ))],
    responses=errors(*KEY_ERRORS, 404, 422, 503),
    summary="An item's catalogue record",
)
async def get_item(item_id: ItemId, catalogue: CatalogueDep, registry: RegistryDep) -> ItemOut:
    record = await catalogue.get(item_id)
    if record is None:
        raise NotFound(f"item {item_id!r} is not in the catalogue")
    known = item_id in registry.bundle.item_index
    return ItemOut(item_id=item_id, **record.to_dict(), known_to_model=known)


@router.delete(
    "/items/{item_id}",
    status_code=204,
    dependencies=[Depends(requires(Scope.WRITE))],
    responses=errors(*KEY_ERRORS, 404, 422, 503),
    summary="Remove an item's catalogue record (the item itself stays in the model)",
)
async def delete_item(item_id: ItemId, catalogue: CatalogueDep) -> None:
    if not await catalogue.delete(item_id):
        raise NotFound(f"item {item_id!r} is not in the catalogue")


@router.get(
    "/items/{item_id}/similar",
    response_model=SimilarOut,
    dependencies=[Depends(requires(Scope.READ))],
    responses=errors(*KEY_ERRORS, 404, 422, 500),
    summary="The items nearest to one item",
)
async def get_similar(
    item_id: ItemId,
    registry: RegistryDep,
    metrics: MetricsDep,
    settings: SettingsDep,
    feedback: FeedbackDep,
    background: BackgroundTasks,
    n: Annotated[int, Query(ge=1, le=MAX_N)] = 10,
    user_id: Annotated[str | None, Query(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN)] = None,
) -> SimilarOut:
    """Nearest by the inner product of the item embeddings (TED distils item-to-item
    transitions into them), never the item itself, within the catalogue's rules. For
    "what comes after this item", ask /recommend with ``recent_items: [item_id]``.

    With ``user_id`` the list is the user's A/B arm's, and the user's later events on its
    items count as its hits (``GET /stats``)."""
    ask = SimilarIn(n=n, user_id=user_id)
    return _similar(registry, metrics, settings, feedback, background, item_id, ask)


@router.post(
    "/items/{item_id}/similar",
    response_model=SimilarOut,
    dependencies=[Depends(requires(Scope.READ))],
    responses=errors(*BODY_ERRORS, *KEY_ERRORS, 404, 500),
    summary="The items nearest to one item, with a filter",
)
async def post_similar(
    item_id: ItemId,
    body: SimilarIn,
    registry: RegistryDep,
    metrics: MetricsDep,
    settings: SettingsDep,
    feedback: FeedbackDep,
    background: BackgroundTasks,
) -> SimilarOut:
    return _similar(registry, metrics, settings, feedback, background, item_id, body)


def _similar(
    registry: RegistryDep,
    metrics: MetricsDep,
    settings: SettingsDep,
    feedback: FeedbackDep,
    background: BackgroundTasks,
    item_id: str,
    body: SimilarIn,
) -> SimilarOut:
    start = time.perf_counter()
    served = registry.pick(body.user_id).served  # one model and its rules to the end of the request
    ask = Ask(body.n, set(body.exclude_items), FilterIn.rules(body.filter), body.max_per_category)
    found = similar(served.bundle, served.rules, item_id, ask, metrics)
    version = served.bundle.model_version
    recommendation_id = None
    if settings.log_impressions:
        recommendation_id = new_recommendation_id(version)
        listed = [i for i, _ in found]
        latency = time.perf_counter() - start
        imp = Impression(body.user_id or "", recommendation_id, version, "served", "similar", listed, latency)
        background.add_task(feedback.served, [imp])  # once the answer is sent
    items = [ScoredItem(item_id=i, score=s) for i, s in found]
    return SimilarOut(
        item_id=item_id, items=items, model_version=version, recommendation_id=recommendation_id
    )
