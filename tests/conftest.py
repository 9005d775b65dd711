"""Real servers for the tests: NATS with JetStream, PostgreSQL with pgvector, Redis.

They come from the same PyPI packages and launch code as `libra up`. PostgreSQL and Redis start
once per session; each test gets a fresh database cloned from a migrated template and an empty
Redis. NATS starts fresh for each test (it takes a few milliseconds), so streams never leak
between tests.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from libra.ops.embedded import EmbeddedNats, EmbeddedPostgres, EmbeddedRedis, free_port
from libra.runtime.config import Settings
from libra.runtime.database import migrate
from libra.runtime.eventlog import EventLog

from .discord_world import fake, gateways, world  # noqa: F401 - the Discord tests' fixtures
from .helpers import postgres_folder

TEMPLATE_DB = "libra_template"
_db_numbers = itertools.count()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[EmbeddedPostgres]:
    folder = postgres_folder()
    server = EmbeddedPostgres(folder, port=free_port())
    asyncio.run(server.start())

    async def template() -> None:
        conn = await asyncpg.connect(server.admin_url())
        await conn.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
        await conn.close()
        await migrate(server.admin_url(TEMPLATE_DB))

    asyncio.run(template())
    yield server
    asyncio.run(server.stop())
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), port=free_port())
    asyncio.run(server.start())
    yield server
    asyncio.run(server.stop())


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path, port=free_port())
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def database_url(postgres_server: EmbeddedPostgres) -> AsyncIterator[str]:
    name = f"t_{os.getpid()}_{next(_db_numbers)}"
    conn = await asyncpg.connect(postgres_server.admin_url())
    await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DB}"')
    await conn.close()
    yield postgres_server.admin_url(name)
    conn = await asyncpg.connect(postgres_server.admin_url())
    await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    await conn.close()


@pytest.fixture
async def redis_url(redis_server: EmbeddedRedis) -> AsyncIterator[str]:
    client = aioredis.from_url(redis_server.url)
    await client.flushall()
    await client.aclose()
    yield redis_server.url


@pytest.fixture
def settings(nats_server: EmbeddedNats, database_url: str, redis_url: str) -> Settings:
    return Settings.from_env(
        {"NATS_URL": nats_server.url, "DATABASE_URL": database_url, "REDIS_URL": redis_url}
    )


@pytest.fixture
async def eventlog(settings: Settings) -> AsyncIterator[EventLog]:
    log = await EventLog.connect(settings.nats_url, name="test")
    await log.provision(settings)
    yield log
    await log.close()


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    from libra.runtime.database import connect_pool

    pool = await connect_pool(database_url)
    yield pool
    await pool.close()
