"""Libra's components running in the test's own process, against the test's real servers."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from libra.ops.components import Resources, Supervisor
from libra.ops.embedded import free_port
from libra.ops.fakes.llm_wire import FakeLlmWire
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


def answering_with(settings: Settings, wire: FakeLlmWire, **extra: str) -> Settings:
    """The test's servers, with the OpenAI-compatible fake as the provider, the HTTP API on a
    free port and no response cache (each turn reaches the provider)."""
    return Settings.from_env(
        {
            "NATS_URL": settings.nats_url,
            "DATABASE_URL": settings.database_url,
            "REDIS_URL": settings.redis_url,
            "OPENAI_API_KEY": "sk-test-key",
            "OPENAI_BASE_URL": wire.env()["OPENAI_BASE_URL"],
            "HTTP_PORT": str(free_port()),
            "LLM_CACHE_ENABLED": "0",
            **extra,
        }
    )


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
