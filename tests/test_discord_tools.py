"""Tools on Discord: ``/tools`` (Manage Server) shows, enables and disables a server's tools as
its ``tools`` setting, and ``server_info`` reads the server from the loopback Discord through
hikari, with the bot's token."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from libra.contracts import SessionSettings
from libra.ops.fakes.discord import EVERYDAY_PERMISSIONS, MANAGE_GUILD, FakeDiscord, FakeUser
from libra.runtime.config import Settings
from libra.runtime.eventlog import EventLog
from libra.tools import ToolContext, ToolError
from libra.tools.builtin.server import NoArguments, server_tool

from .discord_world import Gateways, World, run_autocomplete, run_subcommand
from .helpers import eventually, stream_events
from .stack import running

DEFAULT = "time,dice"  # TOOLS_ENABLED in these tests
INSTALLED = ["dice", "knowledge_search", "server_info", "time"]


def _context(fake: FakeDiscord, guild: int, **secrets: str) -> ToolContext:
    return ToolContext(
        user="discord:1",
        conversation=f"discord-{guild}-2",
        platform="discord",
        guild=str(guild),
        secrets=secrets,
        services={"discord_rest_url": fake.rest_url},
    )


async def test_server_info_reads_the_server_and_its_counts_through_hikari(
    fake: FakeDiscord,
) -> None:
    guild = fake.add_guild("Bakers", description="Bread talk", members=42, online=7)
    info = await server_tool.run(NoArguments(), _context(fake, guild, DISCORD_TOKEN=fake.token))
    assert (info["name"], info["description"]) == ("Bakers", "Bread talk")
    assert (info["members"], info["online"]) == (42, 7)
    assert info["preferred_locale"] == "en-US" and info["boost_tier"] == 0
    [call] = fake.calls_to("GET", rf"/guilds/{guild}")
    assert call.status == 200 and call.query.get("with_counts") == "true"

    with pytest.raises(ToolError, match="no Discord token"):
        await server_tool.run(NoArguments(), _context(fake, guild))
    with pytest.raises(ToolError, match="does not know this server"):
        await server_tool.run(NoArguments(), _context(fake, guild + 1, DISCORD_TOKEN=fake.token))
    assert len(fake.calls_to("GET", r"/guilds/\d+")) == 2  # no token: Discord is not asked


async def _ask(
    world: World,
    command: str,
    sub: str,
    user: FakeUser,
    *,
    name: str | None = None,
    permissions: int = MANAGE_GUILD,
    **kw: Any,
) -> str:
    options = [{"type": 3, "name": "name", "value": name}] if name is not None else []
    return await run_subcommand(
        world, command, sub, user, options=options, permissions=permissions, **kw
    )


async def _settings_events(log: EventLog) -> list[tuple[str, str, str]]:
    found = await stream_events(log.js, "LIBRA", "libra.session.settings.>")
    return [(e.scope, e.key, e.value) for e in found if isinstance(e, SessionSettings)]


async def test_tools_list_enable_disable_and_default_publish_the_servers_setting(
    settings: Settings, eventlog: EventLog, world: World, gateways: Gateways
) -> None:
    await gateways.start(tools_enabled=DEFAULT)
    admin = world.admin

    listed = await _ask(world, "tools", "list", admin)
    assert listed.startswith("Tools in this server (none chosen here, so Libra's default:")
    assert "TOOLS_ENABLED" in listed.splitlines()[0]
    lines = listed.splitlines()[1:]
    assert [line.split("`")[1] for line in lines] == INSTALLED
    assert [line.split(" · ")[1].split(" —")[0] for line in lines] == ["on", "off", "off", "on"]
    assert lines[0].startswith("✅ `dice` · on — Rolls dice")
    assert lines[2].endswith("(servers only)")  # server_info reads the server it is asked in

    assert await _ask(world, "tools", "enable", admin, name="weather") == (
        "There's no tool named `weather`. Installed tools: `dice`, `knowledge_search`, "
        "`server_info`, `time`."
    )
    assert await _ask(world, "tools", "enable", admin, name="server_info") == (
        "`server_info` is on in this server. On here: `dice`, `server_info`, `time`."
    )
    assert await _ask(world, "tools", "enable", admin, name="dice") == (
        "`dice` is already on here. On here: `dice`, `server_info`, `time`."
    )
    listed = await _ask(world, "tools", "list", admin)
    assert listed.startswith("Tools in this server (this server's choice):")
    for name in ("dice", "time", "server_info"):
        assert await _ask(world, "tools", "disable", admin, name=name)
    assert (await _ask(world, "tools", "list", admin)).count("⬜") == 4
    assert await _ask(world, "tools", "disable", admin, name="time") == (
        "`time` is already off here. On here: none."
    )
    korean = await _ask(world, "tools", "default", admin, locale="ko")
    assert korean == "이 서버는 다시 Libra의 기본 도구(TOOLS_ENABLED)를 써요: `time`, `dice`."

    scope = f"guild:{world.guild}"
    assert await _settings_events(eventlog) == [
        (scope, "tools", "dice,server_info,time"),
        (scope, "tools", "server_info,time"),
        (scope, "tools", "server_info"),
        (scope, "tools", "none"),  # the last one off: no tools, not the default
        (scope, "tools", ""),
    ]


async def test_tools_are_for_admins_and_a_choice_survives_a_restart(
    settings: Settings,
    eventlog: EventLog,
    world: World,
    gateways: Gateways,
    pool: asyncpg.Pool,
) -> None:
    refused = "Only server admins (Manage Server) can change that."
    alice = world.alice
    async with running(settings, ["sessions"]):
        first = await gateways.start(tools_enabled=DEFAULT)
        everyday = {"permissions": EVERYDAY_PERMISSIONS}
        assert await _ask(world, "tools", "list", alice, **everyday) == refused
        assert await _ask(world, "tools", "disable", alice, name="time", **everyday) == refused
        assert await _settings_events(eventlog) == []
        assert await _ask(world, "tools", "disable", world.admin, name="time")
        [(_, _, value)] = await _settings_events(eventlog)
        assert value == "dice"

        await _wait_projected(pool, f"guild:{world.guild}")
        await gateways.stop(first)
        await gateways.start(tools_enabled=DEFAULT)
        listed = await _ask(world, "tools", "list", world.admin)
    assert listed.startswith("Tools in this server (this server's choice):")
    assert "✅ `dice`" in listed and "⬜ `time`" in listed


async def _wait_projected(pool: asyncpg.Pool, scope: str) -> None:
    """Until the sessions projection has the setting, so that a new gateway loads it."""

    async def projected() -> bool:
        query = "SELECT count(*) FROM settings WHERE scope = $1 AND key = 'tools'"
        return bool(await pool.fetchval(query, scope))

    await eventually(projected)


async def test_tool_names_are_suggested_and_the_commands_are_for_managers(
    world: World, gateways: Gateways
) -> None:
    await gateways.start(tools_enabled=DEFAULT, discord_guild_id=str(world.guild))
    synced = {c["name"]: c for c in world.fake.commands[world.guild]}
    assert int(synced["tools"]["default_member_permissions"]) == MANAGE_GUILD
    assert [o["name"] for o in synced["tools"]["options"]] == [
        "list",
        "enable",
        "disable",
        "default",
    ]
    assert synced["tools"]["name_localizations"]["ko"] == "도구"

    async def suggested(sub: str, typed: str) -> list[str]:
        return await run_autocomplete(world, "tools", sub, "name", typed, world.admin)

    assert await suggested("enable", "") == ["knowledge_search", "server_info"]
    assert await suggested("enable", "SERV") == ["server_info"]
    assert await suggested("disable", "") == ["dice", "time"]
