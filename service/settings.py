"""Service settings from the environment (prefix ``MQSA_``), validated by pydantic-settings.

Every setting is listed in the README. In production (``MQSA_ENVIRONMENT=production``)
the service refuses to start without API keys. Secrets (the Redis URL, which may hold
a password, and the keys' digests) are ``SecretStr``-like and never printed: an
invalid setting is reported by name and reason, never by value (:func:`load_settings`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from mqsa.errors import ConfigError
from mqsa.service.keys import StoredKey, parse_entries
from mqsa.service.traffic import DEFAULT_SALT, SALT_PATTERN, Challenger, check_shares, parse_challengers

IMPRESSION = "impression"  # the stream entries of served lists: never a client's event type
EVENT_TYPE = re.compile(r"[a-z0-9_-]{1,32}")


class Settings(BaseSettings):
    """Everything the service reads at start.

    Each is the environment variable ``MQSA_<NAME>``; the README's table is made from
    this list (``make readme-settings``) and checked against it by a test.

    Attributes:
        bundle_dir: the serving bundle written by `mqsa export` (`mqsa serve --bundle` sets it).
        bundle_root: `/admin/reload` loads only bundles under this directory (default: the
            parent of the bundle directory).
        bundle_hmac_key: when set, a bundle's manifest must carry a valid HMAC-SHA256
            signature made with this key (`mqsa export` signs when it is set for it too).
        environment: development or production (refuses to start without API keys).
        redis_url: where user histories and the event stream live (a secret: it may hold a
            password; never printed).
        redis_cluster: the Redis URL names a node of a Redis Cluster.
        redis_prefix: prefix of every key this service writes (no braces).
        redis_timeout_seconds: socket timeout of every Redis call (a hung Redis never hangs
            a request).
        redis_health_check_seconds: a pooled connection idle this long is checked
            (PING) before it is used again.
        history_cap: items kept per user (more than the model's T).
        history_ttl_seconds: a user's history expires after this long without events.
        dedup_window_seconds: an event id is remembered this long for de-duplication.
        dedup_cap: the most event ids remembered per user (the newest); up to 128 the set
            keeps Redis's compact encoding.
        stream_maxlen: approximate bound of the event streams together (unused with
            `stream_archive`).
        stream_shards: buckets (hash-tag slots, one stream each) users are spread over.
        stream_archive: `mqsa events archive` keeps the events: the service never trims the
            streams (the archiver removes what it has stored), so no event is lost before it
            is archived; `/readyz` and `mqsa_archive_backlog_events` say how many wait.
        ack: when `/events` answers: memory, once Redis has applied the events; disk, once
            they are also in Redis's append-only file on disk (service/durability.py).
        ack_replicas: also wait until this many replicas have the events.
        ack_timeout_ms: how long to wait for the disk or the replicas before answering 503
            (below the Redis timeout: the wait is one Redis call).
        onnx_threads: onnxruntime threads per worker.
        faiss_threads: FAISS threads per worker.
        api_keys: comma-separated `SCOPES:SHA256` entries (`mqsa keys new`; service/keys.py);
            when set, every route but /healthz and /readyz needs a key with its scope.
        public_docs: /docs and /openapi.json need no key even when keys are set.
        public_metrics: /metrics needs no key even when keys are set.
        max_body_bytes: larger request bodies are refused with 413.
        body_timeout_seconds: a request body not received within this is refused with 408.
        header_timeout_seconds: a connection that has not sent its request headers within
            this is closed (`mqsa serve`).
        explore_share: the share of each list given to catalogue items the model does not
            know yet (1 in 10 by default), so they collect interactions before the next training.
        explore_pick: which of those: newest (first written to the catalogue) or random.
        catalogue_poll_seconds: how often each worker looks for catalogue changes.
        event_types: the event types `/events` takes (comma-separated; `impression` is the
            service's own and cannot be one).
        default_event_type: the type of an event sent without one (old clients).
        history_event_types: the types that enter the user's history the model reads
            (comma-separated; empty: every type). Every event is streamed and archived.
        click_event_type: the type counted as a click of a recommendation (CTR).
        conversion_event_type: the type counted as a conversion.
        log_impressions: log every served list as an impression (stream, archive) and
            count the online metrics in Redis (`/stats`); off: answers carry no
            recommendation id.
        attribution_window_seconds: a later event of a user on an item of a list served
            to them within this long is a hit of that list (and a purchase, a conversion).
        watch_bundle: poll the bundle directory and reload when it changes.
        watch_interval_seconds: how often to poll.
        challengers: the traffic plan while Redis holds none (`PUT /admin/traffic` stores one):
            comma-separated `BUNDLE_DIR=SHARE` entries (the challenger serves that share of the
            users) or `BUNDLE_DIR=shadow` (it scores every request, its lists are logged, never
            served), bundles under the bundle root, e.g. `v2=0.1,v3=shadow`; the champion serves
            the rest (docs/feedback.md).
        traffic_salt: the salt of that plan's split of the users (a new one reshuffles them).
        traffic_poll_seconds: how often each worker looks for a new traffic plan in Redis.
    """

    model_config = SettingsConfigDict(env_prefix="MQSA_", extra="ignore")

    bundle_dir: Path
    bundle_root: Path | None = None
    bundle_hmac_key: SecretStr | None = None
    environment: Literal["development", "production"] = "development"
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    redis_cluster: bool = False
    redis_prefix: str = Field("mqsa", min_length=1, max_length=64, pattern=r"^[^{}]+$")
    redis_timeout_seconds: float = Field(0.25, gt=0, le=30)
    redis_health_check_seconds: float = Field(5.0, ge=0, le=3600)
    history_cap: int = Field(200, ge=1, le=100_000)
    history_ttl_seconds: int = Field(30 * 24 * 3600, ge=60)
    dedup_window_seconds: int = Field(24 * 3600, ge=1)
    dedup_cap: int = Field(128, ge=1, le=1_000_000)
    stream_maxlen: int = Field(1_000_000, ge=1000)
    stream_shards: int = Field(16, ge=1, le=16384)
    stream_archive: bool = False
    ack: Literal["memory", "disk"] = "memory"
    ack_replicas: int = Field(0, ge=0, le=16)
    ack_timeout_ms: int = Field(200, ge=1, le=60_000)
    onnx_threads: int = Field(1, ge=1, le=64)
    faiss_threads: int = Field(1, ge=1, le=64)
    api_keys: Annotated[list[StoredKey], NoDecode] = Field(default_factory=list)
    public_docs: bool = False
    public_metrics: bool = False
    max_body_bytes: int = Field(1_000_000, ge=1024)
    body_timeout_seconds: float = Field(10.0, gt=0, le=600)
    header_timeout_seconds: float = Field(10.0, gt=0, le=600)
    explore_share: float = Field(0.1, ge=0, le=1)
    explore_pick: Literal["newest", "random"] = "newest"
    catalogue_poll_seconds: float = Field(0.25, gt=0, le=60)
    event_types: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["view", "click", "add_to_cart", "purchase"]
    )
    default_event_type: str = "view"
    history_event_types: Annotated[list[str], NoDecode] = Field(default_factory=list)
    click_event_type: str = "click"
    conversion_event_type: str = "purchase"
    log_impressions: bool = True
    attribution_window_seconds: int = Field(1800, ge=1, le=7 * 24 * 3600)
    watch_bundle: bool = False
    watch_interval_seconds: float = Field(5.0, gt=0)
    challengers: Annotated[list[Challenger], NoDecode] = Field(default_factory=list)
    traffic_salt: str = Field(DEFAULT_SALT, pattern=SALT_PATTERN)
    traffic_poll_seconds: float = Field(1.0, gt=0, le=60)

    @field_validator("challengers", mode="before")
    @classmethod
    def _parse_challengers(cls, value: object) -> object:
        if isinstance(value, str):
            return parse_challengers(value)
        return value

    @field_validator("challengers")
    @classmethod
    def _check_challengers(cls, challengers: list[Challenger]) -> list[Challenger]:
        check_shares(challengers)
        return challengers

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return parse_entries(value)
        return value

    @field_validator("event_types", "history_event_types", mode="before")
    @classmethod
    def _split_types(cls, value: object) -> object:
        if isinstance(value, str):
            return [t.strip() for t in value.split(",") if t.strip()]
        return value

    @field_validator("event_types", "history_event_types")
    @classmethod
    def _valid_types(cls, types: list[str]) -> list[str]:
        for name in types:
            if not EVENT_TYPE.fullmatch(name):
                raise ValueError("event types are 1-32 of a-z, 0-9, _ and -")
            if name == IMPRESSION:
                raise ValueError("'impression' is the service's own type (served lists), not a client's")
        return list(dict.fromkeys(types))

    @model_validator(mode="after")
    def _consistent_types(self) -> Settings:
        if not self.event_types:
            raise ValueError("MQSA_EVENT_TYPES must name at least one type")
        for name in ("default_event_type", "click_event_type", "conversion_event_type"):
            if getattr(self, name) not in self.event_types:
                raise ValueError(f"MQSA_{name.upper()} must be one of MQSA_EVENT_TYPES")
        unknown = set(self.history_event_types) - set(self.event_types)
        if unknown:
            raise ValueError("MQSA_HISTORY_EVENT_TYPES must be a subset of MQSA_EVENT_TYPES")
        return self

    @property
    def history_types(self) -> frozenset[str]:
        """The event types that enter users' histories."""
        return frozenset(self.history_event_types or self.event_types)

    @model_validator(mode="after")
    def _refuse_unsafe_values(self) -> Settings:
        if self.environment == "production" and not self.api_keys:
            raise ValueError("MQSA_API_KEYS must be set in production (every route would be open)")
        if self.ack_timeout_ms >= self.redis_timeout_seconds * 1000:
            raise ValueError("MQSA_ACK_TIMEOUT_MS must be below MQSA_REDIS_TIMEOUT_SECONDS (in ms)")
        return self

    @property
    def reload_root(self) -> Path:
        """The directory ``/admin/reload`` may load bundles from."""
        return (self.bundle_root or self.bundle_dir.parent).resolve()

    def redis_url_masked(self) -> str:
        """The Redis URL with its password (if any) replaced by ``***``, for logs and errors."""
        return mask_url(self.redis_url.get_secret_value())


def mask_url(url: str) -> str:
    """``redis://user:secret@host:6379/0`` -> ``redis://user:***@host:6379/0``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


def load_settings(**overrides: Any) -> Settings:
    """The settings from the environment (and ``overrides``), or one ConfigError naming every bad one.

    The message names each variable and what is wrong with it, never the value given
    (it may be a secret).

    Raises:
        ConfigError: from pydantic's ValidationError.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_input=False, include_context=False, include_url=False):
            name = "_".join(str(part) for part in error.get("loc", ()) if isinstance(part, str))
            where = f"MQSA_{name.upper()}" if name else "the settings"
            problems.append(f"{where}: {error.get('msg', 'invalid')}")
        raise ConfigError("invalid service settings: " + "; ".join(problems)) from exc
