"""Request metrics under the seed's names, and a cap on request body size, as ASGI middleware."""

from __future__ import annotations

import time
from collections.abc import Mapping

from prometheus_client import Counter, Histogram
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .guards import send_error

__all__ = ["BodyLimit", "RequestMetrics"]

HTTP_REQUESTS = Counter("http_requests_total", "HTTP requests", ["method", "route", "status"])
HTTP_DURATION = Histogram(
    "http_request_duration_seconds",
    "HTTP request latency (to the end of the response)",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
)


class RequestMetrics:
    """Counts requests and times them, labelled by route template (not by raw path) and by
    method, any method HTTP does not define counted as ``other`` (a client names its own)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0
        method = scope["method"] if scope["method"] in _METHODS else "other"

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except BaseException:
            status = status or 500
            raise
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            # 499: the client went away before an answer (nginx's code for it)
            HTTP_REQUESTS.labels(method, route, str(status or 499)).inc()
            HTTP_DURATION.labels(method, route).observe(time.perf_counter() - started)


class BodyLimit:
    """Answers 413 to a body over ``limit`` bytes, declared or streamed, before it is read.

    ``routes`` gives some paths a larger limit (audio uploads are larger than messages).
    """

    def __init__(
        self, app: ASGIApp, *, limit: int, routes: Mapping[str, int] | None = None
    ) -> None:
        self.app, self.limit, self.routes = app, limit, dict(routes or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = max(self.limit, self.routes.get(scope["path"], 0))
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _too_large(send, limit)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _BodyTooLarge(limit)
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _BodyTooLarge:
            await _too_large(send, limit)


class _BodyTooLarge(HTTPException):
    """Raised by ``receive``: an HTTP error, so that the app's body parsing lets it through."""

    def __init__(self, limit: int) -> None:
        message = f"the request body is over {limit} bytes"
        super().__init__(413, {"error": "too_large", "message": message})


async def _too_large(send: Send, limit: int) -> None:
    await send_error(send, 413, "too_large", f"the request body is over {limit} bytes")
