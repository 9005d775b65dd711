"""The HTTP API as a component: uvicorn serving the app inside Libra's event loop."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

__all__ = ["HttpGateway"]


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handlers: Libra's process decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpGateway:
    """Serves the API on ``host:port`` until stopped; in-flight responses finish first."""

    def __init__(self, app: FastAPI, *, host: str, port: int) -> None:
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=20,
        )
        self.server = _EmbeddedServer(config)
        self.host, self.port = host, port

    async def run(self) -> None:
        await self.server.serve()

    async def stop(self) -> None:
        self.server.should_exit = True
