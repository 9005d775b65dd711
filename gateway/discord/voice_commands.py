"""Libra's voice commands: /join, /leave, /record, /stop and /voice auto|manual.

Each one is a ``session.voice`` event in the voice channel's conversation. /join connects first
and logs ``joined`` once Libra is in the call; the others log what was decided, and the process
that holds the call applies it as the event comes back from the log (:mod:`.voice_calls`). A
command is answered by one gateway process, the first to claim its interaction in Redis.
Refusals are ephemeral and say why.
"""

from __future__ import annotations

import logging
from typing import Literal

import hikari
import lightbulb

from libra.contracts import Origin, SessionVoice, conversation_id, make, user_id
from libra.runtime.eventlog import EventLog

from .claims import TurnClaims
from .commands import SlashCommands, rights
from .strings import say
from .voice import VoiceConnectError
from .voice_calls import VoiceCalls

__all__ = ["VOICE_COMMANDS", "VoiceCommands", "register_voice_commands"]

log = logging.getLogger("libra.discord.commands")
INJECTED = lightbulb.di.INJECTED

State = Literal["joined", "left", "recording", "stopped", "auto", "manual"]


class VoiceCommands:
    """What the voice commands do: check where people are, connect, publish session events."""

    def __init__(
        self, log_: EventLog, calls: VoiceCalls, claims: TurnClaims, slash: SlashCommands
    ) -> None:
        self.log = log_
        self.calls = calls
        self.claims = claims
        self.slash = slash  # its access check is the same for every command

    async def join(self, ctx: lightbulb.Context) -> None:
        if not await self._ours(ctx):
            return
        locale = str(ctx.interaction.locale)
        guild = int(ctx.guild_id)  # _ours: in a server
        channel = self.calls.channel_of(guild, int(ctx.user.id))
        if channel is None:
            await ctx.respond(say("voice.not_in_channel", locale), ephemeral=True)
            return
        if not await self.slash.may_talk(ctx, place=str(channel)):  # the channel to be joined
            return
        call = self.calls.call(guild)
        if call is not None and call.channel == channel:
            await ctx.respond(say("voice.already", locale, channel=channel), ephemeral=True)
            return
        await ctx.defer()  # connecting may take longer than Discord waits for an answer
        try:
            await self.calls.join(guild, channel)
        except (VoiceConnectError, hikari.VoiceError, hikari.HTTPError) as exc:
            log.warning("could not join voice channel %s in %s: %s", channel, guild, exc)
            await ctx.respond(say("voice.join_failed", locale))
            return
        await self._publish(ctx, channel, "joined")
        await ctx.respond(say("voice.joined", locale, channel=channel))

    async def leave(self, ctx: lightbulb.Context) -> None:
        channel = await self._libras_channel(ctx, caller_there=not self._admin(ctx))
        if channel is None:
            return
        await self._publish(ctx, channel, "left")
        await ctx.respond(say("voice.left", str(ctx.interaction.locale), channel=channel))

    async def record(self, ctx: lightbulb.Context, *, recording: bool) -> None:
        channel = await self._libras_channel(ctx, caller_there=True)
        if channel is None:
            return
        await self._publish(ctx, channel, "recording" if recording else "stopped")
        key = "voice.recording" if recording else "voice.stopped"
        await ctx.respond(say(key, str(ctx.interaction.locale)), ephemeral=True)

    async def mode(self, ctx: lightbulb.Context, *, automatic: bool) -> None:
        channel = await self._libras_channel(ctx, caller_there=not self._admin(ctx))
        if channel is None:
            return
        state: State = "auto" if automatic else "manual"
        await self._publish(ctx, channel, state)
        await ctx.respond(say(f"voice.{state}", str(ctx.interaction.locale)))

    def _admin(self, ctx: lightbulb.Context) -> bool:
        """Server admins may end or switch a call they are not in; others only their own."""
        return self.slash.access.is_admin(*rights(ctx))

    async def _ours(self, ctx: lightbulb.Context) -> bool:
        """Claims the command for this process and checks that it may be used here."""
        if not await self.claims.claim(f"interaction:{ctx.interaction.id}"):
            return False
        if ctx.guild_id is None:
            await ctx.respond(say("guild.only", str(ctx.interaction.locale)), ephemeral=True)
            return False
        return await self.slash.may_talk(ctx)

    async def _libras_channel(
        self, ctx: lightbulb.Context, *, caller_there: bool = False
    ) -> int | None:
        """Libra's voice channel in this server; None (and the person told why) if none."""
        if not await self._ours(ctx):
            return None
        locale = str(ctx.interaction.locale)
        guild = int(ctx.guild_id)
        channel = self.calls.channel_of(guild)
        if channel is None:
            await ctx.respond(say("voice.not_joined", locale), ephemeral=True)
            return None
        if caller_there and self.calls.channel_of(guild, int(ctx.user.id)) != channel:
            await ctx.respond(say("voice.not_with_libra", locale, channel=channel), ephemeral=True)
            return None
        return channel

    async def _publish(self, ctx: lightbulb.Context, channel: int, state: State) -> None:
        guild = str(ctx.guild_id)
        await self.log.publish(
            make(
                SessionVoice,
                conversation=conversation_id("discord", guild, channel),
                user=user_id("discord", str(ctx.user.id)),
                state=state,
                channel=str(channel),
                origin=Origin(
                    platform="discord",
                    guild=guild,
                    channel=str(channel),
                    interaction=str(ctx.interaction.id),
                    locale=str(ctx.interaction.locale),
                ),
            )
        )


