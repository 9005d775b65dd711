"""Libra's slash commands: /chat on|off, /reset, /model, /persona, /moderation, /stats, /help.

The lightbulb classes only declare the commands (names and descriptions are localization keys,
see :mod:`.strings`); :class:`SlashCommands` does what they mean, which for a change of state is
publishing a session event. Refusals are ephemeral and say why. The voice, knowledge and tools
commands (:mod:`.voice_commands`, :mod:`.knowledge_commands`, :mod:`.tool_commands`) live in
modules of their own and use the same checks (:meth:`SlashCommands.server_scope`).
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
from libra.processors.moderation.policy import (
    CATEGORIES_KEY,
    LOG_KEY,
    SERVER_CATEGORIES,
    THRESHOLDS_KEY,
    PolicyError,
    ServerPolicy,
    format_thresholds,
    parse_categories,
)
from libra.runtime.eventlog import EventLog
from libra.runtime.sessions import SessionView

from .access import AccessPolicy, Speaker
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
_LOG_CHANNELS = (hikari.ChannelType.GUILD_TEXT, hikari.ChannelType.GUILD_NEWS)
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
        moderation_engines: str = "words",
    ) -> None:
        self.log = log_
        self.pool = pool
        self.view = view
        self.access = access
        self.default_model = default_model
        self.default_persona = default_persona
        self.moderation_engines = moderation_engines  # MODERATION_ENGINES, as the operator set it

    async def chat(self, ctx: lightbulb.Context, *, enabled: bool) -> None:
        if not await self.may_talk(ctx):
            return
        locale = str(ctx.interaction.locale)
        if ctx.guild_id is None:
            await ctx.respond(say("chat.dm", locale), ephemeral=True)
            return
        if not self.access.may_set_chat_mode(*rights(ctx)):
            await ctx.respond(say("refused.chat", locale), ephemeral=True)
            return
        await self.publish(ctx, SessionChat, enabled=enabled)
        await ctx.respond(say("chat.on" if enabled else "chat.off", locale))

    async def reset(self, ctx: lightbulb.Context, *, everywhere: bool) -> None:
        if not await self.may_talk(ctx):
            return
        scope = "user" if everywhere else "conversation"
        await self.publish(ctx, SessionMemoryReset, scope=scope)
        await ctx.respond(say(f"reset.{scope}", str(ctx.interaction.locale)), ephemeral=True)

    async def model(self, ctx: lightbulb.Context, *, name: str, clear: bool) -> None:
        await self._setting(ctx, "model", name, clear, self.default_model)

    async def persona(self, ctx: lightbulb.Context, *, prompt: str, clear: bool) -> None:
        await self._setting(ctx, "persona", prompt, clear, self.default_persona)

    async def moderation_show(self, ctx: lightbulb.Context) -> None:
        """The server's policy: engines, refused categories, thresholds, log channel."""
        if (scope := await self.server_scope(ctx)) is None:
            return
        locale = str(ctx.interaction.locale)
        policy = self._policy(scope)
        if policy.categories == frozenset(SERVER_CATEGORIES):
            categories = say("moderation.all", locale)
        elif not policy.categories:
            categories = say("moderation.none", locale)
        else:
            categories = ", ".join(c for c in SERVER_CATEGORIES if c in policy.categories)
        engines = self.moderation_engines
        if engines == "words":
            engines = say("moderation.words_only", locale)
        text = say(
            "moderation.policy",
            locale,
            engines=engines,
            categories=categories,
            thresholds=format_thresholds(policy.thresholds).replace(",", ", ")
            or say("moderation.own", locale),
            log=f"<#{policy.log_channel}>"
            if policy.log_channel
            else say("moderation.no_log", locale),
        )
        await ctx.respond(text, ephemeral=True)

    async def moderation_categories(self, ctx: lightbulb.Context, *, listed: str) -> None:
        """Sets the categories the server refuses."""
        if (scope := await self.server_scope(ctx, admin=True)) is None:
            return
        locale = str(ctx.interaction.locale)
        try:
            chosen = parse_categories(listed)
        except PolicyError as exc:
            await ctx.respond(say("moderation.bad", locale, error=exc), ephemeral=True)
            return
        if chosen == frozenset(SERVER_CATEGORIES):
            value, shown = "", say("moderation.all", locale)
        else:
            value = ",".join(c for c in SERVER_CATEGORIES if c in chosen) or "none"
            shown = value.replace(",", ", ") if chosen else say("moderation.none", locale)
        await self.publish(ctx, SessionSettings, scope=scope, key=CATEGORIES_KEY, value=value)
        text = say("moderation.categories.set", locale, categories=shown)
        await ctx.respond(text, ephemeral=True)

    async def moderation_threshold(
        self, ctx: lightbulb.Context, *, category: str, score: float | None
    ) -> None:
        """Sets (or, with no score, clears) the score from which ``category`` is refused."""
        if (scope := await self.server_scope(ctx, admin=True)) is None:
            return
        locale = str(ctx.interaction.locale)
        if category not in SERVER_CATEGORIES or not (score is None or 0.0 <= score <= 1.0):
            error = f"{category}={score}"
            await ctx.respond(say("moderation.bad", locale, error=error), ephemeral=True)
            return
        thresholds = dict(self._policy(scope).thresholds)
        if score is None:
            thresholds.pop(category, None)
        else:
            thresholds[category] = score
        value = format_thresholds(thresholds)
        await self.publish(ctx, SessionSettings, scope=scope, key=THRESHOLDS_KEY, value=value)
        if score is None:
            text = say("moderation.threshold.cleared", locale, category=category)
        else:
            text = say("moderation.threshold.set", locale, category=category, score=f"{score:g}")
        await ctx.respond(text, ephemeral=True)

    async def moderation_log(
        self, ctx: lightbulb.Context, *, channel: hikari.PartialChannel | None
    ) -> None:
        """Sets (or, with no channel, clears) where flagged messages are reported."""
        if (scope := await self.server_scope(ctx, admin=True)) is None:
            return
        locale = str(ctx.interaction.locale)
        if channel is not None and channel.type not in _LOG_CHANNELS:
            await ctx.respond(say("moderation.log.bad", locale), ephemeral=True)
            return
        value = "" if channel is None else str(channel.id)
        await self.publish(ctx, SessionSettings, scope=scope, key=LOG_KEY, value=value)
        if channel is None:
            text = say("moderation.log.cleared", locale)
        else:
            text = say("moderation.log.set", locale, channel=value)
        await ctx.respond(text, ephemeral=True)

    def _policy(self, scope: str) -> ServerPolicy:
        return ServerPolicy.in_view(self.view, scope)

    async def server_scope(self, ctx: lightbulb.Context, *, admin: bool = False) -> str | None:
        """The server's scope (``guild:<id>``) when the person may do this here; else None,
        and they are told why."""
        if not await self.may_talk(ctx):
            return None
        locale = str(ctx.interaction.locale)
        if ctx.guild_id is None:
            await ctx.respond(say("guild.only", locale), ephemeral=True)
            return None
        if admin and not self.access.is_admin(*rights(ctx)):
            await ctx.respond(say("refused.admin", locale), ephemeral=True)
            return None
        return f"guild:{ctx.guild_id}"

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
        if not self.access.is_admin(*rights(ctx)):
            await ctx.respond(say("refused.admin", locale), ephemeral=True)
            return
        value = "" if clear else well_formed(value).strip()
        if key == "model" and value and not _MODEL_NAME.match(value):
            await ctx.respond(say("model.bad", locale), ephemeral=True)
            return
        await self.publish(ctx, SessionSettings, scope=scope, key=key, value=value)
        text = say("cleared", locale) if not value else say(f"{key}.set", locale, value=value)
        await ctx.respond(text, ephemeral=True)

    async def may_talk(self, ctx: lightbulb.Context, *, place: str = "") -> bool:
        """Whether the access lists let this person use Libra here (or in channel ``place``, a
        voice channel to join, say); if not, they are told."""
        channel, thread = _where(ctx)
        roles = frozenset(str(r) for r in ctx.member.role_ids) if ctx.member else frozenset()
        speaker = Speaker(
            user=str(ctx.user.id),
            guild=str(ctx.guild_id or ""),
            channel=place or thread or channel,
            parent=channel if thread and not place else "",
            roles=roles,
        )
        if self.access.may_talk(speaker):
            return True
        await ctx.respond(say("refused.access", str(ctx.interaction.locale)), ephemeral=True)
        return False

    async def publish(self, ctx: lightbulb.Context, cls: type[Event], **fields: object) -> None:
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


