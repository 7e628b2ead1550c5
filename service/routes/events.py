"""POST /events: users' interactions, appended to their histories (scope: write)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends
from fastapi.exceptions import RequestValidationError

from mqsa.service.deps import FeedbackDep, MetricsDep, RegistryDep, SettingsDep, StoreDep, requires
from mqsa.service.keys import Scope
from mqsa.service.routes import BODY_ERRORS, KEY_ERRORS, errors
from mqsa.service.schemas import EventsIn, EventsOut
from mqsa.service.store import Event

router = APIRouter(tags=["events"])


@router.post(
    "/events",
    response_model=EventsOut,
    dependencies=[Depends(requires(Scope.WRITE))],
    responses=errors(*BODY_ERRORS, *KEY_ERRORS, 503),
    summary="Append users' events",
)
async def post_events(
    body: EventsIn,
    store: StoreDep,
    registry: RegistryDep,
    metrics: MetricsDep,
    settings: SettingsDep,
    feedback: FeedbackDep,
) -> EventsOut:
    """Append each item to its user's history, in arrival order per user.

    A 200 means every event was applied (see MQSA_ACK for when that is on disk). A 503
    does **not** mean "not stored": Redis may have applied some or all of the events
    before the answer was lost. Give every event an `event_id` and resend the same
    request after a 503: events already stored count as `duplicates`, the others are
    stored once.

    `event_type` is one of MQSA_EVENT_TYPES (MQSA_DEFAULT_EVENT_TYPE when absent); only
    MQSA_HISTORY_EVENT_TYPES enter the history the model reads, every type is streamed
    and archived. An event carrying the `recommendation_id` of an answer is counted for
    that answer's model (a click: CTR; a purchase: a conversion), and any event on an
    item served to its user within MQSA_ATTRIBUTION_WINDOW_SECONDS is a hit of that list
    (`GET /stats`).
    """
    now = time.time()
    types = settings.event_types
    wrong = [i for i, e in enumerate(body.events) if e.event_type is not None and e.event_type not in types]
    if wrong:
        message = "must be one of " + ", ".join(types)
        raise RequestValidationError(
            [{"loc": ("body", "events", i, "event_type"), "msg": message, "type": "enum"} for i in wrong]
        )
    events = [
        Event(
            e.user_id,
            e.item_id,
            e.timestamp if e.timestamp is not None else now,
            e.event_id,
            e.event_type or settings.default_event_type,
            e.recommendation_id,
        )
        for e in body.events
    ]
    with metrics.time_stage("redis_append"):
        result = await store.append(events)
    await feedback.events(events, result)
    known = registry.bundle.item_index
    unknown = sum(1 for e, ok in zip(events, result.applied, strict=True) if ok and e.item_id not in known)
    metrics.events.labels(outcome="accepted").inc(result.accepted)
    metrics.events.labels(outcome="duplicate").inc(result.duplicates)
    return EventsOut(accepted=result.accepted, duplicates=result.duplicates, unknown_items=unknown)
