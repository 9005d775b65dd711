"""`libra bench voice-transport`: the voice transport's figures against the loopback fake.

- receive: ``speakers`` members of the fake's call talk at once for the whole run, their
  packets (Opus, DAVE- and transport-encrypted beforehand) sent by a thread on a 20 ms grid,
  each speaker at its own phase; a packet's time is from its ``sendto`` to its PCM reaching the
  sink: UDP, both decryptions, the jitter buffer and the Opus decoder.
- send: meanwhile Libra plays a clip as long as the run; each frame's send time against its slot
  on the 20 ms grid.
- CPU: the event loop thread's CPU time over the run (everything Libra does, plus the fake's
  handling of what Libra sends, which one listening member decrypts), per second of wall time;
  the sending thread is not counted.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time

import numpy as np

from libra.gateway.discord.voice import Clip, VoiceServer, VoiceSession
from libra.gateway.discord.voice.opus import encode_pcm
from libra.gateway.discord.voice.rtp import FRAME_SECONDS, SAMPLE_RATE

from ..fakes.discord_voice import FakeVoiceServer
from .common import median, percentile, report

__all__ = ["run_bench_voice_transport"]

GUILD, CHANNEL, LIBRA = 1, 2, 3


class _TimingSink:
    """Notes when each speaker's frame (by RTP timestamp) reached the sink."""

    def __init__(self) -> None:
        self.arrived: dict[tuple[int, int], float] = {}

    def on_speaking(self, user_id: int, speaking: bool) -> None:
        pass

    def on_frame(self, user_id: int, pcm: bytes, rtp_timestamp: int) -> None:
        self.arrived[(user_id, rtp_timestamp)] = time.perf_counter()

    def on_member(self, user_id: int, present: bool) -> None:
        pass


def _voice_like(seconds: float) -> bytes:
    """A second of a voiced, syllable-modulated tone, as 48 kHz stereo PCM (no espeak needed)."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    voice = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 12))
    syllables = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    samples = (voice * syllables * 4000).astype(np.int16)
    return np.repeat(samples[:, None], 2, axis=1).tobytes()


def _send_on_grid(
    sock: socket.socket,
    address: tuple[str, int],
    streams: list[list[bytes]],
    sent: dict[tuple[int, int], float],
) -> None:
    """Sends every stream's packets on a 20 ms grid, stream k at phase k/len of a frame."""
    start = time.perf_counter() + 0.05
    phases = [k * FRAME_SECONDS / len(streams) for k in range(len(streams))]
    events = sorted(
        (start + i * FRAME_SECONDS + phases[k], k, i)
        for k, stream in enumerate(streams)
        for i in range(len(stream))
    )
    for due, k, i in events:
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        datagram = streams[k][i]
        ssrc, timestamp = (
            struct.unpack_from(">I", datagram, 8)[0],
            struct.unpack_from(">I", datagram, 4)[0],
        )
        sent[(ssrc, timestamp)] = time.perf_counter()
        sock.sendto(datagram, address)


async def _connect(server: FakeVoiceServer, sink: _TimingSink) -> VoiceSession:
    session = VoiceSession(
        guild_id=GUILD,
        channel_id=CHANNEL,
        user_id=LIBRA,
        session_id="bench",
        server=VoiceServer(server.url, server.token),
        sink=sink,
    )
    await session.connect()
    deadline = time.monotonic() + 30
    while not (server.settled and session.dave and session.dave.epoch == server.epoch):
        if time.monotonic() > deadline:
            raise RuntimeError("the DAVE group did not settle")
        await asyncio.sleep(0.01)
    return session


async def run_bench_voice_transport(*, seconds: float, speakers: int, as_json: bool) -> dict:
    """Runs the benchmark and prints its figures; returns them too."""
    frames_per_second = round(1 / FRAME_SECONDS)
    second = encode_pcm(_voice_like(1.0), bitrate=64_000)[:frames_per_second]
    frames = second * max(1, round(seconds))
    async with FakeVoiceServer(guild_id=GUILD, channel_id=CHANNEL) as server:
        members = [await server.join(100 + k) for k in range(speakers)]
        sink = _TimingSink()
        session = await _connect(server, sink)
        for member in members[1:]:
            member.listening = False
        for member in members:
            member.announce()
        streams = [member.packets(frames) for member in members]
        users = {member.ssrc: member.user_id for member in members}
        await asyncio.sleep(0.1)  # op 5 reaches Libra before the first packet

        sent: dict[tuple[int, int], float] = {}
        sock = server.sender_socket()
        sender = threading.Thread(
            target=_send_on_grid, args=(sock, server.bot.address, streams, sent), daemon=True
        )
        cpu_before, wall_before = time.thread_time(), time.perf_counter()
        sender.start()
        played = await session.player.play(Clip.from_opus("bench", frames))
        while sender.is_alive():
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
        cpu, wall = time.thread_time() - cpu_before, time.perf_counter() - wall_before
        sock.close()
        lateness = [abs(x) * 1000 for x in session.stats.send_lateness]
        latency = [
            (sink.arrived[(users[ssrc], timestamp)] - at) * 1000
            for (ssrc, timestamp), at in sent.items()
            if (users[ssrc], timestamp) in sink.arrived
        ]
        dropped = sum(session.stats.dropped.values())
        await session.close()
    cores = cpu / wall
    results: dict[str, float | int | str] = {
        "speakers": speakers,
        "seconds": round(wall, 1),
        "recv_packets": len(sent),
        "recv_lost": len(sent) - len(latency),
        "recv_dropped": dropped,
        "recv_p50_ms": median(latency),
        "recv_p99_ms": percentile(latency, 99),
        "send_frames": played.frames_sent,
        "send_jitter_p50_ms": median(lateness),
        "send_jitter_p99_ms": percentile(lateness, 99),
        "cores": cores,
        "cores_per_speaker": cores / max(1, speakers),
        "cores_for_10_speakers": cores / max(1, speakers) * 10,
    }
    report(results, as_json=as_json, title="voice transport (loopback fake, Libra's loop thread)")
    return results
