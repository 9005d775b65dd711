"""Libra in a voice call, against the loopback fake of Discord's voice server.

Speech made with espeak-ng goes both ways through Opus, DAVE and transport encryption; the
fake's members run DAVE with davey or with Discord's libdave (dave.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import davey
import hikari
import numpy as np
import pytest
from hikari.events import voice_events
from hikari.impl.voice import VoiceComponentImpl

from libra.gateway.discord.voice import (
    Clip,
    LibraVoiceConnection,
    VoiceConnectError,
    VoiceOptions,
    VoiceServer,
    VoiceSession,
)
from libra.gateway.discord.voice.opus import OpusDecoder, encode_pcm
from libra.gateway.discord.voice.rtp import OPUS_SILENCE
from libra.ops.fakes import discord_voice as fake
from libra.ops.fakes.discord_voice import FakeMember, FakeVoiceServer
from libra.processors.tts.espeak import utterance

GUILD, CHANNEL = 81_000_000_000_000_001, 82_000_000_000_000_002
LIBRA, ALICE, BOB, CAROL = 7_000, 42_000, 43_000, 44_000
LIBRARIES = ["davey", "libdave"]  # libdave: dave.py, in the test extra

pytestmark = pytest.mark.timeout(60)


# --- speech --------------------------------------------------------------------------------


@functools.cache
def speech(text: str) -> bytes:
    """``text`` spoken by espeak-ng, as 48 kHz stereo s16le PCM."""
    return utterance(text, "en", rate=48_000, channels=2, words_per_minute=170)


def mono(pcm: bytes, channels: int = 2) -> np.ndarray:
    return np.frombuffer(pcm, np.int16).reshape(-1, channels).mean(axis=1)


def similarity(heard: np.ndarray, said: np.ndarray) -> float:
    """Correlation of two recordings once aligned (Opus delays and changes the waveform)."""
    n = len(heard) + len(said)
    spectrum = np.fft.rfft(heard, n) * np.conj(np.fft.rfft(said, n))
    lag = int(np.argmax(np.fft.irfft(spectrum, n)))
    lag = lag if lag < len(heard) else lag - n
    a, b = (heard[lag:], said) if lag >= 0 else (heard, said[-lag:])
    size = min(len(a), len(b))
    return float(np.corrcoef(a[:size], b[:size])[0, 1])


def spoken(member: FakeMember) -> list[bytes]:
    """The frames a member heard from Libra, without the silence frames between clips."""
    return [h.opus for h in member.heard if h.opus != OPUS_SILENCE]


def decode_heard(member: FakeMember) -> np.ndarray:
    decoder = OpusDecoder(1)
    return np.frombuffer(b"".join(decoder.decode(h.opus) for h in member.heard), np.int16).astype(
        float
    )


# --- the call --------------------------------------------------------------------------------


@dataclass
class RecordingSink:
    frames: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)
    speaking: list[tuple[int, bool]] = field(default_factory=list)
    members: list[tuple[int, bool]] = field(default_factory=list)

    def on_speaking(self, user_id: int, speaking: bool) -> None:
        self.speaking.append((user_id, speaking))

    def on_frame(self, user_id: int, pcm: bytes, rtp_timestamp: int) -> None:
        self.frames.setdefault(user_id, []).append((rtp_timestamp, pcm))

    def on_member(self, user_id: int, present: bool) -> None:
        self.members.append((user_id, present))

    def pcm(self, user_id: int) -> np.ndarray:
        joined = b"".join(pcm for _, pcm in self.frames.get(user_id, []))
        return np.frombuffer(joined, np.int16).astype(float)


async def until(condition: Callable[[], Any], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@dataclass
class Call:
    server: FakeVoiceServer
    session: VoiceSession
    sink: RecordingSink
    members: list[FakeMember]


def in_sync(server: FakeVoiceServer, session: VoiceSession) -> bool:
    """Libra and every member are in the server's current DAVE epoch, no transition pending."""
    dave = session.dave
    return server.settled and dave is not None and dave.ready and dave.epoch == server.epoch


