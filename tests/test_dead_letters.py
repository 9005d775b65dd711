"""Dead letters are re-driven once their dependency is back: exactly one answer, once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import redis.asyncio as aioredis
from click.testing import CliRunner

from libra.contracts import ConsumerSpec, DeadLetter, TurnAccepted, derive, new_id
from libra.ops.cli import main
from libra.ops.dead import dead_letters, retry_dead_letters
from libra.ops.embedded import EmbeddedRedis, free_port
from libra.runtime.config import Settings
from libra.runtime.consumer import ConsumerRunner
from libra.runtime.deadletter import retry_of
from libra.runtime.eventlog import EventLog
from libra.runtime.settled import SETTLED_SKIPPED

from .factories import text
from .helpers import eventually, stream_count, stream_events


class Counting:
    """Admits each text after counting it in a Redis that may be down."""

    spec = ConsumerSpec(
        name="counting",
        subjects=("libra.text.received.>",),
        max_deliver=2,
        backoff_s=(0.05,),
        settled_by=("turn.accepted",),
        settled_key="turn",
    )

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.answered: list[str] = []

    async def handle(self, event) -> list[TurnAccepted]:
        await self.redis.incr(f"seen:{event.id}")
        self.answered.append(event.id)
        return [derive(event, TurnAccepted, key="turn", text=event.text, origin=event.origin)]


async def _count(log: EventLog, subject: str, n: int) -> bool:
    return await stream_count(log.js, "LIBRA", subject) >= n


async def test_a_dead_letter_is_answered_once_when_its_dependency_is_back(
    eventlog: EventLog, tmp_path: Path
) -> None:
    server = EmbeddedRedis(tmp_path / "redis", port=free_port())  # not started: Redis is down
    client = aioredis.from_url(server.url, socket_connect_timeout=0.5)
    processor = Counting(client)
    runner = ConsumerRunner(eventlog, processor, concurrency=4)
    task = asyncio.create_task(runner.run())
    try:
        said = text(message="count me")
        await eventlog.publish(said)
        await eventually(lambda: _count(eventlog, "libra.dead.counting.>", 1))
        [(letter, retried)] = await dead_letters(eventlog, consumer="counting")
        assert not retried and letter.causation == said.id and "onnect" in letter.error

        await server.start()  # the outage ends
        done = await retry_dead_letters(eventlog, consumer="counting")
        assert [d.id for d in done.retried] == [letter.id]
        await eventually(lambda: _count(eventlog, "libra.turn.accepted.>", 1))
        assert processor.answered == [said.id]

        again = await retry_dead_letters(eventlog, ids=[letter.id])  # a second retry: nothing
        assert again.retried == [] and again.skipped[0][1] == "retried already"
        # Even a retry that got through (another id, past the duplicate window) pays nothing.
        skipped = SETTLED_SKIPPED.labels("counting")._value.get()
        forced = msgspec.structs.replace(retry_of(letter), id=new_id())
        await eventlog.publish(forced)

        async def looked_up() -> bool:
            return SETTLED_SKIPPED.labels("counting")._value.get() > skipped

        await eventually(looked_up)
        assert processor.answered == [said.id]
        accepted = await stream_events(eventlog.js, "LIBRA", "libra.turn.accepted.>")
        assert [a.causation for a in accepted] == [said.id]
        assert await client.get(f"seen:{said.id}") == b"1"
    finally:
        await runner.stop()
        await asyncio.wait_for(task, 10)
        await client.aclose()
        await server.stop()


async def test_a_retry_that_fails_again_is_a_new_letter(eventlog: EventLog) -> None:
    down = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    runner = ConsumerRunner(eventlog, Counting(down), concurrency=4)
    task = asyncio.create_task(runner.run())
    try:
        said = text()
        await eventlog.publish(said)
        await eventually(lambda: _count(eventlog, "libra.dead.counting.>", 1))
        await retry_dead_letters(eventlog, consumer="counting")
        await eventually(lambda: _count(eventlog, "libra.dead.counting.>", 2))
        letters = await stream_events(eventlog.js, "LIBRA", "libra.dead.>")
        assert all(isinstance(x, DeadLetter) for x in letters)
        first, second = letters
        # The second keeps the original message, so it can be retried in its turn.
        assert (second.subject, second.stream_seq) == (first.subject, first.stream_seq)
        assert second.payload == first.payload and second.id != first.id
        listed = await dead_letters(eventlog)
        assert [r for _, r in listed] == [True, False]
    finally:
        await runner.stop()
        await asyncio.wait_for(task, 10)
        await down.aclose()


class Leaky:
    """Fails every text with an error that quotes a URL's password, a key and a token."""

    spec = ConsumerSpec(name="leaky", subjects=("libra.text.received.>",), max_deliver=1)

    def __init__(self, password: str, key: str, token: str) -> None:
        self.error = ConnectionError(
            f"cannot reach redis://:{password}@127.0.0.1:6380/0 as {key}\n"
            f"(Authorization: Bearer {token})"
        )

    async def handle(self, event) -> list[TurnAccepted]:
        raise self.error


async def test_a_dead_letter_names_the_error_without_its_secrets(
    eventlog: EventLog, settings
) -> None:
    key = "ordinary-words-but-configured"  # not token-like: only its being configured hides it
    Settings.from_env({"GROQ_API_KEY": key})
    password, token = "hunter2-redis", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ6b2UifQ.Zm9vYmFyYmF6MTIz"
    runner = ConsumerRunner(eventlog, Leaky(password, key, token), concurrency=4)
    task = asyncio.create_task(runner.run())
    try:
        await eventlog.publish(text(message="my words"))
        await eventually(lambda: _count(eventlog, "libra.dead.leaky.>", 1))
    finally:
        await runner.stop()
        await asyncio.wait_for(task, 10)
    [(letter, _)] = await dead_letters(eventlog, consumer="leaky")
    assert letter.error == (
        "ConnectionError: cannot reach redis://***@127.0.0.1:6380/0 as *** (Authorization:"
        " Bearer ***)"
    )
    assert "my words" in letter.payload  # the message itself is kept, to be re-driven
    result = await asyncio.to_thread(
        CliRunner().invoke, main, ["dead", "list"], env={"NATS_URL": settings.nats_url}
    )
    assert f"leaky seq 1 {letter.subject}: {letter.error!r}" in result.output
    for secret in (password, key, token, *token.split(".")):
        assert secret not in result.output and secret not in letter.error


async def test_the_cli_lists_and_retries(eventlog: EventLog, settings) -> None:
    """`libra dead list` and `libra dead retry` against the stack the environment names."""
    said = text()
    letter = derive(
        said,
        DeadLetter,
        key="dead/turns",
        consumer="turns",
        subject=said.subject,
        stream_seq=await eventlog.publish(said),
        error="ConnectionError: Redis is down",
    )
    await eventlog.publish(letter)
    env = {"NATS_URL": settings.nats_url}

    def cli(*args: str) -> str:
        result = CliRunner().invoke(main, ["dead", *args], env=env)
        assert result.exit_code == 0, result.output
        return result.output

    listed = await asyncio.to_thread(cli, "list", "--consumer", "turns")
    assert letter.id in listed and "Redis is down" in listed and "(retried)" not in listed
    assert "re-driven 1 dead letter(s)" in await asyncio.to_thread(cli, "retry", letter.id)
    [retry] = await stream_events(eventlog.js, "LIBRA", "libra.retry.turns.>")
    assert retry.id == retry_of(letter).id and retry.letter == letter.id
    assert "(retried)" in await asyncio.to_thread(cli, "list", "--since", "10m")
