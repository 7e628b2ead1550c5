"""GET /dashboard: a built-in page over ``GET /stats``, and its assets (open: the page holds no data).

The page, its script, its styles and the chart library (uPlot, vendored under
``service/static/dashboard/vendor/uplot``, MIT) ship inside the package, so the
dashboard works on a cluster without internet. The page asks for the API key once
(kept in the tab's sessionStorage) and sends it as ``X-API-Key`` to ``/stats``
(scope read); the numbers come only from there. Every answer carries a
Content-Security-Policy that allows nothing but this origin (no inline script or
style, no other host), so even a hostile item id in the data cannot run code or
send anything elsewhere.
"""

from __future__ import annotations

import functools
import importlib.resources

from fastapi import APIRouter
from fastapi.responses import Response
from starlette.exceptions import HTTPException

STATIC_PACKAGE = "mqsa.service"
STATIC_DIR = "static/dashboard"

# The only files served (name in the URL -> path under STATIC_DIR, media type): nothing else is reachable.
ASSETS = {
    "dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    "uPlot.iife.min.js": ("vendor/uplot/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    "uPlot.min.css": ("vendor/uplot/uPlot.min.css", "text/css; charset=utf-8"),
    "favicon.svg": ("favicon.svg", "image/svg+xml"),
}
PAGE = ("index.html", "text/html; charset=utf-8")

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: a new release's page never runs an old script
}

router = APIRouter(include_in_schema=False)


@functools.cache
def asset(path: str) -> bytes:
    """The bytes of a file under ``STATIC_DIR`` in the installed package (read once)."""
    resource = importlib.resources.files(STATIC_PACKAGE)
    for part in f"{STATIC_DIR}/{path}".split("/"):
        resource = resource / part
    return resource.read_bytes()


def _answer(path: str, media_type: str) -> Response:
    return Response(asset(path), media_type=media_type, headers=HEADERS)


@router.get("/dashboard")
async def dashboard() -> Response:
    return _answer(*PAGE)


@router.get("/dashboard/static/{name}")
async def dashboard_asset(name: str) -> Response:
    if name not in ASSETS:
        raise HTTPException(404, f"no dashboard file '{name}'")
    return _answer(*ASSETS[name])