@contextlib.asynccontextmanager
async def call(
    *,
    library: str = "davey",
    members: tuple[int, ...] = (ALICE,),
    on_end: Callable[[int | None], Any] | None = None,
    **server_options: Any,
) -> AsyncIterator[Call]:
    server = FakeVoiceServer(guild_id=GUILD, channel_id=CHANNEL, **server_options)
    await server.start()
    joined = [await server.join(user, library=library) for user in members]
    sink = RecordingSink()
    session = VoiceSession(
        guild_id=GUILD,
        channel_id=CHANNEL,
        user_id=LIBRA,
        session_id="session-1",
        server=VoiceServer(server.url, server.token),
        sink=sink,
        on_end=on_end,
    )
    try:
        await session.connect()
        await until(lambda: in_sync(server, session), "the DAVE group")
        yield Call(server, session, sink, joined)
    finally:
        await session.close()
        await server.stop()


# --- hearing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("library", LIBRARIES)
async def test_a_members_speech_reaches_the_sink_as_their_pcm(library: str) -> None:
    said = speech("Libra, what time is it in Lisbon?")
    frames = encode_pcm(said, bitrate=64_000)
    async with call(library=library) as c:
        alice = c.members[0]
        await alice.speak(frames, interval=0.005)
        await until(lambda: (ALICE, False) in c.sink.speaking, "the end of Alice's speech")
        heard = c.sink.pcm(ALICE)
        assert list(c.sink.frames) == [ALICE]
        assert len(c.sink.frames[ALICE]) == len(frames)
        assert abs(len(heard) - len(said) / 4) <= 2 * 960
        assert similarity(heard, mono(said)) > 0.9
        timestamps = [ts for ts, _ in c.sink.frames[ALICE]]
        assert all(b - a == 960 for a, b in itertools.pairwise(timestamps))
        assert c.sink.speaking == [(ALICE, True), (ALICE, False)]
        assert c.sink.members == [(ALICE, True)]
        assert c.session.stats.received == len(frames) and not c.session.stats.dropped


async def test_two_people_speaking_at_once_are_kept_apart() -> None:
    first = speech("The quick brown fox jumps over the lazy dog.")
    second = speech("Seven silver swans swam silently seaward.")
    async with call(members=(ALICE, BOB)) as c:
        alice, bob = c.members
        await asyncio.gather(
            alice.speak(encode_pcm(first, bitrate=64_000), interval=0.01),
            bob.speak(encode_pcm(second, bitrate=64_000), interval=0.01),
        )
        await until(lambda: {(ALICE, False), (BOB, False)} <= set(c.sink.speaking), "both ends")
        assert set(c.sink.frames) == {ALICE, BOB}
        assert similarity(c.sink.pcm(ALICE), mono(first)) > 0.9
        assert similarity(c.sink.pcm(BOB), mono(second)) > 0.9
        assert similarity(c.sink.pcm(ALICE), mono(second)) < 0.3
        assert similarity(c.sink.pcm(BOB), mono(first)) < 0.3


async def test_reordered_and_lost_packets_come_out_in_order_with_the_gaps_concealed() -> None:
    t = np.arange(72_000) / 48_000  # a steady tone: every frame sounds, but the lost ones
    tone = (np.sin(2 * np.pi * 330 * t) * 8000).astype(np.int16)
    said = np.repeat(tone[:, None], 2, axis=1).tobytes()
    frames = encode_pcm(said, bitrate=64_000)
    async with call() as c:
        alice = c.members[0]
        alice.announce()
        datagrams = alice.packets(frames)
        order = list(range(len(datagrams)))
        for i in range(10, len(order) - 1, 10):
            order[i], order[i + 1] = order[i + 1], order[i]
        lost = {25, 55}
        for i in order:
            if i not in lost:
                c.server.send_to_bot(datagrams[i])
                await asyncio.sleep(0.005)
        await until(lambda: (ALICE, False) in c.sink.speaking, "the end of Alice's speech")
        received = c.sink.frames[ALICE]
        assert len(received) == len(frames)
        assert all(b[0] - a[0] == 960 for a, b in itertools.pairwise(received))

        # The lost ones are rebuilt (FEC of the next packet, or libopus's concealment): the
        # tone goes on through them, where there used to be silence.
        def rms(pcm: bytes) -> float:
            return float(np.sqrt(np.mean(np.frombuffer(pcm, np.int16).astype(float) ** 2)))

        for i in lost:
            assert rms(received[i][1]) > 0.3 * rms(received[i - 1][1]) > 0
        assert c.session.stats.received == len(frames) - len(lost)
        assert not c.session.stats.dropped
        assert similarity(c.sink.pcm(ALICE), mono(said)) > 0.85


