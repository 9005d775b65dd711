"""The servers Libra talks to: those the environment names, or embedded ones it starts.

``libra up`` starts an embedded server for each of NATS, PostgreSQL and Redis whose URL is not
set, all under one data directory, and writes ``stack.json`` there so that other commands
(``libra env``, ``tail``, ``chat``...) find the running stack without flags.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from pathlib import Path
from typing import IO

import msgspec

from libra.runtime.config import Settings

from .embedded import EmbeddedNats, EmbeddedPostgres, EmbeddedRedis

__all__ = ["DataDirBusyError", "Stack", "StackUrls", "resolve_urls"]

STATE_FILE = "stack.json"


class DataDirBusyError(RuntimeError):
    """Another ``libra up`` is running on the same data directory."""


class StackUrls(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str
    database_url: str
    redis_url: str
    nats_monitor_url: str = ""
    # The embedded server without credentials (the read-only observer): what people are shown.
    nats_public_url: str = ""
    pid: int = 0

    def as_env(self) -> dict[str, str]:
        return {
            "NATS_URL": self.nats_public_url or self.nats_url,
            "DATABASE_URL": self.database_url,
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
    host = settings.libra_host
    # The URL `libra env` printed (no credentials) means the running stack: log in as it does.
    nats_url = settings.nats_url
    if running and nats_url == running.nats_public_url:
        nats_url = ""
    return StackUrls(
        nats_url=nats_url
        or (running.nats_url if running else f"nats://{host}:{settings.libra_nats_port}"),
        database_url=settings.database_url
        or (
            running.database_url
            if running
            else f"postgresql://postgres@{host}:{settings.libra_postgres_port}/libra"
        ),
        redis_url=settings.redis_url
        or (running.redis_url if running else f"redis://{host}:{settings.libra_redis_port}/0"),
        nats_monitor_url=running.nats_monitor_url if running else "",
        nats_public_url="" if nats_url or not running else running.nats_public_url,
        pid=running.pid if running else 0,
    )


class Stack:
    """Starts the embedded servers that the settings do not point elsewhere, and stops them."""

    def __init__(self, settings: Settings, data_dir: Path | None = None) -> None:
        self.settings = settings
        self.data_dir = Path(data_dir or settings.data_dir).expanduser().resolve()
        host = settings.libra_host
        self.nats = (
            None
            if settings.nats_url
            else EmbeddedNats(self.data_dir, host=host, port=settings.libra_nats_port)
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

    @property
    def embedded(self) -> list[EmbeddedNats | EmbeddedPostgres | EmbeddedRedis]:
        return [s for s in (self.nats, self.postgres, self.redis) if s is not None]

    @property
    def urls(self) -> StackUrls:
        return StackUrls(
            nats_url=self.nats.url if self.nats else self.settings.nats_url,
            database_url=self.postgres.url if self.postgres else self.settings.database_url,
            redis_url=self.redis.url if self.redis else self.settings.redis_url,
            nats_monitor_url=self.nats.monitor_url if self.nats else "",
            nats_public_url=self.nats.public_url if self.nats else "",
            pid=os.getpid(),
        )

    async def start(self) -> StackUrls:
        """Starts the embedded servers at once; if one fails, stops the others and raises."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
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

    async def stop(self) -> None:
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
