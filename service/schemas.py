"""Request and response bodies: the API's contract, as the OpenAPI document shows it.

Requests are strict: unknown fields are refused, numbers must be JSON numbers (not
strings or booleans), strings JSON strings; every limit names its field. Every error
of every route has one shape, :class:`ErrorOut`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from annotated_types import Ge, Le
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
)

from mqsa.service.rules import NO_FILTER, Filter
from mqsa.service.traffic import MAX_CHALLENGERS, SALT_PATTERN, SHARE_SLACK

MAX_ID_LENGTH = 256
MAX_EVENTS = 1000
MAX_N = 200
MAX_LIST = 1000
MAX_TIMESTAMP = 4_102_444_800.0  # 2100-01-01 in seconds: anything later is a unit mistake (ms, us)
# Not blank, no control characters (C0, DEL, C1): such an id cannot be told apart in a log,
# and a blank one stops `mqsa data prepare` (the Rust regex engine has no look-ahead, hence the shape).
ID_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"

Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN)]
# <model_version>-<served ms, 12 hex>-<8 random hex> (docs/feedback.md): the id names the model.
RECOMMENDATION_ID_PATTERN = r"^[0-9a-f]{16}-[0-9a-f]{12}-[0-9a-f]{8}$"
RecommendationId = Annotated[str, StringConstraints(pattern=RECOMMENDATION_ID_PATTERN)]
EventType = Annotated[str, StringConstraints(min_length=1, max_length=32)]


def _whole_number(value: object) -> object:
    """JSON has one number type: 10.0 is the integer 10 (JSON Schema agrees); "10" and true are not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Count = Annotated[int, BeforeValidator(_whole_number)]
# The bounds inside the type, so that the OpenAPI document shows them on an optional field too.
PerCategory = Annotated[int, Ge(1), Le(MAX_N), BeforeValidator(_whole_number)]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class EventIn(Request):
    user_id: Id
    item_id: Id
    timestamp: float | None = Field(
        None,
        ge=0,
        le=MAX_TIMESTAMP,
        allow_inf_nan=False,
        description="seconds since the epoch; the server's time if absent",
    )
    event_id: Id | None = Field(
        None,
        description="the client's id for this event: an event_id already seen for the user (within "
        "the de-duplication window) is skipped, so a request can be resent safely",
    )
    event_type: EventType | None = Field(
        None,
        description="one of MQSA_EVENT_TYPES (default view, click, add_to_cart, purchase); "
        "MQSA_DEFAULT_EVENT_TYPE when absent",
    )
    recommendation_id: RecommendationId | None = Field(
        None,
        description="the recommendation_id of the answer the item was taken from: a click carrying it "
        "counts for that answer's model (CTR), a purchase converts it",
    )


class EventsIn(Request):
    events: list[EventIn] = Field(min_length=1, max_length=MAX_EVENTS)


class EventsOut(BaseModel):
    accepted: int = Field(description="events stored")
    duplicates: int = Field(description="events skipped because their event_id was already seen")
    unknown_items: int = Field(description="accepted events whose item the current model does not know")


# No pattern on label names: JSON Schema would show it as patternProperties, which allows any
# other key with any value, and the document must say exactly what is accepted.
LabelName = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MAX_FILTER = 100  # values per filter part
MAX_LABELS = 20  # label names per item or filter


class FilterIn(Request):
    """Include-any within a part, every part must hold; items hidden by the catalogue never pass."""

    categories: list[Id] = Field(default_factory=list, max_length=MAX_FILTER, description="in any of these")
    exclude_categories: list[Id] = Field(
        default_factory=list, max_length=MAX_FILTER, description="in none of these"
    )
    labels: dict[LabelName, list[Id]] = Field(
        default_factory=dict,
        max_length=MAX_LABELS,
        description=(
            'label name -> allowed values, e.g. {"brand": ["acme", "zenith"]}; an empty list does not filter'
        ),
    )

    @staticmethod
    def rules(body: FilterIn | None) -> Filter:
        """The filter the rules apply (``service/rules.py``); none when the body has none."""
        if body is None:
            return NO_FILTER
        labels = tuple((name, tuple(values)) for name, values in sorted(body.labels.items()) if values)
        return Filter(tuple(body.categories), tuple(body.exclude_categories), labels)


class RecommendIn(Request):
    user_id: Id
    n: Count = Field(10, ge=1, le=MAX_N)
    exclude_seen: bool = True
    exclude_items: list[Id] = Field(default_factory=list, max_length=MAX_LIST)
    recent_items: list[Id] | None = Field(
        None, max_length=MAX_LIST, description="use these items as the history instead of the stored one"
    )
    alpha: float | None = Field(
        None, ge=0, le=1, allow_inf_nan=False, description="short-branch weight; the bundle's by default"
    )
    filter: FilterIn | None = Field(None, description="only items that pass it")
    max_per_category: PerCategory | None = Field(
        None,
        description="at most this many items of one category (a list may then be shorter)",
    )
    explore: bool = Field(
        True, description="let items the model does not know yet take MQSA_EXPLORE_SHARE of the list"
    )


