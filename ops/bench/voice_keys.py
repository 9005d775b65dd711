"""What DAVE key changes cost a call, measured on the loopback fake with Discord's libdave.

- ``frames_lost_on_key_change``: a member speaks across its own key change (a commit, then
  op 22) with a fifth of its packets arriving late by one or two places, the last frame under
  the old key among them; lost is every frame Libra did not hand to the sink decoded.
- ``gap_on_member_change_ms``: Libra speaks while one person joins and another leaves; the
  longest stretch of Libra's audio a member who stayed could not decrypt (RTP time, ms).

The fake's libdave members are strict: they take an epoch's keys only at their own op 22.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable

import numpy as np

from libra.gateway.discord.voice import Clip, VoiceServer, VoiceSession
from libra.gateway.discord.voice.opus import encode_pcm
from libra.gateway.discord.voice.rtp import FRAME_SAMPLES, SAMPLE_RATE

from ..fakes.discord_voice import FakeVoiceServer

__all__ = ["connect_settled", "frames_lost_on_key_change", "gap_on_member_change_ms", "voice_like"]

GUILD, CHANNEL, LIBRA = 1, 2, 3
ALICE, BOB, CAROL = 100, 101, 102
_REORDERED = 0.2


def voice_like(seconds: float) -> bytes:
    """A voiced, syllable-modulated tone, as 48 kHz stereo PCM (no espeak needed)."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    voice = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 12))
    syllables = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    samples = (voice * syllables * 4000).astype(np.int16)
    return np.repeat(samples[:, None], 2, axis=1).tobytes()


class _CountingSink:
    def __init__(self) -> None:
        self.frames = 0
        self.speaking: list[bool] = []

    def on_speaking(self, user_id: int, speaking: bool) -> None:
        self.speaking.append(speaking)

    def on_frame(self, user_id: int, pcm: bytes, rtp_timestamp: int) -> None:
        self.frames += 1

    def on_member(self, user_id: int, present: bool) -> None:
        pass


async def _until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def _in_sync(server: FakeVoiceServer, session: VoiceSession) -> bool:
    dave = session.dave
    return server.settled and dave is not None and dave.ready and dave.epoch == server.epoch


async def connect_settled(server: FakeVoiceServer, sink: object) -> VoiceSession:
    """Libra's session to the fake, once its DAVE group has formed."""
    session = VoiceSession(
        guild_id=GUILD,
        channel_id=CHANNEL,
        user_id=LIBRA,
        session_id="bench",
        server=VoiceServer(server.url, server.token),
        sink=sink,  # type: ignore[arg-type]
    )
    await session.connect()
    await _until(lambda: _in_sync(server, session), "the DAVE group")
    return session


def _reorder(count: int, boundary: int, rng: random.Random) -> tuple[list[int], int]:
    """Send order with a fifth of the packets one or two places late, ``boundary`` among them;
    and how many are late."""
    late = set(rng.sample(range(count - 2), round(count * _REORDERED))) | {boundary}
    order = list(range(count))
    for index in sorted(late, reverse=True):
        place = order.index(index)
        order.insert(min(place + rng.choice((1, 2)), count - 1), order.pop(place))
    return order, len(late)


async def frames_lost_on_key_change(*, seed: int = 5, library: str = "libdave") -> dict:
    """Frames of a member's speech lost across its key change, with packets reordered."""
    frames = encode_pcm(voice_like(2.0), bitrate=64_000)
    half = len(frames) // 2
    async with FakeVoiceServer(
        guild_id=GUILD, channel_id=CHANNEL, member_commit_delay=0.3
    ) as server:
        alice = await server.join(ALICE, library=library)
        sink = _CountingSink()
        session = await connect_settled(server, sink)
        try:
            epoch = server.epoch
            before = alice.packets(frames[:half])
            await server.join(CAROL, library=library)
            await _until(
                lambda: _in_sync(server, session) and server.epoch != epoch, "the key change"
            )
            datagrams = before + alice.packets(frames[half:])  # after Alice's own op 22
            order, late = _reorder(len(datagrams), half - 1, random.Random(seed))
            alice.announce()
            await asyncio.sleep(0.05)  # op 5 reaches Libra before the first packet
            for index in order:
                server.send_to_bot(datagrams[index])
                await asyncio.sleep(0.005)
            await _until(lambda: sink.speaking[-1:] == [False], "the end of the speech")
            handled = session.stats.received
        finally:
            await session.close()
    return {"frames": len(frames), "late": late, "lost": len(frames) - handled}


async def gap_on_member_change_ms(*, library: str = "libdave") -> dict:
    """The longest stretch of Libra's speech a member could not hear while others came and went."""
    frames = encode_pcm(voice_like(6.0), bitrate=64_000)
    async with FakeVoiceServer(
        guild_id=GUILD, channel_id=CHANNEL, member_commit_delay=0.3
    ) as server:
        alice = await server.join(ALICE, library=library)
        await server.join(BOB, library=library)
        session = await connect_settled(server, _CountingSink())
        try:
            playing = session.player.play(Clip.from_opus("bench", frames))
            await _until(lambda: len(alice.heard) > 10, "Alice hearing Libra")
            changes = len(server.executed)
            await server.join(CAROL, library=library)
            await _until(lambda: len(server.executed) > changes, "Carol's transition")
            await server.leave(BOB)
            await _until(lambda: len(server.executed) > changes + 1, "Bob's transition")
            during = not playing.done()  # both changes happened while Libra spoke
            await playing
        finally:
            await session.close()
    stamps = [heard.timestamp for heard in alice.heard]
    gaps = [((b - a) & 0xFFFFFFFF) - FRAME_SAMPLES for a, b in itertools.pairwise(stamps)]
    return {
        "gap_ms": max(gaps, default=0) * 1000 / SAMPLE_RATE,
        "undecryptable": alice.undecryptable,
        "changes_while_speaking": during,
    }
