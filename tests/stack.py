"""Libra's components running in the test's own process, against the test's real servers."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from libra.ops.components import Resources, Supervisor
from libra.runtime.config import Settings
from libra.runtime.eventlog import EventLog

TEXT_PIPELINE = [
    "history",
    "sessions",
    "turns-projection",
    "turns",
    "ratelimit-view",
    "llm",
    "memory",
]


@contextlib.asynccontextmanager
async def running(settings: Settings, names: list[str]) -> AsyncIterator[Resources]:
    """Provisions the log and runs the named components until the block ends."""
    log = await EventLog.connect(settings.nats_url, name="test-stack")
    await log.provision(settings)
    resources = Resources(settings, log, settings.database_url, settings.redis_url)
    supervisor = Supervisor(resources, names)
    await supervisor.start()
    await supervisor.wait_built()
    try:
        yield resources
    finally:
        await supervisor.stop()
        await resources.close()
        await log.close()