class ScoredItem(BaseModel):
    item_id: str
    score: float | None = Field(
        description="the model's score (minus the rank for popular items); null when explored"
    )
    source: Literal["explore"] | None = Field(
        None,
        description='"explore" for an item the model does not know yet, given a slot to collect interactions',
    )


class RecommendOut(BaseModel):
    user_id: str
    items: list[ScoredItem]
    model_version: str = Field(description="the model that made this list (A/B: the user's arm)")
    recommendation_id: str | None = Field(
        None,
        description="send it back with the events on these items (POST /events); null when "
        "MQSA_LOG_IMPRESSIONS is off",
    )
    source: Literal["model", "popular"]
    degraded: bool = Field(False, description="true when Redis could not be read")


class ItemIn(Request):
    """One item's catalogue record: a field left out keeps its stored value."""

    item_id: Id
    categories: list[Id] | None = Field(None, max_length=MAX_FILTER)
    labels: dict[LabelName, Id] | None = Field(
        None, max_length=MAX_LABELS, description="replaces every label"
    )
    available: bool | None = Field(None, description="false hides the item from every answer")
    expires_at: float | None = Field(
        None, ge=0, le=MAX_TIMESTAMP, allow_inf_nan=False, description="seconds since the epoch; null: never"
    )

    @field_validator("categories")
    @classmethod
    def _once_each(cls, categories: list[str] | None) -> list[str] | None:
        """A category named twice counts once (in the per-category cap too)."""
        return None if categories is None else list(dict.fromkeys(categories))


class ItemsIn(Request):
    items: list[ItemIn] = Field(min_length=1, max_length=MAX_EVENTS)


class ItemsOut(BaseModel):
    upserted: int
    catalogue_version: int = Field(
        description="workers see the change when they reach this version (within ~1 s)"
    )


class ItemOut(BaseModel):
    item_id: str
    categories: list[str]
    labels: dict[str, str]
    available: bool
    expires_at: float | None
    created_at: float
    updated_at: float
    known_to_model: bool = Field(
        description="whether the serving model has this item (else it can only be explored)"
    )


class SimilarIn(Request):
    n: Count = Field(10, ge=1, le=MAX_N)
    user_id: Id | None = Field(
        None, description="who the list is for: their later events on its items count as its hits"
    )
    filter: FilterIn | None = None
    exclude_items: list[Id] = Field(default_factory=list, max_length=MAX_LIST)
    max_per_category: PerCategory | None = None


class SimilarOut(BaseModel):
    item_id: str
    items: list[ScoredItem]
    model_version: str
    recommendation_id: str | None = Field(
        None, description="send it back with the events on these items; null when impressions are not logged"
    )


class ReloadIn(Request):
    bundle_dir: str | None = Field(
        None,
        min_length=1,
        max_length=255,
        description="a bundle directory under MQSA_BUNDLE_ROOT (a name relative to it, or an absolute path "
        "inside it); the configured bundle if absent",
    )


class ReloadOut(BaseModel):
    reloaded: bool
    model_version: str
    previous_version: str | None


class ModelOut(BaseModel):
    model_version: str
    created_at: str | None
    num_items: int
    max_len: int
    hidden_size: int
    alpha: float
    index: dict | None
    metrics: dict | None
    popular_items: int


class HealthOut(BaseModel):
    status: Literal["ok"]


class RedisMemory(BaseModel):
    used_bytes: int
    max_bytes: int = Field(description="Redis's maxmemory; 0 when it sets none")
    used_ratio: float = Field(
        description="used / max (0 when there is no max): /events fails at 1 (noeviction)"
    )


class ReadyOut(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, bool]
    model_version: str | None = None
    redis_memory: RedisMemory | None = Field(
        None, description="memory pressure, for a look (alert on the mqsa_redis_memory_used_ratio metric)"
    )
    catalogue_version: int | None = Field(None, description="the catalogue version this worker has applied")
    archive_backlog: int | None = Field(
        None,
        description="with MQSA_STREAM_ARCHIVE: events in Redis not yet archived by `mqsa events "
        "archive` (alert on the mqsa_archive_backlog_events metric); it does not decide readiness",
    )


class FieldError(BaseModel):
    field: str = Field(description="the field's path in the body, e.g. events.0.timestamp")
    message: str