def _stranger_frame(opus: bytes) -> bytes:
    """A DAVE frame from "Alice" under a key of another group: authentic-looking, wrong key."""
    sender = fake.ExternalSender()
    stranger, other = davey.DaveSession(1, ALICE, CHANNEL), davey.DaveSession(1, 1, CHANNEL)
    for session in (stranger, other):
        session.set_external_sender(sender.package)
    add = sender.add(other.get_serialized_key_package())
    proposal = sender.proposal(CHANNEL.to_bytes(8, "big"), 0, add)
    result = stranger.process_proposals(
        davey.ProposalsOperationType.append, fake.mls_vector(proposal), None
    )
    stranger.process_commit(result.commit)
    stranger.prepare_transition(0, 1)
    return stranger.encrypt_opus(opus)


async def test_garbage_wrong_keys_and_truncated_packets_are_dropped_and_counted() -> None:
    frames = encode_pcm(speech("Testing one two three."), bitrate=64_000)
    async with call() as c:
        alice, bot = c.members[0], c.server.bot
        alice.announce()
        good = alice.packets(frames[:3])
        header = struct.pack(">BBHII", 0x80, 0x78, 500, 480_000, alice.ssrc)
        tampered = bytearray(good[1])
        tampered[20] ^= 0xFF
        bad = {
            "short": [b"\x80", b"\x80\x78\x00\x07\x01"],  # (random bytes may read as RTCP)
            # version 1, and a second byte that is not RTCP (200-204) either
            "not_rtp": [b"\x40\x11" + os.urandom(39)],
            "rtcp": [b"\x81\xc9" + os.urandom(30)],
            "unknown_ssrc": [struct.pack(">BBHII", 0x80, 0x78, 1, 1, 424242) + os.urandom(40)],
            "decrypt_failed": [
                fake.seal_rtp(bot.mode, os.urandom(32), 77, header, os.urandom(40)),
                bytes(tampered),
            ],
            "truncated": [good[2][:14], good[2][:30]],
            "dave_decrypt_failed": [
                fake.seal_rtp(bot.mode, bot.key, 78, header, _stranger_frame(frames[5]))
            ],
        }
        c.server.send_to_bot(good[0])
        for datagrams in bad.values():
            for datagram in datagrams:
                c.server.send_to_bot(datagram)
        c.server.send_to_bot(good[0])  # again: already played
        await alice.speak(frames[3:], interval=0.002)
        await until(lambda: (ALICE, False) in c.sink.speaking, "the end of Alice's speech")
        expected = {reason: len(datagrams) for reason, datagrams in bad.items()}
        assert c.session.stats.dropped == {**expected, "late": 1}
        assert c.session.alive
        # Frames 1 and 2 were spoiled and never came: concealed, the timeline has no hole.
        assert len(c.sink.frames[ALICE]) == len(frames)
        assert c.session.stats.received == 1 + len(frames) - 3


