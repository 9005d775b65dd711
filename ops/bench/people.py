"""The people of `libra bench load`: each writes, waits for the reply, thinks, writes again.

A person on the HTTP API streams the reply (``POST /api/chat/completions`` with ``stream``); a
person on Discord writes in a channel of the loopback Discord, in chat mode, and reads the bot's
reply to their message. Each turn records what the person saw: an answer, a readable refusal
(a rejection or failure they can read), or nothing within ``WAIT_S`` (lost).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from ..fakes.discord import FakeDiscord, FakeUser, RestCall

__all__ = ["DiscordReplies", "Turn", "discord_turn", "http_turn", "person"]

WAIT_S = 120.0  # a person who has seen nothing after this long has lost the turn


@dataclass
class Turn:
    """One message a person sent, and what they saw."""

    sent_at: float
    shown_at: float | None = None  # the first thing the person saw: reply text or refusal
    outcome: str = "lost"  # answered | refused | rate_limited | lost

    def show(self) -> None:
        if self.shown_at is None:
            self.shown_at = time.perf_counter()

    def settle(self, outcome: str) -> None:
        self.show()
        self.outcome = outcome

    @property
    def wait_s(self) -> float | None:
        return None if self.shown_at is None else self.shown_at - self.sent_at


async def person(
    turn: Callable[[], Awaitable[Turn]],
    *,
    think: float,
    until: float,
    rng: random.Random,
    turns: list[Turn],
) -> None:
    """Takes turns until ``until`` (monotonic), thinking ``think`` s ±50 % between them."""
    await asyncio.sleep(rng.uniform(0, think))  # people do not all start in the same second
    while time.monotonic() < until:
        turns.append(await turn())
        await asyncio.sleep(rng.uniform(0.5 * think, 1.5 * think))


async def http_turn(session: aiohttp.ClientSession, url: str, user: str, text: str) -> Turn:
    """One message on the HTTP API, the reply streamed to its end."""
    turn = Turn(time.perf_counter())
    body = {"userId": user, "message": text, "stream": True}
    try:
        async with asyncio.timeout(WAIT_S), session.post(url, json=body) as response:
            if response.status != 200:
                _refused(turn, response.status, await response.json(content_type=None))
                return turn
            async for line in response.content:
                if line.startswith(b"data: ") and _streamed(turn, json.loads(line[6:])):
                    return turn
    except (TimeoutError, aiohttp.ClientError, ValueError):
        pass  # nothing readable came: the turn is lost
    return turn


def _refused(turn: Turn, status: int, body: object) -> None:
    if not isinstance(body, dict) or not body.get("message"):
        return  # an error a person cannot read is no answer
    turn.settle("rate_limited" if status == 429 else "refused")


def _streamed(turn: Turn, data: dict) -> bool:
    """Takes one server-sent event; True once the reply is over."""
    if data.get("content"):
        turn.show()
    if not data.get("done"):
        return False
    turn.settle("refused" if data.get("error") else "answered")
    return True


class DiscordReplies:
    """Watches the loopback Discord's REST calls for the bot's replies to people's messages."""

    def __init__(self, fake: FakeDiscord, answer_start: str) -> None:
        self.fake = fake
        self.answer_start = answer_start
        self.posts: dict[str, list[str]] = {}  # what was posted in reply, by message id
        self._first: dict[str, tuple[float, str]] = {}
        self._waiting: dict[str, asyncio.Future[tuple[float, str]]] = {}
        self._seen = 0

    async def run(self) -> None:
        while True:
            calls = self.fake.calls
            for call in calls[self._seen :]:
                # Only a post Discord took shows: a 429 is recorded too, and hikari sends the
                # same post again once the bucket allows it (that is one reply, not two).
                if _posted(call):
                    replied = (call.body.get("message_reference") or {}).get("message_id")
                    if replied:
                        self._posted(str(replied), call.at, call.body.get("content") or "")
            self._seen = len(calls)
            await asyncio.sleep(0.02)

    def _posted(self, message: str, at: float, content: str) -> None:
        self.posts.setdefault(message, []).append(content)
        if message in self._first:
            return
        self._first[message] = (at, content)
        waiter = self._waiting.pop(message, None)
        if waiter is not None and not waiter.done():
            waiter.set_result((at, content))

    async def wait(self, message: str, timeout: float) -> tuple[float, str] | None:
        """The first reply to ``message``: when it was posted and what it said."""
        if message in self._first:
            return self._first[message]
        waiter = self._waiting[message] = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            return None
        finally:
            self._waiting.pop(message, None)

    @property
    def duplicated(self) -> dict[str, list[str]]:
        """Messages that got more than one reply posted, with what each said."""
        return {m: posted for m, posted in self.posts.items() if len(posted) > 1}


def _posted(call: RestCall) -> bool:
    return (
        call.method == "POST"
        and call.path.endswith("/messages")
        and bool(call.body)
        and 200 <= call.status < 300
    )


async def discord_turn(
    fake: FakeDiscord, replies: DiscordReplies, channel: int, author: FakeUser, text: str
) -> Turn:
    """One message in a chat-mode channel, until the bot's reply to it is posted."""
    message = await fake.send_message(channel, text, author=author)
    turn = Turn(fake.dispatched_at[int(message["id"])])
    reply = await replies.wait(str(message["id"]), WAIT_S)
    if reply is not None:
        at, content = reply
        turn.shown_at = at
        turn.outcome = "answered" if content.startswith(replies.answer_start) else "refused"
    return turn
