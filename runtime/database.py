"""PostgreSQL: the connection pool and the versioned schema migrations.

Migrations are the numbered ``.sql`` files in ``libra.projections/migrations``, applied in order,
each in its own transaction, recorded in ``schema_migrations``; an advisory lock keeps two
processes from migrating at once. Running them again does nothing.
"""

from __future__ import annotations

import contextlib
import logging
import re
from importlib import resources

import asyncpg
from pgvector.asyncpg import register_vector

__all__ = ["MIGRATION_LOCK", "connect_pool", "migrate", "migrations"]

log = logging.getLogger("libra.database")

MIGRATION_LOCK = 7_411_001
# HNSW post-filters: with a filter by scope, a knowledge search looks wider than its k so that
# the scope's rows are found. A session setting (a placeholder until pgvector loads), so that a
# search, read against the clock of a reply, is one round trip and no transaction.
_SESSION_SETTINGS = {"hnsw.ef_search": "200"}
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


async def _init_connection(conn: asyncpg.Connection) -> None:
    with contextlib.suppress(ValueError):  # the extension comes with the first migration
        await register_vector(conn)


async def _keep_session(_conn: asyncpg.Connection) -> None:
    # asyncpg's default reset is a round trip per release (unlock all, close cursors, unlisten,
    # reset settings) on the clock of every reply. Pooled connections hold no session state:
    # locks are transaction-scoped, settings SET LOCAL, nothing listens; and asyncpg rolls back
    # an interrupted transaction before it calls this.
    return None


async def connect_pool(
    url: str, *, min_size: int = 1, max_size: int = 10, connect_timeout: float = 5.0
) -> asyncpg.Pool:
    """Returns a pool whose connections know pgvector's ``vector`` type.

    Work on a pooled connection must leave no session state behind (use transaction-scoped
    locks and ``SET LOCAL``): a connection goes back to the pool without a full reset.

    A connection the server closed (it restarted) is opened again when next acquired, each
    attempt bounded by ``connect_timeout`` (asyncpg's default is a minute), so that work on a
    database that is down fails and is retried rather than hangs.
    """
    return await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        reset=_keep_session,
        server_settings=_SESSION_SETTINGS,
        command_timeout=60,
        timeout=connect_timeout,
    )


def migrations() -> list[tuple[int, str, str]]:
    """Returns (version, name, sql) of every migration shipped with Libra, in order."""
    folder = resources.files("libra.projections") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text()))
    return sorted(found)


async def migrate(url: str) -> list[int]:
    """Applies the migrations that are not applied yet; returns their versions."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version int PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        try:
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            applied = []
            for version, name, sql in migrations():
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        version,
                        name,
                    )
                log.info("applied migration %04d_%s", version, name)
                applied.append(version)
            return applied
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    finally:
        await conn.close()