# --- speaking --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("library", "mode"),
    [
        ("davey", fake.MODES[0]),
        ("libdave", fake.MODES[1]),
    ],
)
async def test_a_played_clip_reaches_members_in_real_time_and_decrypts_to_the_clip(
    library: str, mode: str
) -> None:
    said = speech("Good evening. It is a quarter past seven.")
    clip = Clip.from_pcm("tts-1", said)
    async with call(library=library, modes=[mode]) as c:
        alice = c.members[0]
        started = time.perf_counter()
        played = await c.session.player.play(clip)
        await until(lambda: c.server.bot_speaking[-1][1] == 0, "speaking off")
        assert c.session.mode == mode
        assert played.frames_sent == len(clip.frames) and not played.interrupted
        voiced = [h for h in alice.heard if h.opus != OPUS_SILENCE]
        assert [h.opus for h in voiced] == list(clip.frames)
        assert [h.opus for h in alice.heard[len(voiced) :]] == [OPUS_SILENCE] * 5
        assert alice.undecryptable == 0
        sequences = [h.sequence for h in alice.heard]
        assert all((b - a) & 0xFFFF == 1 for a, b in itertools.pairwise(sequences))
        stamps = [h.timestamp for h in alice.heard]
        assert all((b - a) & 0xFFFFFFFF == 960 for a, b in itertools.pairwise(stamps))
        span = voiced[-1].arrived - voiced[0].arrived
        assert abs(span - 0.02 * (len(voiced) - 1)) < 0.05
        gaps = [b.arrived - a.arrived for a, b in itertools.pairwise(voiced)]
        assert max(gaps) < 0.045
        assert voiced[0].arrived - started < 0.1
        assert similarity(decode_heard(alice), mono(said)) > 0.9
        on, off = c.server.bot_speaking[0], c.server.bot_speaking[-1]
        # Op 5 goes out before the first packet, on another channel: they arrive about together.
        assert on[1] == 1 and on[0] - voiced[0].arrived < 0.01
        assert off[1] == 0 and off[0] >= alice.heard[-1].arrived


async def test_barge_in_stops_playback_within_200ms_and_reports_what_was_cut() -> None:
    long = Clip.from_pcm("tts-long", speech("This is a long answer that nobody wants to hear."))
    queued = Clip.from_pcm("tts-next", speech("And there is more."))
    async with call() as c:
        alice = c.members[0]
        first, second = c.session.player.play(long), c.session.player.play(queued)
        await until(lambda: len(spoken(alice)) >= 25, "half a second of the clip")
        stopped_at = time.perf_counter()
        cut = c.session.player.stop()
        await until(lambda: c.server.bot_speaking[-1][1] == 0, "speaking off")
        assert cut.clip == long and cut.dropped == (queued,)
        assert 500 <= cut.played_ms < long.duration_ms  # cut short
        assert (await first).interrupted and (await second).frames_sent == 0
        voiced = [h for h in alice.heard if h.opus != OPUS_SILENCE]
        assert voiced[-1].arrived - stopped_at < 0.2
        assert len(voiced) * 20 == cut.played_ms
        assert [h.opus for h in alice.heard[len(voiced) :]] == [OPUS_SILENCE] * 5
        assert c.server.bot_speaking[-1][0] - stopped_at < 0.2 + 0.1


# --- staying connected -----------------------------------------------------------------------


async def test_a_dropped_websocket_resumes_and_replays_what_was_missed() -> None:
    frames = encode_pcm(speech("Are you still there?"), bitrate=64_000)
    async with call(heartbeat_interval_ms=100) as c:
        server = c.server
        await until(lambda: server.seq_acks and server.seq_acks[-1] == server.bot.seq, "seq_ack")
        server.drop()
        bob = await server.join(BOB)  # while Libra is away: op 11, op 5 and DAVE go unseen
        await until(lambda: BOB in c.session.members, "Bob's client connect, replayed")
        await until(lambda: in_sync(server, c.session), "the DAVE group with Bob")
        assert (server.identifies, server.resumes) == (1, 1)
        assert c.session.stats.reconnects == {"resume": 1}
        assert c.session.dave.epoch == 2
        await bob.speak(frames, interval=0.005)
        await until(lambda: (BOB, False) in c.sink.speaking, "the end of Bob's speech")
        assert similarity(c.sink.pcm(BOB), mono(speech("Are you still there?"))) > 0.9
        await c.session.player.play(Clip.from_opus("reply", frames[:10]))
        await until(lambda: len(spoken(bob)) >= 10, "Bob hearing Libra")
        assert spoken(bob) == frames[:10]