class ErrorOut(BaseModel):
    """The one shape of every error answer (4xx and 5xx)."""

    error: str = Field(
        description="a stable code: invalid_request, malformed_json, unauthorized, forbidden, not_found, "
        "method_not_allowed, body_too_large, unsupported_media_type, bundle_refused, bundle_error, "
        "store_unavailable, inference_error, request_timeout, internal_error"
    )
    detail: str = Field(description="what is wrong, for a person to read")
    fields: list[FieldError] = Field(
        default_factory=list, description="for invalid_request: every field and what is wrong with it"
    )


class LatencyOut(BaseModel):
    p50: float | None = Field(description="ms, from the latency histogram's buckets (all replicas)")
    p95: float | None
    p99: float | None


class MinuteOut(BaseModel):
    minute: int = Field(description="the minute's start, seconds since the epoch")
    impressions: int
    attributable: int
    clicks: int
    hits: int
    conversions: int
    p99_ms: float | None


class ModelStatsOut(BaseModel):
    model_version: str
    mode: Literal["served", "shadow"] | str
    role: str | None = Field(description="champion, challenger, or null for a version no longer loaded")
    impressions: int
    attributable: int = Field(description="impressions of lists with a user (only those can be hit)")
    clicks: int
    hits: int
    conversions: int
    ctr: float | None = Field(description="clicks / impressions; null with no impression")
    hit_rate: float | None = Field(description="lists hit within the attribution window / attributable")
    conversion_rate: float | None = Field(description="conversions / impressions")
    distinct_items: int = Field(description="distinct items served in the hours the window touches (HLL)")
    num_items: int | None = Field(description="the model's item count, when it is loaded")
    coverage: float | None = Field(description="distinct_items / num_items")
    latency_ms: LatencyOut
    fallbacks: dict[str, int]
    offline_metrics: dict | None = Field(description="the bundle's manifest metrics, when it is loaded")
    series: list[MinuteOut]


class WindowOut(BaseModel):
    minutes: int
    since: float
    until: float


class StatsOut(BaseModel):
    window: WindowOut
    attribution_window_seconds: int
    models: list[ModelStatsOut]
    events: dict[str, int] = Field(description="accepted events per type in the window")
    traffic: dict = Field(description="the A/B plan: champion, shares per model version, shadow versions")


class ChallengerIn(Request):
    bundle_dir: str = Field(
        min_length=1,
        max_length=255,
        description="a bundle directory under MQSA_BUNDLE_ROOT (a name relative to it, or an absolute path "
        "inside it)",
    )
    share: float = Field(
        0.0, ge=0, le=1, allow_inf_nan=False, description="the share of users it serves (0 in shadow)"
    )
    shadow: bool = Field(False, description="score every request and log the list, never serve it")

    @field_validator("shadow")
    @classmethod
    def _no_share_in_shadow(cls, shadow: bool, info: ValidationInfo) -> bool:
        if shadow and info.data.get("share"):
            raise ValueError("a challenger in shadow serves no one: its share must be 0")
        return shadow


class TrafficIn(Request):
    """The whole plan: it replaces the one in force, on every replica."""

    challengers: list[ChallengerIn] = Field(
        max_length=MAX_CHALLENGERS,
        description="the challengers, in the order their intervals of users are laid out; [] ends the test",
    )
    salt: str | None = Field(
        None,
        pattern=SALT_PATTERN,
        description="what users are hashed with: a new one reshuffles them (a new experiment); the plan's "
        "current salt if absent",
    )

    @field_validator("challengers")
    @classmethod
    def _shares_fit(cls, challengers: list[ChallengerIn]) -> list[ChallengerIn]:
        if sum(c.share for c in challengers) > 1.0 + SHARE_SLACK:
            raise ValueError("the shares add up to more than 1 (the champion serves 1 minus their sum)")
        if len({c.bundle_dir for c in challengers}) != len(challengers):
            raise ValueError("a bundle directory is named twice")
        return challengers


class ChallengerOut(BaseModel):
    bundle_dir: str
    share: float
    shadow: bool
    model_version: str | None = Field(
        description="the model this worker serves from it; null when it serves none (not loaded yet, "
        "refused, or a model served already): its share goes to the champion"
    )


class TrafficOut(BaseModel):
    version: int = Field(
        description="the plan's version: each PUT adds one; 0 is MQSA_CHALLENGERS (Redis holds no plan)"
    )
    salt: str
    updated_at: float | None = Field(description="when the plan was stored; null for MQSA_CHALLENGERS")
    challengers: list[ChallengerOut]
    champion: str = Field(description="the champion's model version")
    shares: dict[str, float] = Field(
        description="model version -> the share of users it serves on this worker, the champion's included"
    )
    shadow: list[str] = Field(description="the model versions scoring every request in shadow on this worker")
