"""Libra's slash commands: /chat on|off, /reset, /model, /persona, /stats and /help.

The lightbulb classes only declare the commands (names and descriptions are localization keys,
see :mod:`.strings`); :class:`SlashCommands` does what they mean, which for a change of state is
publishing a session event. Refusals are ephemeral and say why.
"""

from __future__ import annotations

import logging
import re

import asyncpg
import hikari
import lightbulb

from libra.contracts import (
    Event,
    Origin,
    SessionChat,
    SessionMemoryReset,
    SessionSettings,
    conversation_id,
    make,
    user_id,
    well_formed,
)
from libra.runtime.eventlog import EventLog

from .access import AccessPolicy, Speaker
from .sessions import SessionView
from .strings import say

__all__ = ["COMMANDS", "SlashCommands", "register_commands"]

log = logging.getLogger("libra.discord.commands")
INJECTED = lightbulb.di.INJECTED

_MODEL_NAME = re.compile(r"^[A-Za-z0-9_.:/@+-]{1,100}$")
_THREADS = (
    hikari.ChannelType.GUILD_PUBLIC_THREAD,
    hikari.ChannelType.GUILD_PRIVATE_THREAD,
    hikari.ChannelType.GUILD_NEWS_THREAD,
)
_STATS_TODAY = """
SELECT count(*) AS turns,
       coalesce(sum(prompt_tokens), 0) AS prompt,
       coalesce(sum(completion_tokens), 0) AS completion
  FROM turns
 WHERE user_id = $1 AND platform = 'discord'
   AND received_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
"""


class SlashCommands:
    """What the slash commands do: check who asks, publish session events, answer."""

    def __init__(
        self,
        log_: EventLog,
        pool: asyncpg.Pool,
        view: SessionView,
        access: AccessPolicy,
        *,
        default_model: str,
        default_persona: str,
    ) -> None:
        self.log = log_
        self.pool = pool
        self.view = view
        self.access = access
        self.default_model = default_model
        self.default_persona = default_persona

    async def chat(self, ctx: lightbulb.Context, *, enabled: bool) -> None:
        if not await self.may_talk(ctx):
            return
        locale = str(ctx.interaction.locale)
        if ctx.guild_id is None:
            await ctx.respond(say("chat.dm", locale), ephemeral=True)
            return
        if not self.access.may_set_chat_mode(*_rights(ctx)):
            await ctx.respond(say("refused.chat", locale), ephemeral=True)
            return
        await self._publish(ctx, SessionChat, enabled=enabled)
        await ctx.respond(say("chat.on" if enabled else "chat.off", locale))

    async def reset(self, ctx: lightbulb.Context, *, everywhere: bool) -> None:
        if not await self.may_talk(ctx):
            return
        scope = "user" if everywhere else "conversation"
        await self._publish(ctx, SessionMemoryReset, scope=scope)
        await ctx.respond(say(f"reset.{scope}", str(ctx.interaction.locale)), ephemeral=True)

    async def model(self, ctx: lightbulb.Context, *, name: str, clear: bool) -> None:
        await self._setting(ctx, "model", name, clear, self.default_model)

    async def persona(self, ctx: lightbulb.Context, *, prompt: str, clear: bool) -> None:
        await self._setting(ctx, "persona", prompt, clear, self.default_persona)

    async def stats(self, ctx: lightbulb.Context) -> None:
        row = await self.pool.fetchrow(_STATS_TODAY, user_id("discord", str(ctx.user.id)))
        await ctx.respond(
            say(
                "stats",
                str(ctx.interaction.locale),
                turns=row["turns"],
                prompt=row["prompt"],
                completion=row["completion"],
            ),
            ephemeral=True,
        )

    async def help(self, ctx: lightbulb.Context) -> None:
        await ctx.respond(say("help", str(ctx.interaction.locale)), ephemeral=True)

    async def failed(self, ctx: lightbulb.Context) -> None:
        """Tells the person something broke (the log line has the details)."""
        await ctx.respond(say("error", str(ctx.interaction.locale)), ephemeral=True)

    async def _setting(
        self, ctx: lightbulb.Context, key: str, value: str, clear: bool, default: str
    ) -> None:
        if not await self.may_talk(ctx):
            return
        locale = str(ctx.interaction.locale)
        if ctx.guild_id is None:
            await ctx.respond(say("guild.only", locale), ephemeral=True)
            return
        scope = f"guild:{ctx.guild_id}"
        if not value and not clear:
            shown = self.view.setting(scope, key) or default or say("default", locale)
            await ctx.respond(say(f"{key}.show", locale, value=shown), ephemeral=True)
            return
        if not self.access.is_admin(*_rights(ctx)):
            await ctx.respond(say("refused.admin", locale), ephemeral=True)
            return
        value = "" if clear else well_formed(value).strip()
        if key == "model" and value and not _MODEL_NAME.match(value):
            await ctx.respond(say("model.bad", locale), ephemeral=True)
            return
        await self._publish(ctx, SessionSettings, scope=scope, key=key, value=value)
        text = say("cleared", locale) if not value else say(f"{key}.set", locale, value=value)
        await ctx.respond(text, ephemeral=True)

    async def may_talk(self, ctx: lightbulb.Context) -> bool:
        """Whether the access lists let this person use Libra here; if not, they are told."""
        channel, thread = _where(ctx)
        roles = frozenset(str(r) for r in ctx.member.role_ids) if ctx.member else frozenset()
        speaker = Speaker(
            user=str(ctx.user.id),
            guild=str(ctx.guild_id or ""),
            channel=thread or channel,
            parent=channel if thread else "",
            roles=roles,
        )
        if self.access.may_talk(speaker):
            return True
        await ctx.respond(say("refused.access", str(ctx.interaction.locale)), ephemeral=True)
        return False

    async def _publish(self, ctx: lightbulb.Context, cls: type[Event], **fields: object) -> None:
        channel, thread = _where(ctx)
        guild = str(ctx.guild_id or "")
        conversation = (
            conversation_id("discord", guild, ctx.channel_id)
            if guild
            else conversation_id("discord", "dm", ctx.channel_id)
        )
        event = make(
            cls,
            conversation=conversation,
            user=user_id("discord", str(ctx.user.id)),
            origin=Origin(
                platform="discord",
                guild=guild,
                channel=channel,
                thread=thread,
                interaction=str(ctx.interaction.id),
                locale=str(ctx.interaction.locale),
            ),
            **fields,
        )
        await self.log.publish(event)
        self.view.apply(event)  # the next message here must see it, before the log echoes it


