"""The edge of the service, before any route: body limits, body time limit, request timing.

A pure ASGI middleware (no per-request objects beyond what it needs):

* a declared ``Content-Length`` over ``MQSA_MAX_BODY_BYTES`` -> 413 at once;
* a request with a body (POST, PUT, PATCH) is read here, whole, within
  ``MQSA_BODY_TIMEOUT_SECONDS`` of its headers (a client that trickles or stalls its
  body gets 408 and the connection closes), and at most ``MQSA_MAX_BODY_BYTES``
  bytes (413), then handed on to the app;
* every request's latency is observed, labelled with the route template (not the
  raw path), the method and the status.

The time limit on request *headers* is the server's (``mqsa serve`` sets it; see
``service/server.py``): an ASGI app sees a request only once its headers are in.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from mqsa.service.metrics import Metrics

BODY_METHODS = ("POST", "PUT", "PATCH")


class ClientGone(Exception):
    """The client disconnected before its body was in: there is no one to answer."""


class BodyRefused(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


class EdgeMiddleware:
    def __init__(self, app: Any, max_body_bytes: int, body_timeout_seconds: float, metrics: Metrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_seconds = body_timeout_seconds
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def recorded_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if scope["method"] in BODY_METHODS or self._declared_length(scope) is not None:
                receive = await self._read_body(scope, receive)
        except ClientGone:
            status["code"] = 499  # nginx's code for it; nothing is sent
        except BodyRefused as refused:
            await send_error(recorded_send, refused.status, refused.code, refused.detail, close=True)
        else:
            await self.app(scope, receive, recorded_send)
        self._observe(scope, status["code"], start)

    @staticmethod
    def _declared_length(scope: dict) -> int | None:
        for name, value in scope.get("headers") or []:
            if name == b"content-length":
                return int(value) if value.isdigit() else None
        return None

    async def _read_body(self, scope: dict, receive: Any) -> Any:
        """The whole body, within the limits; returns a ``receive`` that replays it."""
        limit = self.max_body_bytes
        declared = self._declared_length(scope)
        if declared is not None and declared > limit:
            raise BodyRefused(413, "body_too_large", f"request body exceeds {limit} bytes")
        body = bytearray()
        try:
            async with asyncio.timeout(self.body_timeout_seconds):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise ClientGone
                    body += message.get("body", b"")
                    if len(body) > limit:
                        raise BodyRefused(413, "body_too_large", f"request body exceeds {limit} bytes")
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            detail = f"the request body did not arrive within {self.body_timeout_seconds:g} s"
            raise BodyRefused(408, "request_timeout", detail) from None
        replay = [{"type": "http.request", "body": bytes(body), "more_body": False}]

        async def replayed_receive() -> dict:
            return replay.pop() if replay else await receive()

        return replayed_receive

    def _observe(self, scope: dict, status: int, start: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", "unmatched")
        self.metrics.requests.labels(route=path, method=scope["method"], status=str(status)).observe(
            time.perf_counter() - start
        )


async def send_error(send: Any, status: int, code: str, detail: str, close: bool = False) -> None:
    """An error answer in the API's one error shape, sent from outside the app."""
    payload = json.dumps({"error": code, "detail": detail, "fields": []}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