# --- the commands as Discord sees them ------------------------------------------------------


class Join(lightbulb.SlashCommand, name="join", description="join.desc", localize=True):
    @lightbulb.invoke
    async def invoke(self, ctx: lightbulb.Context, run: VoiceCommands = INJECTED) -> None:
        await run.join(ctx)


class Leave(lightbulb.SlashCommand, name="leave", description="leave.desc", localize=True):
    @lightbulb.invoke
    async def invoke(self, ctx: lightbulb.Context, run: VoiceCommands = INJECTED) -> None:
        await run.leave(ctx)


class Record(lightbulb.SlashCommand, name="record", description="record.desc", localize=True):
    @lightbulb.invoke
    async def invoke(self, ctx: lightbulb.Context, run: VoiceCommands = INJECTED) -> None:
        await run.record(ctx, recording=True)


class Stop(lightbulb.SlashCommand, name="stop", description="stop.desc", localize=True):
    @lightbulb.invoke
    async def invoke(self, ctx: lightbulb.Context, run: VoiceCommands = INJECTED) -> None:
        await run.record(ctx, recording=False)


voice_mode = lightbulb.Group("voice", "voice.desc", localize=True)


@voice_mode.register
class VoiceAuto(
    lightbulb.SlashCommand, name="voice.auto", description="voice.auto.desc", localize=True
):
    @lightbulb.invoke
    async def invoke(self, ctx: lightbulb.Context, run: VoiceCommands = INJECTED) -> None:
        await run.mode(ctx, automatic=True)


@voice_mode.register
class VoiceManual(
    lightbulb.SlashCommand, name="voice.manual", description="voice.manual.desc", localize=True
):
    @lightbulb.invoke
    async def invoke(self, ctx: lightbulb.Context, run: VoiceCommands = INJECTED) -> None:
        await run.mode(ctx, automatic=False)


VOICE_COMMANDS = (Join, Leave, Record, Stop, voice_mode)


def register_voice_commands(client: lightbulb.Client, commands: VoiceCommands) -> None:
    """Registers the voice commands on a lightbulb client, with ``commands`` doing their work."""
    client.di.registry_for(lightbulb.di.Contexts.DEFAULT).register_value(VoiceCommands, commands)
    for command in VOICE_COMMANDS:
        client.register(command)
