"""Text turns beside the local voice turns (`libra bench voice --local --with-text`).

People write on the HTTP API, one turn after another, while nobody speaks and then while the
voice turns are answered; their time to the first reply text is compared. Their replies come
from a loopback provider fake that answers at once (each text conversation's ``model`` setting
is ``local:bench``: the OpenAI-compatible path to the fake, through the same llm process that
runs the embedded model for the voice turns), so the time is Libra's, not a model's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import aiohttp
import asyncpg

from libra.contracts import Origin, SessionSettings, conversation_id, make, user_id
from libra.runtime.eventlog import EventLog

from .people import http_turn

__all__ = ["TEXT_REPLY", "TextTurns"]

TEXT_REPLY = "Sure. It keeps every message as a fact, so a conversation can be replayed."
_MODEL = "local:bench"
_PAUSE_S = 0.2  # between one person's reply and their next message


class TextTurns:
    """A few people writing on the HTTP API, their first-reply times in ms by phase."""

    def __init__(self, http_url: str, *, people: int = 2) -> None:
        self.url = f"{http_url}/api/chat/completions"
        self.users = [f"bench-text-{i}" for i in range(people)]
        self.times: dict[str, list[float]] = {"alone": [], "with_voice": []}

    async def route_to_fake(self, log: EventLog, database_url: str) -> None:
        """Sets each text conversation's model to the fake, and waits until the setting is in
        the database (where the llm processor reads it)."""
        scopes = []
        for user in self.users:
            conversation = conversation_id("http", user)
            scopes.append(f"channel:{conversation}")
            await log.publish(
                make(
                    SessionSettings,
                    conversation=conversation,
                    user=user_id("http", user),
                    origin=Origin(platform="http", channel=conversation),
                    scope=scopes[-1],
                    key="model",
                    value=_MODEL,
                )
            )
        db = await asyncpg.connect(database_url)
        try:
            deadline = time.monotonic() + 60
            query = "SELECT count(*) FROM settings WHERE scope = ANY($1::text[]) AND value = $2"
            while await db.fetchval(query, scopes, _MODEL) < len(scopes):
                if time.monotonic() > deadline:
                    raise RuntimeError("the sessions projection did not fold the model settings")
                await asyncio.sleep(0.1)
        finally:
            await db.close()

    async def alone(self, seconds: float) -> None:
        """Text turns for ``seconds`` with nothing else going on (after a warm-up turn each)."""
        async with self.running("warm-up"):
            await asyncio.sleep(0)
        async with self.running("alone"):
            await asyncio.sleep(seconds)

    @contextlib.asynccontextmanager
    async def running(self, phase: str) -> AsyncIterator[None]:
        """Text turns go on while the block runs (each person finishes the turn in flight)."""
        stop = asyncio.Event()
        async with aiohttp.ClientSession() as session:
            people = [
                asyncio.create_task(self._person(session, user, phase, stop)) for user in self.users
            ]
            try:
                yield
            finally:
                stop.set()
                await asyncio.gather(*people)

    async def _person(
        self, session: aiohttp.ClientSession, user: str, phase: str, stop: asyncio.Event
    ) -> None:
        while True:
            turn = await http_turn(session, self.url, user, "What is an event log good for?")
            if turn.outcome != "answered" or turn.shown_at is None:
                raise RuntimeError(f"a text turn was not answered ({turn.outcome})")
            self.times.setdefault(phase, []).append((turn.shown_at - turn.sent_at) * 1000)
            if stop.is_set():
                return
            await asyncio.sleep(_PAUSE_S)
