"""The embedded stack is locked: every server asks for a login made for its data directory,
each database role may do only its part, nothing listens beyond loopback without TLS, and the
anonymous NATS observer goes with one setting."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import nats
import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError

from libra.ops.embedded import (
    EmbeddedNats,
    EmbeddedPostgres,
    EmbeddedRedis,
    _grant_to,
    _pgserver,
    free_port,
)
from libra.ops.stack import ExposedError, Stack, check_exposure
from libra.runtime.config import Settings
from libra.runtime.database import migrate

from .helpers import eventually, postgres_folder
from .test_up import _env

VIOLATION = "permissions violation"


@pytest.fixture
async def libra_db(postgres_server: EmbeddedPostgres) -> EmbeddedPostgres:
    """The session's server with Libra's own database migrated, as `libra up` leaves it."""
    await migrate(postgres_server.url)
    return postgres_server


def _login_without_password(server: EmbeddedPostgres, role: str) -> str:
    return f"postgresql://{role}@{server.host}:{server.port}/{server.database}"


@pytest.mark.parametrize("role", ["postgres", "libra_owner", "libra_app", "libra_reader"])
async def test_postgres_refuses_a_login_without_its_password(
    libra_db: EmbeddedPostgres, role: str
) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(_login_without_password(libra_db, role))
    wrong = libra_db.url_for(role).replace(libra_db.passwords[role], "p" + "0" * 40)
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(wrong)
    conn = await asyncpg.connect(libra_db.url_for(role))
    assert await conn.fetchval("SELECT current_user") == role
    await conn.close()


async def test_redis_refuses_a_client_without_the_password(
    redis_server: EmbeddedRedis, redis_url: str
) -> None:
    bare = aioredis.from_url(f"redis://{redis_server.host}:{redis_server.port}/0")
    try:
        with pytest.raises(AuthenticationError):
            await bare.set("k", "v")
    finally:
        await bare.aclose()
    client = aioredis.from_url(redis_url)
    assert await client.set("k", "v")
    await client.aclose()


@pytest.mark.parametrize(
    "statement",
    [
        "COPY (SELECT 1) TO PROGRAM 'id'",
        "CREATE ROLE intruder LOGIN SUPERUSER",
        "ALTER ROLE libra_app SUPERUSER",
        "CREATE TABLE stash (x int)",
        "DROP TABLE messages",
        "TRUNCATE messages",
        "ALTER SYSTEM SET listen_addresses = '*'",
        "SELECT pg_read_file('/etc/passwd')",
    ],
)
@pytest.mark.parametrize("role", ["libra_app", "libra_reader"])
async def test_the_components_roles_cannot_run_programs_make_roles_or_change_the_schema(
    libra_db: EmbeddedPostgres, role: str, statement: str
) -> None:
    conn = await asyncpg.connect(libra_db.url_for(role))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(statement)
    finally:
        await conn.close()


async def test_the_owner_migrates_but_is_no_superuser(libra_db: EmbeddedPostgres) -> None:
    conn = await asyncpg.connect(libra_db.url)
    try:
        assert not await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("COPY (SELECT 1) TO PROGRAM 'id'")
        await conn.execute("CREATE TABLE owner_scratch (x int); DROP TABLE owner_scratch")
    finally:
        await conn.close()


async def test_the_app_writes_rows_and_the_reader_only_reads(libra_db: EmbeddedPostgres) -> None:
    app = await asyncpg.connect(libra_db.url_for("libra_app"))
    reader = await asyncpg.connect(libra_db.url_for("libra_reader"))
    upsert = (
        "INSERT INTO conversations (id, platform, started_at, last_at)"
        " VALUES ($1, 'http', now(), now()) ON CONFLICT (id) DO UPDATE SET last_at = now()"
    )
    try:
        await app.execute(upsert, "http-locked")
        assert await reader.fetchval(
            "SELECT count(*) FROM conversations WHERE id = $1", "http-locked"
        )
        for statement, args in [
            (upsert, ("http-reader",)),
            ("UPDATE conversations SET last_at = now()", ()),
            ("DELETE FROM conversations", ()),
        ]:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await reader.execute(statement, *args)
        await app.execute("DELETE FROM conversations WHERE id = $1", "http-locked")
    finally:
        await app.close()
        await reader.close()


@pytest.fixture
def folder() -> Iterator[Path]:
    path = postgres_folder()
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_a_data_directory_that_trusted_every_login_is_locked_when_it_starts(
    folder: Path,
) -> None:
    """What an earlier Libra left: initdb --auth=trust, tables made by the superuser."""
    server = EmbeddedPostgres(folder, port=free_port())
    await _earlier_libra(server)
    try:
        await server.start()
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(_login_without_password(server, "postgres"))
        owner = await asyncpg.connect(server.url)
        assert await migrate(server.url) == []  # the earlier schema, now the owner's
        owners = await owner.fetch(
            "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'"
        )
        assert [r["tableowner"] for r in owners] == ["libra_owner"]
        await owner.close()
        app = await asyncpg.connect(server.url_for("libra_app"))
        assert await app.fetchval("SELECT platform FROM conversations") == "discord"
        await app.close()
    finally:
        await server.stop()
    assert "trust" not in _hba_methods(server)


def _hba_methods(server: EmbeddedPostgres) -> set[str]:
    lines = (server.dir / "pg_hba.conf").read_text().splitlines()
    return {line.split()[-1] for line in lines if line.strip() and not line.startswith("#")}


async def _earlier_libra(server: EmbeddedPostgres) -> None:
    """Makes ``server``'s data directory as Libra did before it asked for passwords."""
    server.dir.mkdir(parents=True)
    if server.user:  # as root, PostgreSQL runs as a user of its own
        _grant_to(server.user, server.dir, server.log)
    _pgserver().initdb(
        ["--auth=trust", "--encoding=utf8", "--locale=C", "-U", "postgres"],
        pgdata=server.dir,
        user=server.user,
    )
    assert "trust" in _hba_methods(server)
    server.proc = server._spawn()
    try:
        url = _login_without_password(server, "postgres")
        conn = await _first_connection(url.replace("/libra", "/postgres"))
        await conn.execute('CREATE DATABASE "libra"')
        await conn.close()
        await migrate(url)
        conn = await asyncpg.connect(url)
        await conn.execute(
            "INSERT INTO conversations VALUES ('discord-1-2', 'discord', now(), now())"
        )
        await conn.close()
    finally:
        await server.stop()


