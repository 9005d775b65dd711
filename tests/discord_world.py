"""The Discord gateway on the loopback Discord, as the Discord tests start it: a fake Discord,
a server with two channels and two people, and gateway instances run as separate processes
would be (fixtures ``fake``, ``world``, ``gateways``, which ``conftest.py`` makes available)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis

from libra.contracts import conversation_id
from libra.gateway.discord.gateway import DiscordGateway
from libra.ops.fakes.discord import MANAGE_GUILD, FakeDiscord, FakeUser
from libra.runtime.config import Settings
from libra.runtime.eventlog import EventLog


@dataclass
class World:
    fake: FakeDiscord
    guild: int
    channel: int
    quiet: int  # a channel without chat mode
    alice: FakeUser
    admin: FakeUser

    @property
    def conversation(self) -> str:
        return conversation_id("discord", self.guild, self.channel)


class Gateways:
    """Starts gateway instances against the fake, each with its own connections, as a process."""

    def __init__(self, settings: Settings, fake: FakeDiscord, database_url: str) -> None:
        self.settings = msgspec.structs.replace(
            settings, discord_token=fake.token, discord_rest_url=fake.rest_url
        )
        self.fake = fake
        self.database_url = database_url
        self._running: list[tuple[DiscordGateway, asyncio.Task, list]] = []

    async def start(
        self, *, reply_idle_s: float = 60.0, recover_grace_s: float = 10.0, **overrides: object
    ) -> DiscordGateway:
        settings = msgspec.structs.replace(self.settings, **overrides)
        log = await EventLog.connect(settings.nats_url, name="test-discord")
        pool = await asyncpg.create_pool(self.database_url, min_size=1, max_size=4)
        redis = aioredis.from_url(settings.redis_url)
        gateway = DiscordGateway(
            settings,
            log,
            pool,
            redis,
            reply_idle_s=reply_idle_s,
            recover_grace_s=recover_grace_s,
        )
        task = asyncio.create_task(gateway.run())
        self._running.append((gateway, task, [log, pool, redis]))
        async with asyncio.timeout(20):
            await gateway.ready.wait()
        return gateway

    async def stop(self, gateway: DiscordGateway) -> None:
        for entry in list(self._running):
            if entry[0] is gateway:
                self._running.remove(entry)
                await _stop(*entry)

    async def crash(self, gateway: DiscordGateway) -> None:
        """Stops ``gateway`` as a killed process would: its replies under way end where they are."""
        for task in list(gateway._answering):
            task.cancel()
        await self.stop(gateway)

    async def stop_all(self) -> None:
        while self._running:
            await _stop(*self._running.pop())


async def _stop(gateway: DiscordGateway, task: asyncio.Task, owned: list) -> None:
    await gateway.stop()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 30)
    log, pool, redis = owned
    await log.close()
    await pool.close()
    await redis.aclose()


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as fake:
        yield fake


@pytest.fixture
def world(fake: FakeDiscord) -> World:
    guild = fake.add_guild()
    return World(
        fake=fake,
        guild=guild,
        channel=fake.add_channel(guild, "chat"),
        quiet=fake.add_channel(guild, "quiet"),
        alice=fake.user("alice"),
        admin=fake.user("admin"),
    )


@pytest.fixture
async def gateways(
    settings: Settings, eventlog: EventLog, fake: FakeDiscord, database_url: str
) -> AsyncIterator[Gateways]:
    found = Gateways(settings, fake, database_url)
    yield found
    await found.stop_all()


async def run_subcommand(
    world: World,
    command: str,
    sub: str,
    user: FakeUser,
    *,
    options: list[dict[str, Any]] | None = None,
    permissions: int = MANAGE_GUILD,
    **kw: Any,
) -> str:
    """Runs ``/command sub`` in the world's channel and returns its ephemeral answer."""
    done = await world.fake.invoke(
        command,
        channel_id=world.channel,
        user=user,
        options=[{"type": 1, "name": sub, "options": options or []}],
        permissions=permissions,
        **kw,
    )
    await asyncio.wait_for(done.responded.wait(), 10)
    assert done.ephemeral
    return done.content


async def run_autocomplete(
    world: World,
    command: str,
    sub: str,
    option: str,
    typed: str,
    user: FakeUser,
    *,
    permissions: int = MANAGE_GUILD,
) -> list[str]:
    """Types ``typed`` into ``/command sub``'s ``option``; returns the values the bot offers."""
    asked = await world.fake.autocomplete(
        command,
        channel_id=world.channel,
        user=user,
        permissions=permissions,
        options=[
            {
                "type": 1,
                "name": sub,
                "options": [{"type": 3, "name": option, "value": typed, "focused": True}],
            }
        ],
    )
    await asyncio.wait_for(asked.responded.wait(), 10)
    return [c["value"] for c in asked.choices]