@pytest.mark.parametrize("library", LIBRARIES)
async def test_members_joining_and_leaving_move_the_epoch_and_audio_keeps_flowing(
    library: str,
) -> None:
    frames = encode_pcm(speech("Hello everyone."), bitrate=64_000)
    # Members commit late, so Libra's own commits win and are the ones applied.
    async with call(member_commit_delay=0.3) as c:
        server, session = c.server, c.session
        alice = c.members[0]
        assert server.commits == [(LIBRA, 1)]
        carol = await server.join(CAROL, library=library)
        await until(lambda: in_sync(server, session) and server.epoch == 2, "epoch 2")
        assert server.executed == [1]
        await carol.speak(frames, interval=0.005)
        await alice.speak(frames, interval=0.005)
        await until(lambda: (ALICE, False) in c.sink.speaking, "Alice's speech")
        assert len(c.sink.frames[CAROL]) == len(c.sink.frames[ALICE]) == len(frames)
        await session.player.play(Clip.from_opus("to-both", frames))
        assert spoken(carol)[: len(frames)] == frames
        assert spoken(alice)[: len(frames)] == frames

        await server.leave(ALICE)
        await until(lambda: in_sync(server, session) and server.epoch == 3, "epoch 3")
        assert [sender for sender, _ in server.commits] == [LIBRA, LIBRA, LIBRA]
        assert session.members == {CAROL}
        assert session.dave.group == {LIBRA, CAROL}
        carol.heard.clear()
        await session.player.play(Clip.from_opus("to-carol", frames))
        assert spoken(carol)[: len(frames)] == frames
        await carol.speak(frames, interval=0.005)
        await until(lambda: len(c.sink.frames[CAROL]) == 2 * len(frames), "Carol again")
        assert carol.undecryptable == 0 and not carol.errors


@pytest.mark.parametrize("library", LIBRARIES)
async def test_libra_switches_its_sending_key_only_when_the_transition_is_executed(
    library: str,
) -> None:
    frames = encode_pcm(speech("Hello everyone."), bitrate=64_000)
    async with call(library=library, member_commit_delay=0.3) as c:
        server, session, alice = c.server, c.session, c.members[0]
        server.hold_transitions = True
        carol = await server.join(CAROL, library=library)
        await until(lambda: server.held is not None, "everyone ready for the transition")
        assert session.dave.epoch == server.epoch == 2  # Libra has applied the commit
        # Between the commit and op 22, Libra still speaks under the key everyone holds: a
        # strict member (libdave here) takes the new keys only at its own op 22.
        carol.listening = False
        await session.player.play(Clip.from_opus("between", frames))
        await until(lambda: len(spoken(alice)) >= len(frames), "Alice hearing Libra")
        assert spoken(alice)[: len(frames)] == frames and alice.undecryptable == 0

        server.release_transition()
        await until(lambda: in_sync(server, session) and not session.dave._pending, "op 22")
        alice.heard.clear()
        carol.listening = True
        await session.player.play(Clip.from_opus("after", frames))
        await until(lambda: len(spoken(carol)) >= len(frames), "Carol hearing Libra")
        assert spoken(carol)[: len(frames)] == spoken(alice)[: len(frames)] == frames
        assert alice.undecryptable == carol.undecryptable == 0


async def _read_all(server: FakeVoiceServer) -> None:
    """Waits until Libra has read every message sent so far (its heartbeat acknowledges it)."""
    sent = server.bot.seq
    await until(lambda: server.seq_acks and server.seq_acks[-1] >= sent, "Libra reading them")


