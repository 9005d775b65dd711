"""Failing fast while a server that a person waits on (Redis, PostgreSQL) is down.

A call that meets an outage (refused or reset connection, timeout) opens the dependency's
circuit breaker: for the next ``retry_s`` every call fails at once with :class:`Unavailable`,
and the caller takes its outage policy (admit under a local limit, answer without context,
refuse with 503). Then one call is let through again (half-open) and its outcome closes or
reopens the breaker, so service is back within ``retry_s`` of the server's return without a
restart. Errors that are not outages (a bad query, a script error) pass through uncounted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import redis.exceptions
from prometheus_client import Gauge
from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.model import OpenedState

__all__ = ["DEPENDENCY_DOWN", "Breaker", "Unavailable", "is_outage"]

log = logging.getLogger("libra.outage")
T = TypeVar("T")

DEPENDENCY_DOWN = Gauge(
    "libra_dependency_down", "1 while a dependency's circuit breaker is open", ["dependency"]
)

_OUTAGES = (
    OSError,  # refused, reset, unreachable; TimeoutError is one too
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # shutting down, starting up
    asyncpg.InterfaceError,  # a pooled connection the server closed
)


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the server is unreachable (rather than the request is wrong)."""
    return isinstance(exc, _OUTAGES)


class Unavailable(Exception):
    """The dependency is down, or was a moment ago (its breaker is open)."""

    def __init__(self, dependency: str, reason: str) -> None:
        super().__init__(f"{dependency} is unavailable: {reason}")
        self.dependency = dependency


class Breaker:
    """One dependency's circuit breaker, with a bound on each call (``timeout_s``, 0: none)."""

    def __init__(self, dependency: str, *, retry_s: float = 2.0, timeout_s: float = 0.0) -> None:
        self.dependency, self.timeout_s = dependency, timeout_s
        self._factory = AsyncCircuitBreakerFactory(
            default_threshold=1,
            default_ttl=retry_s,
            exclude=[(BaseException, lambda exc: not is_outage(exc))],
        )
        self._factory.add_listener(self._changed)
        self._down = False
        DEPENDENCY_DOWN.labels(dependency).set(0)

    async def call(self, do: Callable[[], Awaitable[T]]) -> T:
        """Returns ``await do()``; raises :class:`Unavailable` for an outage, fast while open."""
        breaker = await self._factory.get_breaker(self.dependency)
        try:
            async with breaker:
                async with asyncio.timeout(self.timeout_s or None):
                    return await do()
        except OpenedState:
            raise Unavailable(self.dependency, "it failed a moment ago") from None
        except Exception as exc:
            if is_outage(exc):
                raise Unavailable(self.dependency, f"{type(exc).__name__}: {exc}") from exc
            raise

    def _changed(self, name: str, what: str, event: Any) -> None:
        if what != "state_changed" or event.state == "half-opened":
            return
        down = event.state == "opened"
        if down != self._down:
            self._down = down
            log.warning("%s is %s", name, "unavailable" if down else "back")
            DEPENDENCY_DOWN.labels(name).set(int(down))
