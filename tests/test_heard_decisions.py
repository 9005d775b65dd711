"""Admission's own count of every person's window, from every decision in the log: a person far
below the limit is admitted without Redis, and the limit still holds, across instances too."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from libra.contracts import Origin, TextReceived, TurnAccepted, TurnRejected, make
from libra.ops.embedded import EmbeddedNats, free_port
from libra.processors.turns.admission import TurnsProcessor
from libra.processors.turns.heard import HeardDecisions
from libra.processors.turns.ratelimit import LocalRateLimiter, RateLimiter, key_for
from libra.processors.turns.view import RateLimitView
from libra.runtime.eventlog import EventLog
from libra.runtime.outage import Breaker

from .helpers import eventually

HTTP = Origin(platform="http")
LIMIT = 6  # a person's first LIMIT // 2 turns in a window are admitted from the count


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def dead() -> AsyncIterator[aioredis.Redis]:
    """A Redis that is not there: any call to it fails."""
    client = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=1)
    yield client
    await client.aclose()


@contextlib.asynccontextmanager
async def _heard(log: EventLog) -> AsyncIterator[HeardDecisions]:
    heard = HeardDecisions(log, LocalRateLimiter(limit=LIMIT, window_s=10))
    await heard.start()
    try:
        yield heard
    finally:
        await heard.stop()


async def _whole(heard: HeardDecisions) -> None:
    async def whole() -> bool:
        return heard.whole(int(time.time() * 1000))

    await eventually(whole, timeout=10)


@contextlib.asynccontextmanager
async def _admitting(
    log: EventLog, client: aioredis.Redis
) -> AsyncIterator[tuple[HeardDecisions, TurnsProcessor]]:
    """Admission with every decision heard, once its count is whole."""
    async with _heard(log) as heard:
        await _whole(heard)
        yield heard, _admission(client, heard)


def _admission(client: aioredis.Redis, heard: HeardDecisions) -> TurnsProcessor:
    limiter = RateLimiter(client, limit=LIMIT, window_s=10)
    return TurnsProcessor(client, limiter, heard=heard, breaker=Breaker("redis", retry_s=60))


def _said(user: str, n: int) -> TextReceived:
    return make(TextReceived, conversation="http-c", user=user, text=f"message {n}", origin=HTTP)


async def _decide(processor: TurnsProcessor, event: TextReceived):
    [out] = [out async for out in processor.handle(event)]
    return out


async def test_a_person_far_below_the_limit_is_admitted_without_a_call_to_redis(
    eventlog: EventLog, dead: aioredis.Redis
) -> None:
    async with _admitting(eventlog, dead) as (_, admission):
        outs = [await _decide(admission, _said("http:ann", n)) for n in range(LIMIT // 2 + 1)]
        quick, slow = outs[:-1], outs[-1]
        # no call to Redis (a call would have failed, and the decision would say so)
        assert all(isinstance(o, TurnAccepted) and o.degraded == () for o in quick)
        assert all(o.in_redis is False for o in quick)
        # half the limit counted: Redis's to decide now (down here, so counted in this process)
        assert isinstance(slow, TurnAccepted) and slow.degraded == ("redis",)


async def test_a_flood_is_held_to_the_limit_though_redis_never_saw_the_first_turns(
    eventlog: EventLog, redis: aioredis.Redis
) -> None:
    async with _admitting(eventlog, redis) as (_, admission):
        outs = await asyncio.gather(
            *(_decide(admission, _said("http:flood", n)) for n in range(20))
        )
        accepted = [o for o in outs if isinstance(o, TurnAccepted)]
        refused = [o for o in outs if isinstance(o, TurnRejected)]
        assert len(accepted) == LIMIT and len(refused) == 20 - LIMIT
        assert all(r.reason == "rate_limited" and r.retry_after_s > 0 for r in refused)
        assert sum(not a.in_redis for a in accepted) == LIMIT // 2
        # the script was told the turns counted here, and holds every admitted one
        members = {m.decode() for m in await redis.zrange(key_for("http:flood"), 0, -1)}
        assert members == {a.turn for a in accepted}


async def test_a_second_instance_counts_the_first_ones_decisions(
    eventlog: EventLog, redis: aioredis.Redis, dead: aioredis.Redis, settings
) -> None:
    other = await EventLog.connect(settings.nats_url, name="test-other-turns")
    try:
        async with _heard(eventlog) as mine, _heard(other) as theirs:
            await _whole(mine)
            await _whole(theirs)
            first = _admission(redis, mine)
            for n in range(LIMIT // 2):
                await eventlog.publish(await _decide(first, _said("http:bo", n)))

            async def counted() -> bool:
                now = int(time.time() * 1000)
                return len(theirs.turns.recent("http:bo", now)) == LIMIT // 2

            await eventually(counted, timeout=10)
            # the second instance knows bo is at half the limit: Redis decides (down here)
            out = await _decide(_admission(dead, theirs), _said("http:bo", 99))
            assert isinstance(out, TurnAccepted) and out.degraded == ("redis",)
    finally:
        await other.close()


async def test_a_starting_instance_reads_the_last_window_back_from_the_log(
    eventlog: EventLog, redis: aioredis.Redis
) -> None:
    async with _admitting(eventlog, redis) as (_, admission):
        for n in range(4):
            await eventlog.publish(await _decide(admission, _said("http:cy", n)))
    async with _heard(eventlog) as after:
        now = int(time.time() * 1000)
        assert not after.whole(now) or len(after.turns.recent("http:cy", now)) == 4
        await _whole(after)
        assert len(after.turns.recent("http:cy", int(time.time() * 1000))) == 4


async def test_after_a_reconnection_redis_decides_until_the_log_is_read_again(
    nats_server: EmbeddedNats, eventlog: EventLog, redis: aioredis.Redis
) -> None:
    async with _admitting(eventlog, redis) as (heard, admission):
        await eventlog.publish(await _decide(admission, _said("http:di", 0)))
        await nats_server.stop()
        assert not heard.whole(int(time.time() * 1000))
        await nats_server.start()

        async def connected() -> bool:
            return eventlog.nc.is_connected

        await eventually(connected, timeout=15)
        assert not heard.whole(int(time.time() * 1000))  # what came meanwhile went unheard
        await _whole(heard)  # read back from the log
        assert len(heard.turns.recent("http:di", int(time.time() * 1000))) == 1


async def test_the_rate_limit_view_writes_the_turns_admitted_from_the_count(
    eventlog: EventLog, redis: aioredis.Redis
) -> None:
    async with _admitting(eventlog, redis) as (_, admission):
        out = await _decide(admission, _said("http:ed", 0))
        assert isinstance(out, TurnAccepted) and not out.in_redis
        assert await redis.zcard(key_for("http:ed")) == 0
        await RateLimitView(RateLimiter(redis, limit=LIMIT, window_s=10)).handle(out)
        counted_at = int(out.received_at.timestamp() * 1000)  # the message's time
        assert await redis.zscore(key_for("http:ed"), out.turn) == counted_at


async def test_the_turns_user_may_hear_and_read_back_decisions(
    nats_server: EmbeddedNats, eventlog: EventLog, redis: aioredis.Redis
) -> None:
    """As production runs admission: logged in as its own NATS user."""
    admission = TurnsProcessor(redis, RateLimiter(redis, limit=LIMIT, window_s=10))
    await eventlog.publish(await _decide(admission, _said("http:fay", 0)))  # before: read back
    turns = await EventLog.connect(nats_server.url_for("turns"), name="turns")
    try:
        async with _heard(turns) as heard:
            await _whole(heard)
            await eventlog.publish(await _decide(admission, _said("http:fay", 1)))  # heard

            async def both() -> bool:
                return len(heard.turns.recent("http:fay", int(time.time() * 1000))) == 2

            await eventually(both, timeout=10)
    finally:
        await turns.close()
