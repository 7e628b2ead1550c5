"""The API against its own OpenAPI document: a bounded schemathesis run over every operation
with every check (positive and negative data, status codes, response schemas, content types,
headers), on the real app with a real Redis. 0 server errors and 0 schema violations."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from mqsa.service.app import create_app
from mqsa.service.keys import entry, new_key
from mqsa.service.settings import Settings

EXAMPLES = 20  # per operation, mode and app: about 1,600 requests in all
ALL_SCOPES = new_key()


@pytest.fixture(scope="module")
def open_app(bundle_dir, redis_url, run_prefix) -> Any:
    """Development: no keys, every route open."""
    settings = Settings(bundle_dir=bundle_dir, redis_url=redis_url, redis_prefix=f"{run_prefix}:contract")
    return create_app(settings)


@pytest.fixture(scope="module")
def keyed_app(bundle_dir, redis_url, run_prefix) -> Any:
    """Production-like: keys configured, docs public so the schema can be read, calls sent with a key."""
    settings = Settings(
        bundle_dir=bundle_dir,
        redis_url=redis_url,
        redis_prefix=f"{run_prefix}:contract-keyed",
        api_keys=entry(ALL_SCOPES, ["read", "write", "admin"]),
        public_docs=True,
    )
    return create_app(settings)


@pytest.fixture(scope="module")
def open_schema(open_app) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", open_app)


@pytest.fixture(scope="module")
def keyed_schema(keyed_app) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", keyed_app)


OPERATIONS = [
    ("POST", "/events"),
    ("POST", "/recommend"),
    ("PUT", "/items"),
    ("GET", "/items/{item_id}"),
    ("DELETE", "/items/{item_id}"),
    ("GET", "/items/{item_id}/similar"),
    ("POST", "/items/{item_id}/similar"),
    ("GET", "/model"),
    ("GET", "/stats"),
    ("POST", "/admin/reload"),
    ("GET", "/admin/traffic"),
    ("PUT", "/admin/traffic"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
]
WITH_INPUT = [
    op for op in OPERATIONS if op[0] in ("POST", "PUT") or "{" in op[1]
]  # negative data needs an input
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in WITH_INPUT
]


def excused(method: str, path: str, mode: GenerationMode, body: Any) -> list:
    """The checks a case is excused from: schema-valid bodies that break a rule JSON Schema cannot
    state are refused with 422 naming the field (PUT /admin/traffic: shares adding up past 1, a
    share in shadow, a bundle named twice)."""
    if (method, path, mode) != ("PUT", "/admin/traffic", GenerationMode.POSITIVE):
        return []
    challengers = body.get("challengers") or []
    broken = (
        sum(c.get("share", 0) for c in challengers) > 1
        or any(c.get("shadow") and c.get("share") for c in challengers)
        or len({c["bundle_dir"] for c in challengers}) < len(challengers)
    )
    return [positive_data_acceptance] if broken else []


BOUNDED = hypothesis_settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


def test_the_document_lists_every_operation(open_schema) -> None:
    listed = {(op.ok().method.upper(), op.ok().path) for op in open_schema.get_all_operations()}
    assert listed == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
@BOUNDED
@given(data=st.data())
def test_the_open_api_keeps_its_contract(open_schema, method: str, path: str, mode, data) -> None:
    case = data.draw(open_schema[path][method].as_strategy(mode))
    case.call_and_validate(excluded_checks=excused(method, path, mode, case.body))


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
@BOUNDED
@given(data=st.data())
def test_the_keyed_api_keeps_its_contract(keyed_schema, method: str, path: str, mode, data) -> None:
    case = data.draw(keyed_schema[path][method].as_strategy(mode))
    case.call_and_validate(
        headers={"X-API-Key": ALL_SCOPES}, excluded_checks=excused(method, path, mode, case.body)
    )