def _rights(ctx: lightbulb.Context) -> tuple[hikari.Permissions, list[str]]:
    member = ctx.member
    if member is None:
        return hikari.Permissions.NONE, []
    return member.permissions, [str(r) for r in member.role_ids]


def _where(ctx: lightbulb.Context) -> tuple[str, str]:
    """(channel, thread or "") of an interaction; in a thread, the channel is the thread's."""
    channel = ctx.interaction.channel
    if channel.type in _THREADS and channel.parent_id is not None:
        return str(channel.parent_id), str(channel.id)
    return str(ctx.channel_id), ""


# --- the commands as Discord sees them ------------------------------------------------------

chat = lightbulb.Group("chat", "chat.desc", localize=True)


@chat.register
class ChatOn(lightbulb.SlashCommand, name="chat.on", description="chat.on.desc", localize=True):
    @lightbulb.invoke
    async def invoke(self, ctx: lightbulb.Context, run: SlashCommands = INJECTED) -> None:
        await run.chat(ctx, enabled=True)


@chat.register
class ChatOff(lightbulb.SlashCommand, name="chat.off", description="chat.off.desc", localize=True):
    @lightbulb.invoke
    async def invoke(self, ctx: lightbulb.Context, run: SlashCommands = INJECTED) -> None:
        await run.chat(ctx, enabled=False)


class Reset(lightbulb.SlashCommand, name="reset", description="reset.desc", localize=True):
    everywhere = lightbulb.boolean(
        "reset.everywhere", "reset.everywhere.desc", default=False, localize=True
    )

    @lightbulb.invoke
    async def invoke(self, ctx: lightbulb.Context, run: SlashCommands = INJECTED) -> None:
        await run.reset(ctx, everywhere=self.everywhere)


class Model(lightbulb.SlashCommand, name="model", description="model.desc", localize=True):
    name_ = lightbulb.string(
        "model.name", "model.name.desc", default="", max_length=100, localize=True
    )
    clear = lightbulb.boolean("clear", "clear.desc", default=False, localize=True)

    @lightbulb.invoke
    async def invoke(self, ctx: lightbulb.Context, run: SlashCommands = INJECTED) -> None:
        await run.model(ctx, name=self.name_, clear=self.clear)


class Persona(lightbulb.SlashCommand, name="persona", description="persona.desc", localize=True):
    prompt = lightbulb.string(
        "persona.prompt", "persona.prompt.desc", default="", max_length=4000, localize=True
    )
    clear = lightbulb.boolean("clear", "clear.desc", default=False, localize=True)

    @lightbulb.invoke
    async def invoke(self, ctx: lightbulb.Context, run: SlashCommands = INJECTED) -> None:
        await run.persona(ctx, prompt=self.prompt, clear=self.clear)


class Stats(lightbulb.SlashCommand, name="stats", description="stats.desc", localize=True):
    @lightbulb.invoke
    async def invoke(self, ctx: lightbulb.Context, run: SlashCommands = INJECTED) -> None:
        await run.stats(ctx)


class Help(lightbulb.SlashCommand, name="help", description="help.desc", localize=True):
    @lightbulb.invoke
    async def invoke(self, ctx: lightbulb.Context, run: SlashCommands = INJECTED) -> None:
        await run.help(ctx)


COMMANDS = (chat, Reset, Model, Persona, Stats, Help)


def register_commands(client: lightbulb.Client, commands: SlashCommands) -> None:
    """Registers Libra's commands on a lightbulb client, with ``commands`` doing their work."""
    client.di.registry_for(lightbulb.di.Contexts.DEFAULT).register_value(SlashCommands, commands)
    for command in COMMANDS:
        client.register(command)

    @client.error_handler
    async def on_error(failure: lightbulb.exceptions.ExecutionPipelineFailedException) -> bool:
        cause = failure.causes[0] if failure.causes else None
        log.error("/%s failed", failure.context.command_data.qualified_name, exc_info=cause)
        await commands.failed(failure.context)
        return True
