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
- DAVE key changes (``voice_keys``): frames lost when a member's key changes with a fifth of its
  packets late, and the gap in Libra's speech a member hears while others join and leave.
- intelligibility (``intelligibility``): word error of speech under 5% and 15% random loss,
  lost packets as silence, libopus's concealment, or FEC; Whisper tiny.en transcribes.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from typing import Any

from libra.gateway.discord.voice import Clip
from libra.gateway.discord.voice.opus import encode_pcm
from libra.gateway.discord.voice.rtp import FRAME_SECONDS

from ..fakes.discord_voice import FakeVoiceServer
from .common import median, percentile, report
from .intelligibility import measure_intelligibility
from .voice_keys import (
    CHANNEL,
    GUILD,
    connect_settled,
    frames_lost_on_key_change,
    gap_on_member_change_ms,
    voice_like,
)

__all__ = ["run_bench_voice_transport"]


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


async def run_bench_voice_transport(
    *, seconds: float, speakers: int, intelligibility: bool = True, as_json: bool
) -> dict:
    """Runs the benchmark and prints its figures; returns them too."""
    frames_per_second = round(1 / FRAME_SECONDS)
    second = encode_pcm(voice_like(1.0), bitrate=64_000)[:frames_per_second]
    frames = second * max(1, round(seconds))
    async with FakeVoiceServer(guild_id=GUILD, channel_id=CHANNEL) as server:
        members = [await server.join(100 + k) for k in range(speakers)]
        sink = _TimingSink()
        session = await connect_settled(server, sink)
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
    key_change = await frames_lost_on_key_change()
    member_change = await gap_on_member_change_ms()
    cores = cpu / wall
    results: dict[str, Any] = {
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
        "frames_lost_on_key_change": key_change["lost"],
        "frames_late_on_key_change": key_change["late"],
        "gap_on_member_change_ms": member_change["gap_ms"],
        "undecryptable_on_member_change": member_change["undecryptable"],
    }
    if intelligibility:
        # Whisper would take the loop's CPU: measured after the timed part, in a worker thread.
        results["intelligibility"] = await asyncio.to_thread(measure_intelligibility)
    report(results, as_json=as_json, title="voice transport (loopback fake, Libra's loop thread)")
    return results
