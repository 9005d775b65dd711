"""Small tools the tests share: waiting for a condition, reading a stream back."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from nats.js import JetStreamContext

from libra.contracts import AnyEvent, decode_event


def postgres_folder() -> Path:
    """A folder for a PostgreSQL data directory, outside pytest's own temporary tree.

    As root, PostgreSQL runs as another user that must traverse the folder's parents; pytest
    makes /tmp/pytest-of-<user> private again whenever a pytest session starts, which would
    pull the ground from under a server of a session that runs beside it.
    """
    return Path(tempfile.mkdtemp(prefix="libra-test-pg-"))


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout: float = 10.0, every: float = 0.05
) -> None:
    """Waits until ``check`` is true; fails the test with a clear message if it never is."""
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(every)


async def wait_http(base: str | int, *, timeout: float = 15.0) -> None:
    """Waits until the HTTP API at ``base`` (a URL, or a port on 127.0.0.1) answers at all."""
    url = f"http://127.0.0.1:{base}" if isinstance(base, int) else base.rstrip("/")

    async def up() -> bool:
        try:
            async with httpx.AsyncClient() as http:
                await http.get(f"{url}/api/health", timeout=1)
            return True
        except httpx.HTTPError:
            return False

    await eventually(up, timeout=timeout)


async def stream_events(js: JetStreamContext, stream: str, subject: str = ">") -> list[AnyEvent]:
    """Every event a stream holds on ``subject``, read with an ephemeral ordered consumer."""
    info = await js.stream_info(stream)
    if info.state.messages == 0:
        return []
    out: list[AnyEvent] = []
    sub = await js.subscribe(subject, stream=stream, ordered_consumer=True)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except TimeoutError:
                break
            out.append(decode_event(msg.data))
    finally:
        await sub.unsubscribe()
    return out


async def stream_count(js: JetStreamContext, stream: str, subject: str) -> int:
    info = await js.stream_info(stream, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())