async def test_a_repeated_or_broken_external_sender_leaves_the_group_as_it_is() -> None:
    frames = encode_pcm(speech("Hello everyone."), bitrate=64_000)
    async with call(heartbeat_interval_ms=100) as c:
        server, session, alice = c.server, c.session, c.members[0]
        epoch = server.epoch
        server.to_bot(fake.EXTERNAL_SENDER, server._sender.package)  # op 25 again, as libdave
        server.to_bot(fake.EXTERNAL_SENDER, b"not an external sender")  # takes a repeat: no-op
        await _read_all(server)
        assert session.dave.ready and session.dave.epoch == server.epoch == epoch
        assert server.invalid == [] and len(server.commits) == 1  # no group formed again
        await session.player.play(Clip.from_opus("still", frames))
        assert spoken(alice)[: len(frames)] == frames


@pytest.mark.parametrize("library", LIBRARIES)
async def test_libra_keeps_speaking_while_its_group_is_created_anew(library: str) -> None:
    frames = encode_pcm(speech("Still here."), bitrate=64_000)
    async with call(library=library, heartbeat_interval_ms=100) as c:
        server, session, alice = c.server, c.session, c.members[0]
        server.to_bot(fake.PREPARE_EPOCH, {"epoch": 1, "protocol_version": 1})
        await until(lambda: LIBRA in server._key_packages, "Libra's new key package")
        assert session.dave.epoch != server.epoch  # out of the group, waiting for the new one
        await session.player.play(Clip.from_opus("meanwhile", frames))
        await until(lambda: len(spoken(alice)) >= len(frames), "Alice hearing Libra")
        assert spoken(alice)[: len(frames)] == frames and alice.undecryptable == 0


async def test_a_commit_too_short_to_read_gets_op_31_and_a_fresh_key_package() -> None:
    frames = encode_pcm(speech("Still here."), bitrate=64_000)
    async with call(heartbeat_interval_ms=100) as c:
        server, session, alice = c.server, c.session, c.members[0]
        server.to_bot(fake.ANNOUNCE_COMMIT, b"\x01")  # no room for its transition id
        await until(lambda: server.invalid == [0], "op 31")  # refused, as any broken commit
        await until(lambda: LIBRA in server._key_packages, "Libra's new key package")
        assert session.dave.epoch != server.epoch  # it starts over, to be added again
        # Meanwhile it still speaks under the key in force, as libdave's encryptor does.
        await session.player.play(Clip.from_opus("meanwhile", frames))
        await until(lambda: len(spoken(alice)) >= len(frames), "Alice hearing Libra")
        assert spoken(alice)[: len(frames)] == frames and alice.undecryptable == 0


async def test_a_session_the_server_ends_or_refuses_is_over() -> None:
    ended: list[int | None] = []
    async with call(on_end=_record(ended)) as c:
        await c.server.close_websocket(4014)
        await until(lambda: not c.session.alive, "the session to end")
        assert ended == [4014] and c.session.close_code == 4014
    async with FakeVoiceServer(guild_id=GUILD, channel_id=CHANNEL) as server:
        session = VoiceSession(
            guild_id=GUILD,
            channel_id=CHANNEL,
            user_id=LIBRA,
            session_id="s",
            server=VoiceServer(server.url, "wrong-token"),
            sink=RecordingSink(),
            options=VoiceOptions(connect_timeout_sec=3),
        )
        with pytest.raises(VoiceConnectError) as refused:
            await session.connect()
        assert refused.value.close_code == 4004


def _record(into: list[int | None]) -> Callable[[int | None], Any]:
    async def record(code: int | None) -> None:
        into.append(code)

    return record


# --- through hikari --------------------------------------------------------------------------


class _Shard:
    def __init__(self) -> None:
        self.voice_states: list[tuple[int, int | None]] = []

    async def update_voice_state(self, guild: Any, channel: Any, **_: Any) -> None:
        self.voice_states.append((int(guild), None if channel is None else int(channel)))


