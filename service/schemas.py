"""Request and response bodies. Unknown fields are refused; every limit names its field."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_ID_LENGTH = 256
MAX_EVENTS = 1000
MAX_N = 200
MAX_LIST = 1000

Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class EventIn(Strict):
    user_id: Id
    item_id: Id
    timestamp: float | None = Field(None, ge=0, description="seconds since the epoch; server time if absent")
    event_id: Id | None = Field(
        None, description="idempotency key: an event_id already seen for the user is skipped"
    )


class EventsIn(Strict):
    events: list[EventIn] = Field(min_length=1, max_length=MAX_EVENTS)


class EventsOut(BaseModel):
    accepted: int = Field(description="events stored")
    duplicates: int = Field(description="events skipped because their event_id was already seen")
    unknown_items: int = Field(description="accepted events whose item the current model does not know")


class RecommendIn(Strict):
    user_id: Id
    n: int = Field(10, ge=1, le=MAX_N)
    exclude_seen: bool = True
    exclude_items: list[Id] = Field(default_factory=list, max_length=MAX_LIST)
    recent_items: list[Id] | None = Field(
        None, max_length=MAX_LIST, description="use these items as the history instead of the stored one"
    )
    alpha: float | None = Field(None, ge=0, le=1, description="short-branch weight; the bundle's by default")


class ScoredItem(BaseModel):
    item_id: str
    score: float


class RecommendOut(BaseModel):
    user_id: str
    items: list[ScoredItem]
    model_version: str
    source: Literal["model", "popular"]
    degraded: bool = Field(False, description="true when Redis could not be read")


class ReloadIn(Strict):
    bundle_dir: str | None = Field(
        None, max_length=4096, description="another bundle; the configured one if absent"
    )
