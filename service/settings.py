"""Service settings from the environment (prefix ``MQSA_``), validated by pydantic-settings.

Every setting is listed in the README. In production (``MQSA_ENVIRONMENT=production``)
unsafe values are refused at start: no API keys, or keys shorter than 16 characters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from mqsa.errors import ConfigError


class Settings(BaseSettings):
    """Everything the service reads at start.

    Attributes:
        bundle_dir: the serving bundle written by ``mqsa export``.
        environment: "development" or "production" (stricter checks).
        redis_url: where user histories and the event stream live.
        redis_cluster: ``redis_url`` names a node of a Redis Cluster.
        redis_prefix: prefix of every key this service writes.
        redis_timeout_seconds: socket timeout of every Redis call.
        history_cap: items kept per user (more than the model's T).
        history_ttl_seconds: a user's history expires after this long without events.
        stream_maxlen: approximate bound of the event streams together.
        stream_shards: buckets (hash-tag slots, one stream each) users are spread over.
        onnx_threads: onnxruntime threads per worker.
        faiss_threads: FAISS threads per worker.
        api_keys: comma-separated keys; when set, /events and /admin/* need one.
        max_body_bytes: larger request bodies are refused with 413.
        watch_bundle: poll the bundle directory and reload when it changes.
        watch_interval_seconds: how often to poll.
    """

    model_config = SettingsConfigDict(env_prefix="MQSA_", extra="ignore")

    bundle_dir: Path
    environment: Literal["development", "production"] = "development"
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    redis_cluster: bool = False
    redis_prefix: str = Field("mqsa", min_length=1, max_length=64, pattern=r"^[^{}]+$")
    redis_timeout_seconds: float = Field(0.25, gt=0, le=30)
    history_cap: int = Field(200, ge=1, le=100_000)
    history_ttl_seconds: int = Field(30 * 24 * 3600, ge=60)
    stream_maxlen: int = Field(1_000_000, ge=1000)
    stream_shards: int = Field(16, ge=1, le=16384)
    onnx_threads: int = Field(1, ge=1, le=64)
    faiss_threads: int = Field(1, ge=1, le=64)
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    max_body_bytes: int = Field(1_000_000, ge=1024)
    watch_bundle: bool = False
    watch_interval_seconds: float = Field(5.0, gt=0)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.environment == "production":
            if not self.api_keys:
                raise ValueError("MQSA_API_KEYS must be set in production (the admin routes would be open)")
            if any(len(k.get_secret_value()) < 16 for k in self.api_keys):
                raise ValueError("every API key must be at least 16 characters in production")
        return self


def load_settings(**overrides: object) -> Settings:
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
        for error in exc.errors():
            name = "_".join(str(part) for part in error.get("loc", ()) if isinstance(part, str))
            where = f"MQSA_{name.upper()}" if name else "the settings"
            problems.append(f"{where}: {error.get('msg', 'invalid')}")
        raise ConfigError("invalid service settings: " + "; ".join(problems)) from exc