class _Events:
    """The two gateway events hikari waits for when it joins a voice channel."""

    def __init__(self, events: list[Any]) -> None:
        self.events = events
        self.listeners: list[Any] = []

    async def wait_for(self, kind: type, /, *, timeout: Any, predicate: Any) -> Any:
        return next(e for e in self.events if isinstance(e, kind) and predicate(e))

    def subscribe(self, kind: type, callback: Any) -> None:
        self.listeners.append(callback)

    def unsubscribe(self, kind: type, callback: Any) -> None:
        self.listeners.remove(callback)


def _voice_state(channel: int | None, session_id: str = "hikari-session") -> Any:
    state = hikari.VoiceState(
        app=None,  # type: ignore[arg-type]
        channel_id=None if channel is None else hikari.Snowflake(channel),
        guild_id=hikari.Snowflake(GUILD),
        is_guild_deafened=False,
        is_guild_muted=False,
        is_self_deafened=False,
        is_self_muted=False,
        is_streaming=False,
        is_suppressed=False,
        is_video_enabled=False,
        user_id=hikari.Snowflake(LIBRA),
        member=None,
        session_id=session_id,
        requested_to_speak_at=None,
    )
    return voice_events.VoiceStateUpdateEvent(shard=None, state=state, old_state=None)  # type: ignore[arg-type]


def _server_update(server: FakeVoiceServer) -> Any:
    return voice_events.VoiceServerUpdateEvent(
        app=None,  # type: ignore[arg-type]
        shard=None,  # type: ignore[arg-type]
        guild_id=hikari.Snowflake(GUILD),
        token=server.token,
        raw_endpoint=server.endpoint,
    )


async def test_hikari_connects_follows_a_voice_server_change_and_leaves() -> None:
    tls_server, tls_client = fake.self_signed_tls()
    frames = encode_pcm(speech("Moving on."), bitrate=64_000)
    first = FakeVoiceServer(guild_id=GUILD, channel_id=CHANNEL, token="one", tls=tls_server)
    second = FakeVoiceServer(guild_id=GUILD, channel_id=CHANNEL, token="two", tls=tls_server)
    async with first, second:
        alice_one = await first.join(ALICE)
        alice_two = await second.join(ALICE)
        shard, events = _Shard(), _Events([_voice_state(CHANNEL), _server_update(first)])
        app = SimpleNamespace(
            shard_count=1,
            shards={0: shard},
            cache=SimpleNamespace(get_me=lambda: SimpleNamespace(id=hikari.Snowflake(LIBRA))),
            event_manager=events,
        )
        voice = VoiceComponentImpl(app)  # type: ignore[arg-type]
        voice.start()
        sink = RecordingSink()
        connection = await voice.connect_to(
            GUILD, CHANNEL, LibraVoiceConnection, sink=sink, ssl=tls_client
        )
        assert isinstance(connection, hikari.api.VoiceConnection) and connection.is_alive
        assert voice.connections == {GUILD: connection} and shard.voice_states == [(GUILD, CHANNEL)]
        session = connection.session
        await until(lambda: in_sync(first, session), "DAVE on the first server")
        await connection.player.play(Clip.from_opus("one", frames))
        assert spoken(alice_one)[: len(frames)] == frames

        await events.listeners[0](_server_update(second))  # hikari forwards the guild's events
        await until(lambda: session.ready.is_set() and in_sync(second, session), "the new server")
        assert not first.connected and second.identifies == 1
        assert session.stats.reconnects == {"move": 1}
        await alice_two.speak(frames, interval=0.005)
        await until(lambda: (ALICE, False) in sink.speaking, "Alice on the new server")
        assert similarity(sink.pcm(ALICE), mono(speech("Moving on."))) > 0.9
        await connection.player.play(Clip.from_opus("two", frames))
        assert spoken(alice_two)[: len(frames)] == frames

        await events.listeners[0](_voice_state(None))  # removed from the channel
        await until(lambda: not connection.is_alive, "the connection to end")
        assert voice.connections == {} and shard.voice_states[-1] == (GUILD, None)
        assert not second.connected
