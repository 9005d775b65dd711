"""ASGI middleware that keeps the API whole under hostile or careless clients.

- :class:`HostCheck`: an open API (no secrets, on loopback) answers only requests whose
  ``Host`` is a loopback name, so that a web page whose DNS name rebinds to 127.0.0.1 cannot
  drive it from a browser.
- :class:`ConcurrencyCap`: past ``HTTP_MAX_CONCURRENT`` requests in flight, 503 at once.
- :class:`CancelOnDisconnect`: a client that goes away before its answer cancels the work
  done for it (the turn itself goes on in the log; only following it stops).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable

from prometheus_client import Gauge
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import is_loopback

__all__ = ["CancelOnDisconnect", "ConcurrencyCap", "HostCheck", "send_error"]

HTTP_IN_FLIGHT = Gauge("http_requests_in_flight", "HTTP requests being answered")
BUSY_RETRY_S = 5
_ALWAYS = ("/api/health", "/metrics")  # what an operator reads to see why it is busy


async def send_error(
    send: Send, status: int, error: str, message: str, headers: Iterable[tuple[str, str]] = ()
) -> None:
    """Sends the JSON error ``{"error", "message"}`` as the whole response."""
    body = json.dumps({"error": error, "message": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    raw += [(name.lower().encode(), value.encode()) for name, value in headers]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _hostname(host: str) -> str:
    """The name in a ``Host`` header: no port, brackets or trailing dot, lower case."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


class HostCheck:
    """Answers 421 ``wrong_host`` unless ``Host`` names loopback or ``host``."""

    def __init__(self, app: ASGIApp, *, host: str) -> None:
        self.app, self.host = app, _hostname(host)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":  # closed before it is accepted: a 403 to the client
            await send({"type": "websocket.close", "code": 1008, "reason": "wrong_host"})
            return
        await send_error(
            send,
            421,
            "wrong_host",
            "this API answers only requests addressed to localhost (it has no credentials set)",
        )

    def _allowed(self, scope: Scope) -> bool:
        hosts = [v for k, v in scope.get("headers") or [] if k == b"host"]
        if len(hosts) != 1:
            return False
        name = _hostname(hosts[0].decode("latin-1"))
        return name == self.host or is_loopback(name)


class ConcurrencyCap:
    """Answers 503 ``busy`` with ``Retry-After`` while ``limit`` requests are in flight."""

    def __init__(self, app: ASGIApp, *, limit: int) -> None:
        self.app, self.limit = app, limit
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _ALWAYS:
            await self.app(scope, receive, send)
            return
        if self.limit and self.in_flight >= self.limit:
            message = f"Libra is answering {self.limit} requests already; try again shortly"
            await send_error(send, 503, "busy", message, [("Retry-After", str(BUSY_RETRY_S))])
            return
        self.in_flight += 1
        HTTP_IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            HTTP_IN_FLIGHT.dec()


class CancelOnDisconnect:
    """Cancels a request's handling when its client disconnects before the whole answer.

    Once the request's body has been read, ``receive`` has nothing more to give but the
    disconnect, so a watcher waits on it beside the app.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_read = asyncio.Event()
        answered = False

        async def noting_receive() -> Message:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_read.set()
            return message

        async def noting_send(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True
            await send(message)

        async def disconnected() -> None:
            await body_read.wait()
            while (await receive())["type"] != "http.disconnect":
                pass

        work = asyncio.ensure_future(self.app(scope, noting_receive, noting_send))
        gone = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
            if not work.done() and not answered:  # the client left: stop working for it
                work.cancel()
            await asyncio.wait((work,))
        finally:
            gone.cancel()
            work.cancel()  # (a no-op once done; the server cancelling this request gets here)
        if not work.cancelled():
            work.result()  # the app's own error, for the server to log and answer