async def _first_connection(url: str) -> asyncpg.Connection:
    found: list[asyncpg.Connection] = []

    async def connected() -> bool:
        try:
            found.append(await asyncpg.connect(url))
        except (OSError, asyncpg.CannotConnectNowError):
            return False
        return True

    await eventually(connected, timeout=30)
    return found[0]


def _listening(port: int) -> set[str]:
    """The addresses that listen on TCP ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(str(ipaddress.ip_address(words)))
    return found


async def test_the_nats_monitor_listens_on_loopback_only(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path, host="0.0.0.0", port=free_port())
    await server.start()
    try:
        assert _listening(server.port) & {"0.0.0.0", "::"}  # every address: LIBRA_HOST
        assert _listening(server.monitor_port) == {"127.0.0.1"}
        assert server.monitor_url == f"http://127.0.0.1:{server.monitor_port}"
    finally:
        await server.stop()


def test_up_refuses_a_host_beyond_loopback_and_names_what_is_missing(tmp_path: Path) -> None:
    env = _env(tmp_path / "data") | {"LIBRA_HOST": "0.0.0.0"}
    result = subprocess.run(
        [sys.executable, "-m", "libra.ops", "up"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "LIBRA_HOST=0.0.0.0 is beyond loopback" in result.stderr
    assert "Set NATS_URL, DATABASE_URL, REDIS_URL to servers of your own" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()  # nothing was started


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ({}, "NATS_URL, DATABASE_URL, REDIS_URL"),
        ({"NATS_URL": "tls://n:4222", "DATABASE_URL": "postgresql://d/libra"}, "REDIS_URL"),
        ({"REDIS_URL": "rediss://r:6379/0"}, "NATS_URL, DATABASE_URL"),
    ],
)
def test_exposure_names_each_embedded_server_that_would_listen_beyond_loopback(
    given: dict[str, str], named: str
) -> None:
    with pytest.raises(ExposedError, match=f"Set {named} to servers"):
        check_exposure(Settings.from_env({"LIBRA_HOST": "192.0.2.7", **given}))
    check_exposure(Settings.from_env({"LIBRA_HOST": "localhost", **given}))
    external = {"NATS_URL": "tls://n", "DATABASE_URL": "postgresql://d", "REDIS_URL": "rediss://r"}
    check_exposure(Settings.from_env({"LIBRA_HOST": "0.0.0.0", **external}))


@pytest.mark.parametrize("observer", [True, False])
async def test_the_anonymous_observer_goes_with_one_setting(tmp_path: Path, observer: bool) -> None:
    settings = Settings.from_env(
        {
            "LIBRA_DATA_DIR": str(tmp_path),
            "LIBRA_NATS_PORT": str(free_port()),
            "LIBRA_NATS_OBSERVER": "1" if observer else "0",
        }
    )
    stack = Stack(settings)
    server = stack.nats
    shown = stack.urls.as_env()["NATS_URL"]  # what `libra env` prints
    assert shown == (server.public_url if observer else server.url_for("observer"))
    await server.start()
    refused: list[str] = []

    async def on_error(exc: Exception) -> None:
        refused.append(str(exc).lower())

    anonymous = await nats.connect(server.public_url, error_cb=on_error, max_reconnect_attempts=0)
    watcher = await nats.connect(shown)
    admin = await nats.connect(server.url)
    try:
        anonymous_sub = await anonymous.subscribe("libra.>")
        watched = await watcher.subscribe("libra.>")
        await anonymous.flush()
        await watcher.flush()
        await admin.publish("libra.text.received.http-x", b"{}")
        assert (await watched.next_msg(timeout=5)).subject == "libra.text.received.http-x"
        if observer:
            assert (await anonymous_sub.next_msg(timeout=5)).data == b"{}"
        else:
            await eventually(lambda: _said(refused, VIOLATION))
            assert anonymous_sub.pending_msgs == 0
    finally:
        for nc in (anonymous, watcher, admin):
            await nc.close()
        await server.stop()


async def _said(lines: list[str], text: str) -> bool:
    return any(text in line for line in lines)


async def test_the_redis_config_holding_its_password_is_private(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path, port=free_port())
    await server.start()
    try:
        for path in (server.dir / "redis.conf", server.dir / "passwords.json"):
            assert path.stat().st_mode & 0o077 == 0, path
    finally:
        await server.stop()
