"""GET /openapi.json and /docs: the API's contract (scope: read unless MQSA_PUBLIC_DOCS)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from mqsa.service.deps import requires
from mqsa.service.keys import Scope

router = APIRouter(
    include_in_schema=False, dependencies=[Depends(requires(Scope.READ, open_when="public_docs"))]
)


@router.get("/openapi.json")
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title=request.app.title + " - docs")
