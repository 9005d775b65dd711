"""The HTTP server every vendor fake stands on: aiohttp on 127.0.0.1, in the caller's loop."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Self

from aiohttp import web

__all__ = ["LoopbackServer"]


class LoopbackServer:
    """Serves the routes a subclass adds until closed; ``port`` 0 picks a free one."""

    backlog = 128

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._closing = asyncio.Event()  # hanging answers wait on it, so close() frees them
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """The root URL, e.g. ``http://127.0.0.1:41234``."""
        return f"http://{self.host}:{self.port}"

    def add_routes(self, app: web.Application) -> None:
        """Adds the fake's routes to ``app``."""
        raise NotImplementedError

    async def start(self) -> Self:
        """Starts listening."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        self.add_routes(app)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.host, self.port, backlog=self.backlog, reuse_address=True
        )
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        """Releases hanging requests and stops the server."""
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
