"""Libra in a Discord voice channel: the commands, capture into the log, replies played back.

hikari talks to the loopback Discord (``ops/fakes/discord.py``), which sends it to the loopback
voice server (``ops/fakes/discord_voice.py``, over TLS as hikari's ``wss://`` requires); the
server's simulated members speak espeak-ng through Opus, DAVE and transport encryption, and hear
what Libra plays. NATS, PostgreSQL and Redis are real.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import hikari
import msgspec
import numpy as np
import pytest
import redis.asyncio as aioredis

from libra.contracts import (
    AnyEvent,
    Origin,
    ReplyDelivered,
    SessionVoice,
    TtsSynthesized,
    VoiceCaptured,
    VoiceEnded,
    conversation_id,
    decode_event,
    make,
)
from libra.gateway.discord.gateway import DiscordGateway
from libra.gateway.discord.voice.opus import encode_pcm
from libra.gateway.discord.voice.rtp import OPUS_SILENCE
from libra.ops.fakes import discord_voice
from libra.ops.fakes.discord import MANAGE_GUILD, FakeDiscord, FakeUser, Interaction
from libra.ops.fakes.discord_voice import FakeMember, FakeVoiceServer
from libra.ops.fakes.groq_whisper import FakeGroqWhisper
from libra.ops.fakes.llm_wire import Behaviour, FakeLlmWire
from libra.runtime.audio import AudioStore, resample_pcm
from libra.runtime.config import Settings
from libra.runtime.eventlog import EventLog

from .stack import running
from .test_discord_voice_call import decode_heard, in_sync, mono, similarity, speech

pytestmark = pytest.mark.timeout(60)

tls = functools.cache(discord_voice.self_signed_tls)  # the voice server's, and one trusting it


@dataclass
class Room:
    """A server with a text channel for the commands and a voice channel with its server."""

    fake: FakeDiscord
    server: FakeVoiceServer
    guild: int
    text: int
    channel: int
    alice: FakeUser
    bob: FakeUser
    gateway: DiscordGateway | None = None

    @property
    def conversation(self) -> str:
        return conversation_id("discord", self.guild, self.channel)

    @property
    def origin(self) -> Origin:
        return Origin(platform="discord", guild=str(self.guild), channel=str(self.channel))

    async def enter(self, user: FakeUser) -> FakeMember:
        """``user`` joins the voice channel: Discord's voice state, and the call itself."""
        await self.fake.move_voice(user, self.guild, self.channel)
        return await self.server.join(user.id)

    async def command(self, name: str, user: FakeUser, **kwargs: Any) -> Interaction:
        """Runs a slash command; returns once Libra has answered it."""
        interaction = await self.fake.invoke(name, channel_id=self.text, user=user, **kwargs)
        await self.fake.wait_for(
            lambda: (
                interaction.response is not None
                and (interaction.response.get("type") != 5 or bool(interaction.followups))
            ),
            timeout=15,
        )
        return interaction

    async def joined(self, user: FakeUser) -> Interaction:
        """``user`` runs /join; returns once Libra is in the call and in its DAVE group."""
        done = await self.command("join", user)
        assert self.gateway is not None
        call = self.gateway.voice.call(self.guild)
        assert call is not None and call.connection is not None, done.content
        await until(lambda: in_sync(self.server, call.connection.session), "the DAVE group")
        return done


