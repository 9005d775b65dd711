"""`libra bench ws`: the WebSocket API's speed, beside `libra bench voice` in the same run.

Libra runs as `libra bench voice` runs it (each group of components a `libra run` process, the
same simulated vendors: Groq Whisper, an OpenAI-compatible chat API, Cartesia), plus a
`libra run http` process serving ``/ws``.

- Latency, turn by turn in alternation on the same processes: `libra bench voice`'s edge (a
  capture in this process, the first ``tts.synthesized`` received) and a WebSocket client that
  streams the same speech in real time as 20 ms frames of 48 kHz mono and times the first
  binary frame of Libra's speech on the socket. Both from the end of speech (the frame holding
  the last loud sample). ``ws_extra_p50_ms`` is the socket's p50 minus the edge's: what the
  socket costs beyond the pipeline (fetching the clip, resampling it, sending it).
- Load: ``--sockets`` sockets at once, each sending a quiet room's noise in real time (40 ms
  frames) for ``--seconds``: the http process's CPU per socket (CPU seconds per second of
  wall time), its memory per socket (resident memory with them open, minus before, over their
  number), and the p99 of its handling of one frame (``libra_ws_frame_seconds``: VAD and
  segmentation, read from its ``/metrics``; a histogram, so the bucket bound).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import httpx
import numpy as np
import psutil
from websockets.asyncio.client import ClientConnection, connect

from libra.contracts import TtsSynthesized
from libra.runtime.audio import AudioStore
from libra.runtime.config import Settings
from libra.runtime.database import migrate
from libra.runtime.eventlog import EventLog

from ..embedded import free_port
from .common import fake_llm_provider, libra_processes, percentile, report, servers
from .voice import (
    GROUPS,
    LLM_TTFT_S,
    REPLY,
    TOKENS_PER_S,
    Edge,
    fake_vendors,
    speech_packets,
    vendor_env,
)

__all__ = ["run_bench_ws"]

_WARM_UP = 2
_LOAD_FRAME_MS = 40


def _mono(packets: list[bytes]) -> list[bytes]:
    """48 kHz stereo packets as 48 kHz mono frames (a browser's microphone)."""
    return [np.frombuffer(p, np.int16)[::2].tobytes() for p in packets]


class _Socket:
    """One client socket: what it received, and when its speech's first frame came."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.first_audio = 0.0
        self.done = asyncio.Event()
        self.listening = False
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            async for frame in self.ws:
                if isinstance(frame, bytes):
                    if self.listening and not self.first_audio:
                        self.first_audio = time.time()
                elif json.loads(frame).get("type") == "done":
                    self.done.set()

    async def speak(self, frames: list[bytes], last_voiced: int) -> float:
        """Says the utterance in real time; returns end of speech to the first audio (s)."""
        self.first_audio, self.listening = 0.0, True
        self.done.clear()
        loop = asyncio.get_running_loop()
        start, speech_end = loop.time(), 0.0
        for i, frame in enumerate(frames):  # a frame leaves once its 20 ms have passed
            await asyncio.sleep(max(0.0, start + (i + 1) * 0.02 - loop.time()))
            if i == last_voiced:
                speech_end = time.time()
            await self.ws.send(frame)
        await asyncio.wait_for(self.done.wait(), 30)
        self.listening = False
        return self.first_audio - speech_end


async def _hello(url: str, user: str, rate: int) -> ClientConnection:
    ws = await connect(url, max_size=2**22)
    await ws.send(json.dumps({"type": "hello", "userId": user, "sampleRate": rate}))
    ready = json.loads(await ws.recv())
    if ready.get("type") != "ready":
        raise RuntimeError(f"the socket said {ready}")
    return ws


async def _latency(env: dict[str, str], settings: Settings, url: str, turns: int) -> dict:
    packets, last_voiced = speech_packets()
    frames = _mono(packets)
    log = await EventLog.connect(env["NATS_URL"], name="bench-ws-edge")
    edge_ms: list[float] = []
    ws_ms: list[float] = []
    try:
        audio = await AudioStore.open(log, max_bytes=settings.max_audio_bytes)
        socket = _Socket(await _hello(url, "bench-ws", 48_000))
        async with Edge(log, audio, settings).running() as edge:
            for turn in range(_WARM_UP + turns):
                await asyncio.sleep(0.3)  # the person listens, then speaks again
                said = await edge.speak(packets, last_voiced)
                first = next(at for at, e in said.seen if isinstance(e, TtsSynthesized))
                await asyncio.sleep(0.3)
                over_ws = await socket.speak(frames, last_voiced)
                if turn >= _WARM_UP:
                    edge_ms.append((first - said.speech_end) * 1000)
                    ws_ms.append(over_ws * 1000)
        await socket.ws.close()
    finally:
        await log.close()
    extra = [w - e for w, e in zip(ws_ms, edge_ms, strict=True)]
    return {
        "turns": turns,
        "voice_first_audio_p50_ms": percentile(edge_ms, 50),
        "voice_first_audio_p99_ms": percentile(edge_ms, 99),
        "ws_first_audio_p50_ms": percentile(ws_ms, 50),
        "ws_first_audio_p99_ms": percentile(ws_ms, 99),
        "ws_extra_p50_ms": percentile(ws_ms, 50) - percentile(edge_ms, 50),
        "ws_extra_pairwise_p50_ms": percentile(extra, 50),
    }


def _frame_p99_ms(metrics: str, before: dict[float, float]) -> tuple[float, dict[float, float]]:
    """The p99 of ``libra_ws_frame_seconds`` since ``before`` (bucket bound, ms), and the
    cumulative buckets now."""
    buckets: dict[float, float] = {}
    for line in metrics.splitlines():
        if line.startswith("libra_ws_frame_seconds_bucket"):
            bound = line.split('le="')[1].split('"')[0]
            buckets[float("inf") if bound == "+Inf" else float(bound)] = float(line.split()[-1])
    counts = {b: n - before.get(b, 0.0) for b, n in sorted(buckets.items())}
    total = counts.get(float("inf"), 0.0)
    bound = next((b for b, n in counts.items() if total and n >= 0.99 * total), float("nan"))
    return bound * 1000, buckets


async def _load(port: int, pid: int, sockets: int, seconds: float) -> dict:
    url = f"ws://127.0.0.1:{port}/ws"
    process = psutil.Process(pid)
    noise = np.random.default_rng(3).normal(0, 8, 16 * _LOAD_FRAME_MS).astype(np.int16)
    frame = noise.tobytes()
    async with httpx.AsyncClient() as http:
        _, before = _frame_p99_ms((await http.get(f"http://127.0.0.1:{port}/metrics")).text, {})
        rss_before = process.memory_info().rss
        clients = [await _hello(url, f"load-{i}", 16_000) for i in range(sockets)]
        await asyncio.sleep(0.5)  # settled: every socket open and greeted
        rss_open = process.memory_info().rss

        async def stream(ws: ClientConnection, phase: float) -> None:
            loop = asyncio.get_running_loop()
            start = loop.time() + phase
            for i in range(int(seconds * 1000 / _LOAD_FRAME_MS)):
                await asyncio.sleep(max(0.0, start + i * _LOAD_FRAME_MS / 1000 - loop.time()))
                await ws.send(frame)

        cpu = process.cpu_times()
        wall = time.perf_counter()
        step = _LOAD_FRAME_MS / 1000 / sockets
        await asyncio.gather(*(stream(ws, k * step) for k, ws in enumerate(clients)))
        wall = time.perf_counter() - wall
        after = process.cpu_times()
        rss_streaming = process.memory_info().rss
        p99, _ = _frame_p99_ms((await http.get(f"http://127.0.0.1:{port}/metrics")).text, before)
        for ws in clients:
            await ws.close()
    cores = (after.user + after.system - cpu.user - cpu.system) / wall
    return {
        "sockets": sockets,
        "load_seconds": round(wall, 1),
        "cores": cores,
        "cores_per_socket": cores / sockets,
        "frame_p99_ms": p99,
        "memory_per_socket_kib": (max(rss_open, rss_streaming) - rss_before) / sockets / 1024,
    }


async def run_bench_ws(
    settings: Settings, *, turns: int, sockets: int, seconds: float, as_json: bool
) -> dict:
    """Runs the latency turns, then the load, and prints the figures."""
    results: dict[str, Any] = {}
    async with servers(settings, postgres=True, redis=True) as urls:
        await migrate(urls.database_url)
        with (
            fake_vendors() as (whisper_url, cartesia_url),
            fake_llm_provider(REPLY, ttft=LLM_TTFT_S, tokens_per_sec=TOKENS_PER_S) as llm_url,
        ):
            port = free_port()
            env = {
                **vendor_env(urls, (whisper_url, cartesia_url, llm_url)),
                "HTTP_PORT": str(port),
            }
            async with libra_processes(env, [*GROUPS, ["http"]]) as processes:
                url = f"ws://127.0.0.1:{port}/ws"
                results.update(await _latency(env, settings, url, turns))
                results.update(await _load(port, processes[-1].pid, sockets, seconds))
    report(
        results,
        as_json=as_json,
        title="libra bench ws (end of speech to Libra's first audio on the socket, beside "
        "libra bench voice's edge; sockets streaming audio at once: CPU, memory, frame p99)",
    )
    return results
