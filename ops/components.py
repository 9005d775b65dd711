"""Every component Libra runs, by name: what `libra up` starts and `libra run NAME` runs alone."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import asyncpg

from libra.projections.history import HistoryProjection
from libra.projections.sessions import SessionsProjection
from libra.runtime.config import Settings
from libra.runtime.database import connect_pool
from libra.runtime.eventlog import EventLog
from libra.runtime.logs import log_context
from libra.runtime.projection import Projection, ProjectionRunner

__all__ = ["COMPONENTS", "PROJECTIONS", "Component", "Resources", "Supervisor"]

log = logging.getLogger("libra.supervisor")


class Component(Protocol):
    """Something that runs until stopped: a consumer, a projection, a gateway."""

    async def run(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class Resources:
    """Connections that the components of one process share, opened on first use."""

    settings: Settings
    log: EventLog
    database_url: str
    redis_url: str
    _pool: asyncpg.Pool | None = field(default=None, repr=False)

    async def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            self._pool = await connect_pool(self.database_url)
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()


PROJECTIONS: dict[str, Callable[[], Projection]] = {
    "history": HistoryProjection,
    "sessions": SessionsProjection,
}


def _projection(name: str) -> Callable[[Resources], Awaitable[Component]]:
    async def build(r: Resources) -> Component:
        return ProjectionRunner(r.log, await r.pool(), PROJECTIONS[name]())

    return build


COMPONENTS: dict[str, Callable[[Resources], Awaitable[Component]]] = {
    **{name: _projection(name) for name in PROJECTIONS},
}


class Supervisor:
    """Runs components side by side, restarts one that crashes, and stops them all in order."""

    def __init__(self, resources: Resources, names: list[str]) -> None:
        unknown = [n for n in names if n not in COMPONENTS]
        if unknown:
            raise ValueError(
                f"unknown component(s): {', '.join(unknown)}; known: {', '.join(COMPONENTS)}"
            )
        self.resources = resources
        self.names = names
        self._running: dict[str, Component] = {}
        self._tasks: list[asyncio.Task] = []
        self._stopping = False

    async def start(self) -> None:
        for name in self.names:
            self._tasks.append(
                asyncio.create_task(self._keep_running(name), name=f"component-{name}")
            )

    async def _keep_running(self, name: str) -> None:
        delay = 1.0
        with log_context(name=name):
            while not self._stopping:
                try:
                    component = await COMPONENTS[name](self.resources)
                    if self._stopping:
                        return
                    self._running[name] = component
                    log.info("component %s running", name)
                    await component.run()
                    if self._stopping:
                        return
                    log.warning("component %s returned; restarting", name)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("component %s crashed; restarting in %.0fs", name, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def stop(self, timeout: float = 25.0) -> None:
        """Asks every component to finish its in-flight work, then waits for them."""
        self._stopping = True
        for component in self._running.values():
            with contextlib.suppress(Exception):
                await component.stop()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