async def until(condition: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def read(log: EventLog, subject: str) -> list[AnyEvent]:
    """Every event the log holds on ``subject`` (without waiting out a timeout at the end)."""
    info = await log.js.stream_info("LIBRA", subjects_filter=subject)
    if not sum((info.state.subjects or {}).values()):
        return []
    sub = await log.js.subscribe(subject, stream="LIBRA", ordered_consumer=True)
    found: list[AnyEvent] = []
    try:
        while True:
            msg = await sub.next_msg(timeout=5)
            found.append(decode_event(msg.data))
            if msg.metadata.num_pending == 0:
                return found
    finally:
        await sub.unsubscribe()


async def logged(log: EventLog, subject: str, kind: type, count: int = 1, timeout: float = 10.0):
    """Waits until the log holds ``count`` events of ``kind`` on ``subject``; returns them all."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in await read(log, subject) if isinstance(e, kind)]
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(found)} of {count} {kind.__name__} in the log")
        await asyncio.sleep(0.05)


def voiced(member: FakeMember) -> list[float]:
    """When each frame of Libra's speech (not the silence after it) reached ``member``."""
    return [h.arrived for h in member.heard if h.opus != OPUS_SILENCE]


def frames_of(text: str) -> list[bytes]:
    return encode_pcm(speech(text), bitrate=64_000)


def as_captured(pcm48k_stereo: bytes) -> np.ndarray:
    """Speech as a capture stores it: 16 kHz mono."""
    pcm = resample_pcm(pcm48k_stereo, rate=48_000, channels=2, to_rate=16_000, to_channels=1)
    return np.frombuffer(pcm, np.int16).astype(float)


@contextlib.asynccontextmanager
async def room(settings: Settings, database_url: str, **overrides: Any) -> AsyncIterator[Room]:
    """The room, and Libra's Discord gateway connected to it."""
    tls_server, tls_client = tls()
    async with FakeDiscord() as fake:
        guild = fake.add_guild()
        text, channel = fake.add_channel(guild, "chat"), fake.add_voice_channel(guild, "lounge")
        async with FakeVoiceServer(guild_id=guild, channel_id=channel, tls=tls_server) as server:
            fake.voice_server(channel, server.endpoint, server.token)
            found = Room(fake, server, guild, text, channel, fake.user("alice"), fake.user("bob"))
            configured = msgspec.structs.replace(
                settings, discord_token=fake.token, discord_rest_url=fake.rest_url, **overrides
            )
            log = await EventLog.connect(configured.nats_url, name="test-discord-voice")
            pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
            redis = aioredis.from_url(configured.redis_url)
            found.gateway = DiscordGateway(configured, log, pool, redis, voice_ssl=tls_client)
            task = asyncio.create_task(found.gateway.run())
            try:
                async with asyncio.timeout(20):
                    await found.gateway.ready.wait()
                yield found
            finally:
                await found.gateway.stop()
                await asyncio.wait_for(task, 30)
                await log.close()
                await pool.close()
                await redis.aclose()


async def store_clip(log: EventLog, name: str, pcm: bytes):
    audio = await AudioStore.open(log)
    return await audio.put(name, pcm, format="pcm_s16le", sample_rate=48_000, channels=2)


async def publish_clip(
    log: EventLog, r: Room, turn: str, index: int, pcm: bytes, *, final: bool
) -> TtsSynthesized:
    clip = make(
        TtsSynthesized,
        conversation=r.conversation,
        user=f"discord:{r.alice.id}",
        turn=turn,
        audio=await store_clip(log, f"tts/{r.conversation}/{turn}-{index}", pcm),
        index=index,
        text="",
        engine="test",
        final=final,
        origin=r.origin,
    )
    await log.publish(clip)
    return clip


# --- joining and leaving ---------------------------------------------------------------------


async def test_join_connects_with_dave_and_leave_leaves_both_logged(
    settings: Settings, eventlog: EventLog, database_url: str
) -> None:
    async with room(settings, database_url) as r:
        await r.enter(r.alice)
        done = await r.joined(r.alice)
        assert f"<#{r.channel}>" in done.content and not done.ephemeral
        assert r.fake.voice_updates == [(r.guild, r.channel)]
        assert r.server.identifies == 1 and r.server.epoch is not None
        assert r.server.commits and r.server.connected
        [joined] = await logged(eventlog, "libra.session.voice.>", SessionVoice)
        assert (joined.state, joined.user, joined.channel) == (
            "joined",
            f"discord:{r.alice.id}",
            str(r.channel),
        )
        assert joined.conversation == r.conversation and joined.origin.guild == str(r.guild)

        left = await r.command("leave", r.alice)
        assert left.content == f"Left <#{r.channel}>."
        await until(lambda: r.fake.voice_updates[-1] == (r.guild, None), "Libra to leave")
        await until(lambda: not r.server.connected, "Libra to hang up")
        assert r.gateway.voice.call(r.guild) is None
        events = await logged(eventlog, "libra.session.voice.>", SessionVoice, 2)
        assert [(e.state, e.user) for e in events] == [
            ("joined", f"discord:{r.alice.id}"),
            ("left", f"discord:{r.alice.id}"),
        ]


async def test_join_is_refused_to_someone_not_in_a_voice_channel(
    settings: Settings, eventlog: EventLog, database_url: str
) -> None:
    async with room(settings, database_url) as r:
        refused = await r.command("join", r.bob)
        assert refused.ephemeral
        assert refused.content == "Join a voice channel first, then use /join there."
        korean = await r.command("join", r.bob, locale="ko")
        assert korean.content == "먼저 음성 채널에 들어간 다음 /join을 써 주세요."
        assert r.fake.voice_updates == [] and r.server.identifies == 0
        assert await read(eventlog, "libra.session.>") == []


async def test_leave_and_voice_are_for_people_in_the_call_or_admins(
    settings: Settings, eventlog: EventLog, database_url: str
) -> None:
    manual = [{"type": 1, "name": "manual"}]
    async with room(settings, database_url) as r:
        await r.enter(r.alice)
        await r.joined(r.alice)
        for name, options in (("leave", None), ("voice", manual)):
            refused = await r.command(name, r.bob, options=options)  # bob is in no call
            assert refused.ephemeral and refused.content == f"Join me in <#{r.channel}> first."
        assert r.gateway.voice.call(r.guild) is not None
        switched = await r.command("voice", r.alice, options=manual)  # alice is in the call
        assert switched.content.startswith("Voice mode: manual.")
        left = await r.command("leave", r.bob, permissions=MANAGE_GUILD)  # an admin may
        assert left.content == f"Left <#{r.channel}>."
        events = await logged(eventlog, "libra.session.voice.>", SessionVoice, 3)
        assert [(e.state, e.user) for e in events] == [
            ("joined", f"discord:{r.alice.id}"),
            ("manual", f"discord:{r.alice.id}"),
            ("left", f"discord:{r.bob.id}"),
        ]


async def test_join_is_refused_where_the_voice_channel_is_blocked(
    settings: Settings, eventlog: EventLog, database_url: str, tmp_path
) -> None:
    rules = tmp_path / "access.toml"
    async with room(settings, database_url, discord_access_file=str(rules)) as r:
        rules.write_text(f"[block]\nchannels = [{r.channel}]\n")  # the call, not the text chat
        await r.fake.move_voice(r.alice, r.guild, r.channel)
        refused = await r.command("join", r.alice)
        assert refused.ephemeral and refused.content == "Libra isn't available to you here."
        assert r.fake.voice_updates == [] and r.server.identifies == 0
        assert await read(eventlog, "libra.session.>") == []


async def test_libra_dragged_into_another_channel_follows_in_the_same_mode(
    settings: Settings, eventlog: EventLog, database_url: str
) -> None:
    async with room(settings, database_url) as r:
        await r.enter(r.alice)
        await r.joined(r.alice)
        await r.command("voice", r.alice, options=[{"type": 1, "name": "manual"}])
        elsewhere = r.fake.add_voice_channel(r.guild, "elsewhere")
        tls_server, _ = tls()
        async with FakeVoiceServer(guild_id=r.guild, channel_id=elsewhere, tls=tls_server) as other:
            r.fake.voice_server(elsewhere, other.endpoint, other.token)
            await other.join(r.alice.id)
            await r.fake.move_voice(r.fake.bot, r.guild, elsewhere)
            await until(lambda: _call_in(r, elsewhere), "Libra in the other channel")
            call = r.gateway.voice.call(r.guild)
            await until(lambda: in_sync(other, call.connection.session), "its DAVE group")
            assert not call.automatic  # still manual, as it was set
            assert not r.server.connected and other.connected
            events = await logged(eventlog, "libra.session.voice.>", SessionVoice, 4)
        assert [(e.state, e.channel) for e in events] == [
            ("joined", str(r.channel)),
            ("manual", str(r.channel)),
            ("left", str(r.channel)),
            ("joined", str(elsewhere)),
        ]
        assert events[-1].conversation == conversation_id("discord", r.guild, elsewhere)


def _call_in(r: Room, channel: int) -> bool:
    call = r.gateway.voice.call(r.guild)
    return call is not None and call.channel == channel and call.connection is not None


async def test_libra_dragged_into_a_channel_closed_to_it_leaves(
    settings: Settings, eventlog: EventLog, database_url: str, tmp_path
) -> None:
    rules = tmp_path / "access.toml"
    async with room(settings, database_url, discord_access_file=str(rules)) as r:
        await r.enter(r.alice)
        await r.joined(r.alice)
        elsewhere = r.fake.add_voice_channel(r.guild, "elsewhere")
        rules.write_text(f"[block]\nchannels = [{elsewhere}]\n")
        await until(
            lambda: not r.gateway.access.channel_open(str(r.guild), str(elsewhere)), "rules"
        )
        await r.fake.move_voice(r.fake.bot, r.guild, elsewhere)
        await until(lambda: r.fake.voice_updates[-1] == (r.guild, None), "Libra to leave")
        assert r.gateway.voice.call(r.guild) is None
        events = await logged(eventlog, "libra.session.voice.>", SessionVoice, 2)
        assert [(e.state, e.channel) for e in events] == [
            ("joined", str(r.channel)),
            ("left", str(r.channel)),
        ]


async def test_an_empty_channel_is_left_after_the_configured_time(
    settings: Settings, eventlog: EventLog, database_url: str
) -> None:
    async with room(settings, database_url, discord_voice_leave_empty_sec=0.6) as r:
        await r.enter(r.alice)
        await r.enter(r.bob)
        await r.joined(r.alice)
        await r.server.leave(r.alice.id)
        await asyncio.sleep(0.9)  # Bob is still there: Libra stays
        assert r.server.connected and r.gateway.voice.call(r.guild) is not None
        await r.server.leave(r.bob.id)
        emptied = time.monotonic()
        await until(lambda: r.fake.voice_updates[-1] == (r.guild, None), "Libra to leave", 5)
        waited = time.monotonic() - emptied
        assert 0.6 <= waited < 1.5, waited
        await until(lambda: not r.server.connected, "Libra to hang up")
        events = await logged(eventlog, "libra.session.voice.>", SessionVoice, 2)
        assert [(e.state, e.user) for e in events] == [
            ("joined", f"discord:{r.alice.id}"),
            ("left", ""),
        ]


# --- hearing ---------------------------------------------------------------------------------


async def test_speech_becomes_a_capture_of_its_speaker(
    settings: Settings, eventlog: EventLog, database_url: str
) -> None:
    said = "What is the weather like in Seoul today"
    async with room(settings, database_url) as r:
        alice = await r.enter(r.alice)
        await r.joined(r.alice)
        await alice.speak(frames_of(said), interval=0.01)
        [ended] = await logged(eventlog, "libra.voice.ended.>", VoiceEnded)
        captures = await logged(eventlog, "libra.voice.captured.>", VoiceCaptured)
    turn = next(c for c in captures if c.id == ended.captured)
    assert {c.user for c in captures} == {f"discord:{r.alice.id}"}
    assert turn.conversation == r.conversation and turn.mode == "auto"
    assert (turn.origin.platform, turn.origin.guild, turn.origin.channel) == (
        "discord",
        str(r.guild),
        str(r.channel),
    )
    heard = np.frombuffer(await (await AudioStore.open(eventlog)).get(turn.audio), np.int16)
    spoken = as_captured(speech(said))
    assert abs(len(heard) - len(spoken)) < 16_000 * 0.6  # preroll and trailing silence at most
    assert similarity(heard.astype(float), spoken) > 0.8


async def test_two_people_speaking_at_once_are_two_captures_with_the_right_users(
    settings: Settings, eventlog: EventLog, database_url: str
) -> None:
    first, second = "The quick brown fox jumps over the lazy dog", "Seven silver swans swam seaward"
    async with room(settings, database_url) as r:
        alice, bob = await r.enter(r.alice), await r.enter(r.bob)
        await r.joined(r.alice)
        await asyncio.gather(
            alice.speak(frames_of(first), interval=0.01),
            bob.speak(frames_of(second), interval=0.01),
        )
        ends = await logged(eventlog, "libra.voice.ended.>", VoiceEnded, 2)
        captures = {c.id: c for c in await read(eventlog, "libra.voice.>")}
    turns = {captures[e.captured].user: captures[e.captured] for e in ends}
    assert set(turns) == {f"discord:{r.alice.id}", f"discord:{r.bob.id}"}
    audio = await AudioStore.open(eventlog)
    heard = {
        user: np.frombuffer(await audio.get(c.audio), np.int16).astype(float)
        for user, c in turns.items()
    }
    a, b = f"discord:{r.alice.id}", f"discord:{r.bob.id}"
    assert similarity(heard[a], as_captured(speech(first))) > 0.8
    assert similarity(heard[b], as_captured(speech(second))) > 0.8
    assert similarity(heard[a], as_captured(speech(second))) < 0.3


async def test_record_and_stop_in_manual_mode_give_one_manual_capture(
    settings: Settings, eventlog: EventLog, database_url: str
) -> None:
    async with room(settings, database_url) as r:
        alice = await r.enter(r.alice)
        await r.joined(r.alice)
        mode = await r.command("voice", r.alice, options=[{"type": 1, "name": "manual"}])
        assert mode.content.startswith("Voice mode: manual")
        await logged(eventlog, "libra.session.voice.>", SessionVoice, 2)
        call = r.gateway.voice.call(r.guild)
        # The call applies the mode as it comes back from the log.
        await until(lambda: call is not None and not call.automatic, "manual mode")
        await alice.speak(frames_of("Nobody asked me anything yet"), interval=0.005)
        await asyncio.sleep(1.0)
        assert await read(eventlog, "libra.voice.>") == []

        recording = await r.command("record", r.alice)
        assert recording.ephemeral and recording.content == "Recording: speak, then use /stop."
        await logged(eventlog, "libra.session.voice.>", SessionVoice, 3)
        await asyncio.sleep(0.2)
        await alice.speak(frames_of("First part of my question"), interval=0.005)
        await asyncio.sleep(0.8)  # a pause that would end a turn in automatic mode
        await alice.speak(frames_of("and the second part"), interval=0.005)
        stopped = await r.command("stop", r.alice)
        assert stopped.content == "Got it; answering."
        [captured] = await logged(eventlog, "libra.voice.captured.>", VoiceCaptured)
        await asyncio.sleep(0.5)
        events = await read(eventlog, "libra.voice.>")
        states = [e.state for e in await read(eventlog, "libra.session.>")]
    assert events == [captured]  # one capture, and no voice.ended: nothing to confirm
    assert captured.mode == "manual" and not captured.speculative
    assert captured.user == f"discord:{r.alice.id}"
    assert captured.audio.duration_ms > 2000  # both parts: more than a VAD cut would hold
    assert states == ["joined", "manual", "recording", "stopped"]


# --- speaking --------------------------------------------------------------------------------


async def test_a_published_clip_is_heard_by_the_member_and_delivered(
    settings: Settings, eventlog: EventLog, database_url: str
) -> None:
    said = speech("Good evening. It is a quarter past seven.")
    async with room(settings, database_url) as r:
        alice = await r.enter(r.alice)
        await r.joined(r.alice)
        clip = await publish_clip(eventlog, r, "01J0000000000000000000TURN", 0, said, final=True)
        [receipt] = await logged(eventlog, "libra.reply.delivered.>", ReplyDelivered)
    arrived = voiced(alice)
    assert len(arrived) * 960 * 4 >= len(said)  # every 20 ms of the clip
    assert abs(arrived[-1] - arrived[0] - 0.02 * (len(arrived) - 1)) < 0.1  # at real-time pace
    assert similarity(decode_heard(alice), mono(said)) > 0.9
    assert (receipt.turn, receipt.causation, receipt.user) == (
        clip.turn,
        clip.id,
        f"discord:{r.alice.id}",
    )
    assert receipt.modality == "voice" and receipt.clips == 1 and not receipt.interrupted
    assert receipt.conversation == r.conversation


async def test_barge_in_stops_playback_within_200ms_and_logs_the_reply_interrupted(
    settings: Settings, eventlog: EventLog, database_url: str
) -> None:
    long = speech("This is a long answer that nobody wants to hear until the very end of it.")
    turn = "01J0000000000000000000TURN"
    async with room(settings, database_url) as r:
        alice = await r.enter(r.alice)
        await r.joined(r.alice)
        await publish_clip(eventlog, r, turn, 0, long, final=False)
        await until(lambda: len(voiced(alice)) >= 25, "half a second of Libra's answer")
        interrupting = asyncio.create_task(alice.speak(frames_of("Wait, stop")))
        started = time.perf_counter()
        [receipt] = await logged(eventlog, "libra.reply.delivered.>", ReplyDelivered)
        await publish_clip(eventlog, r, turn, 1, long, final=True)  # the rest of the reply
        await interrupting
        await asyncio.sleep(0.5)
        receipts = await logged(eventlog, "libra.reply.delivered.>", ReplyDelivered)
    arrived = voiced(alice)
    assert arrived[-1] - started < 0.2
    assert len(arrived) * 960 * 4 < len(long) / 2  # cut short, and the rest never played
    assert receipts == [receipt]
    assert receipt.interrupted and receipt.clips == 1 and receipt.turn == turn
    assert r.server.bot_speaking[-1][1] == 0


# --- the whole way round ---------------------------------------------------------------------


async def test_a_spoken_question_is_answered_aloud_in_the_channel(
    settings: Settings, eventlog: EventLog, database_url: str, pool: asyncpg.Pool
) -> None:
    answer = "It is seven in the evening."
    async with (
        FakeGroqWhisper(transcript="What time is it?") as whisper,
        FakeLlmWire(reply=Behaviour.ok(answer)) as wire,
    ):
        stack = msgspec.structs.replace(
            settings,
            groq_api_key="gsk-test",
            groq_base_url=whisper.url,
            asr_engines="groq",
            openai_api_key="sk-test",
            openai_base_url=wire.env()["OPENAI_BASE_URL"],
            llm_providers="openai",
            llm_cache_enabled=False,
            tts_engines="espeak",
        )
        components = ["asr", "turns", "llm", "tts", "turns-projection"]
        async with running(stack, components), room(stack, database_url) as r:
            alice = await r.enter(r.alice)
            await r.joined(r.alice)
            await alice.speak(frames_of("What time is it"), interval=0.01)
            [receipt] = await logged(
                eventlog, "libra.reply.delivered.>", ReplyDelivered, timeout=20
            )
            row = None
            async with asyncio.timeout(10):
                while row is None or row["status"] != "delivered":
                    await asyncio.sleep(0.05)
                    row = await pool.fetchrow("SELECT * FROM turns WHERE turn = $1", receipt.turn)
    assert (
        receipt.user == f"discord:{r.alice.id}" and not receipt.interrupted and receipt.clips >= 1
    )
    assert row["modality"] == "voice" and row["interrupted"] is False
    clips = [
        e
        for e in await read(eventlog, "libra.tts.>")
        if isinstance(e, TtsSynthesized) and e.turn == receipt.turn
    ]
    spoken_ms = sum(c.audio.duration_ms for c in clips)
    assert "".join(c.text for c in clips).strip() == answer
    assert abs(len(voiced(alice)) * 20 - spoken_ms) <= 20 * len(clips) + 40


async def test_a_speaker_the_cache_lacks_is_judged_by_their_roles_fetched_from_discord(
    fake: FakeDiscord, tmp_path
) -> None:
    from libra.gateway.discord.access import AccessPolicy
    from libra.gateway.discord.voice_calls import VoiceCalls

    guild = fake.add_guild()
    muted, friends = fake.add_role(guild, "muted"), fake.add_role(guild, "friends")
    alice, mallory = fake.user("alice"), fake.user("mallory")
    fake.member_roles[(guild, alice.id)] = (friends,)
    fake.member_roles[(guild, mallory.id)] = (muted,)
    rules = tmp_path / "access.toml"
    # The bot never connects: its cache is empty, and only REST can say who is who.
    bot = hikari.GatewayBot(
        fake.token,
        rest_url=fake.rest_url,
        banner=None,
        logs=None,
        suppress_optimization_warning=True,
    )
    access = AccessPolicy(file=str(rules), recheck_s=0)
    calls = VoiceCalls(bot, None, Settings.from_env({}), access)  # type: ignore[arg-type]
    assert calls._may_hear(guild, 2, alice.id) is True  # no lists: no need to know the roles
    rules.write_text(f'[block]\nroles = ["{muted}"]\n')
    bot.rest.start()
    try:
        assert await calls._may_hear(guild, 2, alice.id) is True
        assert await calls._may_hear(guild, 2, mallory.id) is False  # the cache miss: asked
        members = rf"/guilds/{guild}/members/\d+"
        assert len(fake.calls_to("GET", members)) == 2
        # Known for a while: the next talk spurts ask Discord no more.
        assert calls._may_hear(guild, 2, alice.id) is True
        assert calls._may_hear(guild, 2, mallory.id) is False
        assert len(fake.calls_to("GET", members)) == 2
    finally:
        await bot.rest.close()
    # Discord unreachable: someone unknown is not heard where roles are listed.
    stranger = fake.user("stranger")
    assert await calls._may_hear(guild, 2, stranger.id) is False


async def test_a_speakers_frames_wait_for_their_roles_and_are_heard_or_dropped(
    settings: Settings, eventlog: EventLog
) -> None:
    from libra.gateway.discord.voice_call import VoiceCall
    from libra.gateway.voice import segmenter_config

    verdicts: dict[int, asyncio.Future[bool]] = {}

    def may_hear(user: int) -> asyncio.Future[bool]:
        verdicts[user] = asyncio.get_running_loop().create_future()
        return verdicts[user]

    call = VoiceCall(
        eventlog,
        await AudioStore.open(eventlog),
        guild=1,
        channel=2,
        segmenter=segmenter_config(settings),
        on_empty=lambda _: None,
        may_hear=may_hear,
    )
    stereo = speech("What is the weather like in Seoul today")
    said = as_captured(stereo)
    pcm = resample_pcm(stereo, rate=48_000, channels=2, to_rate=48_000, to_channels=1)
    frames = [pcm[i : i + 1920] for i in range(0, len(pcm), 1920)]
    for user in (3, 4):
        call.on_speaking(user, True)
        for frame in frames[:50]:  # a second of speech while Discord is asked who they are
            call.on_frame(user, frame, 0)
    verdicts[3].set_result(True)
    verdicts[4].set_result(False)
    await asyncio.sleep(0)  # the verdicts are applied as the calls' tasks resume
    for frame in frames[50:]:
        for user in (3, 4):
            call.on_frame(user, frame, 0)
    await call.close()
    [captured] = await logged(eventlog, "libra.voice.captured.>", VoiceCaptured)
    assert captured.user == "discord:3"  # the one whose roles let them in; all they said
    heard = np.frombuffer(await (await AudioStore.open(eventlog)).get(captured.audio), np.int16)
    assert abs(len(heard) - len(said)) < 16_000 * 0.6
    assert similarity(heard.astype(float), said) > 0.8
