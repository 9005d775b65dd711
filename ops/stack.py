"""The servers Libra talks to: those the environment names, or embedded ones it starts.

``libra up`` starts an embedded server for each of NATS, PostgreSQL and Redis whose URL is not
set, all under one data directory, and writes ``stack.json`` there so that other commands
(``libra env``, ``tail``, ``chat``...) find the running stack without flags. While it runs, an
embedded server that exits is started again (:meth:`Stack.supervise`).

The embedded servers ask for passwords (see ``embedded``) but have no TLS (the PyPI builds of
PostgreSQL and Redis have none), so they listen on loopback only: a ``LIBRA_HOST`` beyond it is
refused while ``libra up`` would start one there (:func:`check_exposure`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import os
import signal
import time
from pathlib import Path
from typing import IO

import msgspec

from libra.runtime.config import Settings

from .embedded import EmbeddedNats, EmbeddedPostgres, EmbeddedRedis, ServerStartError

__all__ = [
    "DataDirBusyError",
    "ExposedError",
    "Stack",
    "StackUrls",
    "check_exposure",
    "resolve_urls",
]

STATE_FILE = "stack.json"
WATCH_EVERY_S = 0.5
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0)

log = logging.getLogger("libra.stack")

Server = EmbeddedNats | EmbeddedPostgres | EmbeddedRedis


class DataDirBusyError(RuntimeError):
    """Another ``libra up`` is running on the same data directory."""


class ExposedError(RuntimeError):
    """``libra up`` would start a server beyond loopback without TLS."""


class StackUrls(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str
    # The components' login (on the embedded server, `libra_app`: rows, no schema).
    database_url: str
    redis_url: str
    # The database's owner (migrations, rebuilds, what people are shown) and a read-only login
    # (the HTTP edge's history); DATABASE_URL when the environment names the database.
    database_owner_url: str = ""
    database_reader_url: str = ""
    nats_monitor_url: str = ""
    # What people are shown of the embedded NATS: the anonymous observer, or its login.
    nats_public_url: str = ""
    pid: int = 0

    @property
    def owner_url(self) -> str:
        return self.database_owner_url or self.database_url

    @property
    def reader_url(self) -> str:
        return self.database_reader_url or self.database_url

    def as_env(self) -> dict[str, str]:
        """What ``libra env`` prints: the logins a person connects with."""
        return {
            "NATS_URL": self.nats_public_url or self.nats_url,
            "DATABASE_URL": self.owner_url,
            "REDIS_URL": self.redis_url,
        }


def _running_state(data_dir: Path) -> StackUrls | None:
    path = data_dir / STATE_FILE
    try:
        state = msgspec.json.decode(path.read_bytes(), type=StackUrls)
        os.kill(state.pid, 0)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None
    return state


def resolve_urls(settings: Settings) -> StackUrls:
    """Returns where the servers are: the environment first, then a running ``libra up``."""
    running = _running_state(settings.data_dir)
    # A URL that `libra env` printed means the running stack: log in as it does.
    shown = running.as_env() if running else {}
    given = {
        name: getattr(settings, name.lower()) for name in ("NATS_URL", "DATABASE_URL", "REDIS_URL")
    }
    nats_url, database_url, redis_url = (
        "" if url == shown.get(name) else url for name, url in given.items()
    )
    if running is None:
        host = settings.libra_host
        running = StackUrls(
            nats_url=f"nats://{host}:{settings.libra_nats_port}",
            database_url=f"postgresql://{host}:{settings.libra_postgres_port}/libra",
            redis_url=f"redis://{host}:{settings.libra_redis_port}/0",
        )
    return StackUrls(
        nats_url=nats_url or running.nats_url,
        database_url=database_url or running.database_url,
        database_owner_url=database_url or running.database_owner_url,
        database_reader_url=database_url or running.database_reader_url,
        redis_url=redis_url or running.redis_url,
        nats_monitor_url=running.nats_monitor_url,
        nats_public_url="" if nats_url else running.nats_public_url,
        pid=running.pid,
    )


def check_exposure(settings: Settings) -> None:
    """Raises :class:`ExposedError`, naming what to set, if ``libra up`` would start a server
    on a ``LIBRA_HOST`` beyond loopback: there a server needs TLS as well as a login."""
    from libra.gateway.http.auth import is_loopback  # the HTTP API's rule; not for `libra env`

    host = settings.libra_host
    if is_loopback(host):
        return
    embedded = [
        (name, title)
        for name, title in (
            ("NATS_URL", "NATS"),
            ("DATABASE_URL", "PostgreSQL"),
            ("REDIS_URL", "Redis"),
        )
        if not getattr(settings, name.lower())
    ]
    if embedded:
        raise ExposedError(
            f"LIBRA_HOST={host} is beyond loopback, where a server needs TLS and a login; the"
            f" embedded {', '.join(t for _, t in embedded)} would listen there without TLS."
            f" Set {', '.join(n for n, _ in embedded)} to servers of your own with TLS and"
            " passwords, or leave LIBRA_HOST at 127.0.0.1."
        )


class Stack:
    """Starts, watches and stops the embedded servers that the settings do not point elsewhere."""

    def __init__(self, settings: Settings, data_dir: Path | None = None) -> None:
        self.settings = settings
        self.data_dir = Path(data_dir or settings.data_dir).expanduser().resolve()
        host = settings.libra_host
        self.nats = (
            None
            if settings.nats_url
            else EmbeddedNats(
                self.data_dir,
                host=host,
                port=settings.libra_nats_port,
                observer=settings.libra_nats_observer,
            )
        )
        self.postgres = (
            None
            if settings.database_url
            else EmbeddedPostgres(self.data_dir, host=host, port=settings.libra_postgres_port)
        )
        self.redis = (
            None
            if settings.redis_url
            else EmbeddedRedis(self.data_dir, host=host, port=settings.libra_redis_port)
        )
        self._lock: IO[str] | None = None
        self._watchers: list[asyncio.Task[None]] = []

    @property
    def embedded(self) -> list[Server]:
        return [s for s in (self.nats, self.postgres, self.redis) if s is not None]

    @property
    def urls(self) -> StackUrls:
        pg = self.postgres
        return StackUrls(
            nats_url=self.nats.url if self.nats else self.settings.nats_url,
            database_url=pg.url_for("libra_app") if pg else self.settings.database_url,
            database_owner_url=pg.url if pg else "",
            database_reader_url=pg.url_for("libra_reader") if pg else "",
            redis_url=self.redis.url if self.redis else self.settings.redis_url,
            nats_monitor_url=self.nats.monitor_url if self.nats else "",
            nats_public_url=self.nats.shown_url if self.nats else "",
            pid=os.getpid(),
        )

    def secrets(self) -> list[str]:
        """The embedded servers' passwords, to keep out of logs and events."""
        found: list[str] = []
        if self.nats:
            found += self.nats.passwords.values()
        if self.postgres:
            found += self.postgres.passwords.values()
        if self.redis:
            found.append(self.redis.password)
        return found

    async def start(self) -> StackUrls:
        """Starts the embedded servers at once; if one fails, stops the others and raises."""
        check_exposure(self.settings)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        # Left by a Libra that was killed: its URLs are no longer served until we start.
        (self.data_dir / STATE_FILE).unlink(missing_ok=True)
        results = await asyncio.gather(*(s.start() for s in self.embedded), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.stop()
            raise errors[0]
        urls = self.urls
        # It holds the embedded server's admin login: readable by this user only.
        fd = os.open(self.data_dir / STATE_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as state:
            state.write(msgspec.json.encode(urls))
        return urls

    def supervise(self, until: asyncio.Event) -> None:
        """Starts again each embedded server that exits, until ``until`` is set or :meth:`stop`."""
        self._watchers = [
            asyncio.create_task(_keep_running(server, until), name=f"watch {server.title}")
            for server in self.embedded
        ]

    async def stop(self) -> None:
        # First, so that a server stopping now is not started again.
        for watcher in self._watchers:
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        self._watchers = []
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / STATE_FILE).unlink()
        await asyncio.gather(*(s.stop() for s in self.embedded), return_exceptions=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _take_lock(self) -> None:
        lock = open(self.data_dir / "libra.lock", "a+")  # noqa: SIM115 - held while the stack runs
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise DataDirBusyError(
                f"another `libra up` is running on {self.data_dir}; stop it or use --data-dir"
            ) from None
        self._lock = lock


def _exit_text(status: int) -> str:
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-status).name}"
        return f"was killed by signal {-status}"
    return f"exited with status {status}"


async def _keep_running(server: Server, until: asyncio.Event) -> None:
    """Watches ``server`` and starts it again whenever it exits, until ``until`` is set."""
    while not until.is_set():
        status = server.exit_status()
        if status is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(until.wait(), WATCH_EVERY_S)
        elif not until.is_set():
            await _restart(server, status, until)


async def _restart(server: Server, status: int, until: asyncio.Event) -> None:
    """Starts ``server`` again, backing off while it fails; one log line says how it went."""
    what = f"embedded {server.title} {_exit_text(status)}"
    began = time.monotonic()
    for attempt in itertools.count(1):
        try:
            await server.start()
        except Exception as exc:  # whatever failed, a supervisor keeps trying
            delay = RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S)) - 1]
            detail = str(exc) if isinstance(exc, ServerStartError) else f"{exc!r}\n{server.tail()}"
            log.error(
                "%s and did not start again (try %d); next try in %.1f s: %s",
                what,
                attempt,
                delay,
                detail,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(until.wait(), delay)
            if until.is_set():
                return
        else:
            log.warning("%s; restarted in %.1f s", what, time.monotonic() - began)
            return
