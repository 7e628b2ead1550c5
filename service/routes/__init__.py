"""One router per resource; ``ROUTERS`` is what the app includes, in this order.

events      POST /events                       write
recommend   POST /recommend                    read
model       GET /model, POST /admin/reload     read, admin
traffic     GET, PUT /admin/traffic            admin
stats       GET /stats                         read
health      GET /healthz, /readyz (open), /metrics (admin unless MQSA_PUBLIC_METRICS)
docs        GET /openapi.json, /docs           read unless MQSA_PUBLIC_DOCS
dashboard   GET /dashboard, /dashboard/static/* open (the page holds no data; it reads /stats)
"""

from __future__ import annotations

from typing import Any

from mqsa.service.schemas import ErrorOut

ERROR_DESCRIPTIONS = {
    400: "malformed_json: the body is not valid JSON",
    401: "unauthorized: no API key, or one that matches no configured key",
    403: "forbidden: the API key lacks the scope this route needs",
    404: "not_found: no such item (in the catalogue, or known to the model)",
    408: "request_timeout: the body did not arrive within MQSA_BODY_TIMEOUT_SECONDS",
    409: "bundle_refused: not a usable bundle under MQSA_BUNDLE_ROOT; the current model keeps serving",
    413: "body_too_large: the body is over MQSA_MAX_BODY_BYTES",
    422: "invalid_request: a field is missing, of the wrong type or out of range (see `fields`)",
    500: "inference_error: the encoder or the index failed on this request",
    503: "store_unavailable (with Retry-After) or bundle_error: Redis or the model is not available",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, all with the one error shape."""
    return {s: {"model": ErrorOut, "description": ERROR_DESCRIPTIONS[s]} for s in statuses}


BODY_ERRORS = (400, 408, 413, 422)  # every route that reads a JSON body may answer these
KEY_ERRORS = (401, 403)  # every route that needs a scope