def rights(ctx: lightbulb.Context) -> tuple[hikari.Permissions, list[str]]:
    """The permissions and roles of the person who ran the command (none in a DM)."""
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


moderation = lightbulb.Group("moderation", "moderation.desc", localize=True)


@moderation.register
class ModerationShow(
    lightbulb.SlashCommand,
    name="moderation.show",
    description="moderation.show.desc",
    localize=True,
):
    @lightbulb.invoke
    async def invoke(self, ctx: lightbulb.Context, run: SlashCommands = INJECTED) -> None:
        await run.moderation_show(ctx)


@moderation.register
class ModerationCategories(
    lightbulb.SlashCommand,
    name="moderation.categories",
    description="moderation.categories.desc",
    localize=True,
):
    listed = lightbulb.string(
        "moderation.categories.list",
        "moderation.categories.list.desc",
        max_length=200,
        localize=True,
    )

    @lightbulb.invoke
    async def invoke(self, ctx: lightbulb.Context, run: SlashCommands = INJECTED) -> None:
        await run.moderation_categories(ctx, listed=self.listed)


@moderation.register
class ModerationThreshold(
    lightbulb.SlashCommand,
    name="moderation.threshold",
    description="moderation.threshold.desc",
    localize=True,
):
    category = lightbulb.string(
        "moderation.threshold.category",
        "moderation.threshold.category.desc",
        choices=[lightbulb.Choice(c, c) for c in SERVER_CATEGORIES],
        localize=True,
    )
    score = lightbulb.number(
        "moderation.threshold.score",
        "moderation.threshold.score.desc",
        default=None,
        min_value=0.0,
        max_value=1.0,
        localize=True,
    )

    @lightbulb.invoke
    async def invoke(self, ctx: lightbulb.Context, run: SlashCommands = INJECTED) -> None:
        await run.moderation_threshold(ctx, category=self.category, score=self.score)


@moderation.register
class ModerationLogChannel(
    lightbulb.SlashCommand, name="moderation.log", description="moderation.log.desc", localize=True
):
    channel = lightbulb.channel(
        "moderation.log.channel",
        "moderation.log.channel.desc",
        default=None,
        channel_types=list(_LOG_CHANNELS),
        localize=True,
    )

    @lightbulb.invoke
    async def invoke(self, ctx: lightbulb.Context, run: SlashCommands = INJECTED) -> None:
        await run.moderation_log(ctx, channel=self.channel)


class Stats(lightbulb.SlashCommand, name="stats", description="stats.desc", localize=True):
    @lightbulb.invoke
    async def invoke(self, ctx: lightbulb.Context, run: SlashCommands = INJECTED) -> None:
        await run.stats(ctx)


class Help(lightbulb.SlashCommand, name="help", description="help.desc", localize=True):
    @lightbulb.invoke
    async def invoke(self, ctx: lightbulb.Context, run: SlashCommands = INJECTED) -> None:
        await run.help(ctx)


COMMANDS = (chat, Reset, Model, Persona, moderation, Stats, Help)


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
