"""`libra bench voice`: from the end of speech to the first synthesized audio ready to play.

Speech made by espeak-ng is fed in real time, in 20 ms packets of 48 kHz stereo (what Discord
delivers), to Libra's own :class:`~libra.gateway.voice.VoiceCapture`, which runs Silero VAD and
the segmenter and writes the utterances to the log. Libra runs as production runs it, each group
of components a `libra run` process of its own (turns, asr, llm, tts, the projections), on
servers started from the real nats.conf. The vendors are loopback fakes driven by the real SDKs,
each in a process of its own: Groq Whisper answering 250 ms after the upload, the OpenAI chat
API with 200 ms to the first token and then 400 tokens a second, Cartesia with 100 ms to its
first audio. The end-of-turn rule is 500 ms of silence (``VAD_SILENCE_MS``).

The clock, per turn:

- *end of speech*: the moment the last 20 ms packet holding speech is handed to the capture
  (known from the samples: the packet holding the last one louder than -50 dBFS);
- *first audio*: the moment this process receives the turn's first ``tts.synthesized`` (its
  audio already stored, ready to play), as the Discord gateway will.

``first_audio`` is the time between them. Libra's *own share* is the part of it that is neither
simulated vendor time nor a silence rule: ``first_audio`` minus the latency that a Libra taking
no time at all would have with the same rules and vendors. That ideal is the slower of Libra's
two paths to the first audio, which run side by side: the *confirmation* (the 500 ms rule, then
nothing), and the *generation* (the speculative pause, ``VAD_SPECULATIVE_MS`` rounded up to
whole frames; then the simulated ASR, LLM time to first token plus the tokens up to and including
the first one after the first sentence's end, and TTS time to first audio, in series; with
``--no-speculate``, generation starts only after the 500 ms rule).

The event timestamps of each turn break the own share down along the generation path (ms, p50):
``vad`` (capture published minus the end of speech minus the pause), ``asr`` (transcript minus
capture minus 250 ms), ``admission`` (turn accepted minus transcript, or minus the end of turn
when it came later), ``llm`` (the first delta that ends a sentence minus the turn minus the
LLM's time), ``tts`` (the first clip minus that delta minus 100 ms) and ``delivery`` (the edge's
receipt of the clip minus its timestamp). With speculation they add up to the own share whenever
generation, not the silence, is the slower path; ``held`` counts the turns whose first clip
waited for the confirmation. faster-whisper's real-time factor is measured on this CPU with the
tiny random model the tests use (1 layer, 64 wide, CTranslate2 int8; not a real Whisper model).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import numpy as np
from nats.aio.msg import Msg

from libra.contracts import (
    AnyEvent,
    AsrTranscribed,
    EventDecodeError,
    LlmCompleted,
    LlmDelta,
    Origin,
    TtsSynthesized,
    TurnAbandoned,
    TurnAccepted,
    TurnConfirmed,
    VoiceCaptured,
    VoiceEnded,
    VoiceResumed,
    decode_event,
)
from libra.gateway.voice import VoiceCapture, segmenter_config
from libra.runtime.audio import AudioStore, decode_audio
from libra.runtime.config import Settings
from libra.runtime.database import migrate
from libra.runtime.eventlog import EventLog

from ..embedded import free_port
from .common import fake_llm_provider, libra_processes, median, percentile, report, servers

__all__ = ["run_bench_voice"]

UTTERANCE = "What is the weather like in Seoul today?"
REPLY = (
    "It is sunny in Seoul today, about twenty degrees. Take a light jacket for the evening,"
    " because it gets cooler after sunset."
)
ASR_S, LLM_TTFT_S, TOKENS_PER_S, TTS_TTFB_S = 0.25, 0.2, 400.0, 0.1
GROUPS = (
    ["turns", "ratelimit-view"],
    ["asr"],
    ["llm"],
    ["tts"],
    ["history", "sessions", "turns-projection", "memory"],
)
_PACKET = 3840  # 20 ms of 48 kHz stereo s16le
_LOUD = 100  # about -50 dBFS: the last sample above it ends the speech
_LEAD_MS, _TAIL_MS = 400, 1500
_WARM_UP = 3
E = TypeVar("E")


def _after_first_sentence(reply: str) -> int:
    """The index of the token that completes the first sentence for the splitter: the one after
    its terminator (the splitter needs the space that token starts with)."""
    words = reply.split()
    return next(i for i, w in enumerate(words) if w.endswith((".", "!", "?"))) + 1


def _serve_vendors(whisper_port: int, cartesia_port: int, ready) -> None:
    from libra.ops.fakes.cartesia import FakeCartesia
    from libra.ops.fakes.groq_whisper import FakeGroqWhisper
    from libra.ops.fakes.scripted import Behaviour

    async def main() -> None:
        whisper = FakeGroqWhisper(
            port=whisper_port, transcript=UTTERANCE, reply=Behaviour.ok(ttfb=ASR_S)
        )
        cartesia = FakeCartesia(port=cartesia_port, reply=Behaviour.ok(ttfb=TTS_TTFB_S))
        await whisper.start()
        await cartesia.start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


@contextlib.contextmanager
def _fake_vendors() -> Iterator[tuple[str, str]]:
    """Groq Whisper and Cartesia in a process of their own; yields their base URLs."""
    whisper_port, cartesia_port = free_port(), free_port()
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(
        target=_serve_vendors, args=(whisper_port, cartesia_port, ready), daemon=True
    )
    proc.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("the fake vendors did not start")
        yield f"http://127.0.0.1:{whisper_port}", f"http://127.0.0.1:{cartesia_port}"
    finally:
        proc.terminate()
        proc.join(5)


def _speech() -> tuple[list[bytes], int]:
    """The utterance as 20 ms packets of 48 kHz stereo, and the index of its last voiced one."""
    wav = subprocess.run(
        ["espeak-ng", "-v", "en-us", "--stdout"],
        input=UTTERANCE.encode(),
        capture_output=True,
        check=True,
    ).stdout
    said = np.frombuffer(decode_audio(wav, to_rate=48_000), np.int16)
    rng = np.random.default_rng(7)
    lead = rng.normal(0, 8, 48 * _LEAD_MS).astype(np.int16)  # a quiet room, not digital zero
    tail = rng.normal(0, 8, 48 * _TAIL_MS).astype(np.int16)
    mono = np.concatenate([lead, said, tail])
    mono = np.concatenate([mono, np.zeros(-len(mono) % 960, np.int16)])
    last_loud = int(np.nonzero(np.abs(mono) > _LOUD)[0][-1])
    pcm = np.repeat(mono, 2).tobytes()
    return [pcm[at : at + _PACKET] for at in range(0, len(pcm), _PACKET)], last_loud // 960


def _whisper_rtf() -> float:
    """faster-whisper's time per second of the utterance, on this CPU, with the tiny model."""
    from libra.ops.fakes.tiny_whisper import build_tiny_whisper
    from libra.processors.asr.whisper import WhisperEngine

    wav = subprocess.run(
        ["espeak-ng", "-v", "en-us", "--stdout"],
        input=UTTERANCE.encode(),
        capture_output=True,
        check=True,
    ).stdout
    pcm = decode_audio(wav, to_rate=16_000)
    seconds = len(pcm) / 32_000
    with tempfile.TemporaryDirectory(prefix="libra-bench-whisper-") as tmp:
        engine = WhisperEngine(
            str(build_tiny_whisper(Path(tmp) / "tiny")), device="cpu", beam_size=1
        )

        async def measure() -> float:
            await engine.transcribe(pcm, "en")  # loads the model
            times = []
            for _ in range(5):
                started = time.perf_counter()
                await engine.transcribe(pcm, "en")
                times.append(time.perf_counter() - started)
            return median(times)

        return asyncio.run(measure()) / seconds


@dataclass
class _Turn:
    """What the edge saw of one turn: the end of speech, and every event of its conversation."""

    speech_end: float  # wall clock, seconds
    seen: list[tuple[float, AnyEvent]] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def on_event(self, at: float, event: AnyEvent) -> None:
        self.seen.append((at, event))
        if isinstance(event, TtsSynthesized) and event.final:
            self.done.set()


class _Edge:
    """One speaker: a capture fed in real time, and a subscription to their conversation."""

    def __init__(self, log: EventLog, audio: AudioStore, settings: Settings, n: int) -> None:
        self.log = log
        self.conversation = f"bench-{n}"
        self.capture = VoiceCapture(
            log,
            audio,
            conversation=self.conversation,
            user=f"speaker-{n}",
            origin=Origin(platform="bench", channel=str(n)),
            config=segmenter_config(settings),
        )
        self.turn: _Turn | None = None

    async def _on_msg(self, msg: Msg) -> None:
        received = time.time()
        if self.turn is not None:
            with contextlib.suppress(EventDecodeError):
                self.turn.on_event(received, decode_event(msg.data))

    async def speak(self, packets: list[bytes], last_voiced: int) -> _Turn:
        """Says the utterance in real time and waits until its reply has been spoken."""
        loop = asyncio.get_running_loop()
        turn = self.turn = _Turn(speech_end=0.0)
        start = loop.time()
        for i, packet in enumerate(packets):  # a packet arrives once its 20 ms have passed
            await asyncio.sleep(max(0.0, start + (i + 1) * 0.02 - loop.time()))
            if i == last_voiced:
                turn.speech_end = time.time()
            self.capture.feed(packet)
        await asyncio.wait_for(turn.done.wait(), 30)
        return turn

    @contextlib.asynccontextmanager
    async def running(self) -> Iterator[_Edge]:
        sub = await self.log.nc.subscribe(f"libra.*.*.{self.conversation}", cb=self._on_msg)
        try:
            async with self.capture:
                yield self
        finally:
            await sub.unsubscribe()


def _ts(at: datetime) -> float:
    return at.timestamp()


@dataclass
class _Figures:
    first_audio: list[float] = field(default_factory=list)
    own: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=dict)
    abandoned: int = 0

    def add_stage(self, name: str, ms: float) -> None:
        self.stages.setdefault(name, []).append(ms)


def _first(events: list[AnyEvent], kind: type[E]) -> E | None:
    return next((e for e in events if isinstance(e, kind)), None)


def _sentence_delta(deltas: list[LlmDelta]) -> LlmDelta:
    """The delta that lets the tts's splitter cut the first sentence."""
    text = ""
    for delta in deltas:
        text += delta.text
        if any(text.find(t + " ") >= 0 for t in ".!?"):
            return delta
    return deltas[-1]


def _analyse(turn: _Turn, figures: _Figures, *, silence_s: float, pause_s: float) -> None:
    """Adds one turn's first-audio time, own share and stage breakdown to ``figures``."""
    ended = _first([e for _, e in turn.seen], VoiceEnded)
    seen = [(at, e) for at, e in turn.seen if e.turn == ended.turn]
    events = [e for _, e in seen]
    first_seen, first = next(
        (at, e) for at, e in seen if isinstance(e, TtsSynthesized) and e.index == 0
    )
    capture, heard = _first(events, VoiceCaptured), _first(events, AsrTranscribed)
    accepted, confirmed = _first(events, TurnAccepted), _first(events, TurnConfirmed)
    deltas = sorted((e for e in events if isinstance(e, LlmDelta)), key=lambda d: d.index)
    sentence = _sentence_delta(deltas)
    tokens_s = LLM_TTFT_S + _after_first_sentence(REPLY) / TOKENS_PER_S
    if accepted.speculative:
        generation = pause_s + ASR_S + tokens_s + TTS_TTFB_S
        admitted_after = _ts(heard.at)
    else:
        generation = max(silence_s, pause_s + ASR_S) + tokens_s + TTS_TTFB_S
        admitted_after = max(_ts(heard.at), _ts(ended.at))
    end = turn.speech_end
    figures.first_audio.append((first_seen - end) * 1000)
    figures.own.append((first_seen - end - max(silence_s, generation)) * 1000)
    figures.abandoned += sum(1 for _, e in turn.seen if isinstance(e, TurnAbandoned | VoiceResumed))
    stages = {
        "vad": _ts(capture.at) - end - pause_s,
        "asr": _ts(heard.at) - _ts(capture.at) - ASR_S,
        "admission": _ts(accepted.at) - admitted_after,
        "llm": _ts(sentence.at) - _ts(accepted.at) - tokens_s,
        "tts": _ts(first.at) - _ts(sentence.at) - TTS_TTFB_S,
        "delivery": first_seen - _ts(first.at),
        "end_of_turn": _ts(ended.at) - end - silence_s,
    }
    if confirmed is not None:
        stages["confirmation"] = _ts(confirmed.at) - _ts(ended.at)
    completed = _first(events, LlmCompleted)
    stages["prompt"] = _ts(deltas[0].at) - _ts(accepted.at) - completed.ttft_ms / 1000
    stages["llm_sdk"] = completed.ttft_ms / 1000 - LLM_TTFT_S
    for name, seconds in stages.items():
        figures.add_stage(name, seconds * 1000)


async def _measure(env: dict[str, str], settings: Settings, *, turns: int) -> _Figures:
    packets, last_voiced = _speech()
    log = await EventLog.connect(env["NATS_URL"], name="bench-voice-edge")
    figures = _Figures()
    silence_s = settings.vad_silence_ms / 1000
    pause_s = -(-settings.vad_speculative_ms // 20) * 0.02  # counted in whole frames
    try:
        audio = await AudioStore.open(log, max_bytes=settings.max_audio_bytes)
        async with _Edge(log, audio, settings, 1).running() as edge:
            for i in range(_WARM_UP + turns):
                turn = await edge.speak(packets, last_voiced)
                if i >= _WARM_UP:
                    _analyse(turn, figures, silence_s=silence_s, pause_s=pause_s)
                await asyncio.sleep(0.3)  # the person listens, then speaks again
    finally:
        await log.close()
    return figures


async def run_bench_voice(
    settings: Settings, *, turns: int, speculate: bool, as_json: bool
) -> dict:
    """Runs ``turns`` spoken turns one after another and prints the figures."""
    results: dict = {"turns": turns, "speculate": speculate}
    results["whisper_rtf"] = await asyncio.to_thread(_whisper_rtf)
    results["whisper_model"] = "tiny random CTranslate2 Whisper (test model), CPU int8"
    async with servers(settings, postgres=True, redis=True) as urls:
        await migrate(urls.database_url)
        with (
            _fake_vendors() as (whisper_url, cartesia_url),
            fake_llm_provider(REPLY, ttft=LLM_TTFT_S, tokens_per_sec=TOKENS_PER_S) as llm_url,
        ):
            env = {
                **{k: v for k, v in os.environ.items() if not k.endswith(("_KEY", "_URL"))},
                "NATS_URL": urls.nats_url,
                "DATABASE_URL": urls.database_url,
                "REDIS_URL": urls.redis_url,
                "LOG_LEVEL": "WARNING",
                "LLM_CACHE_ENABLED": "0",
                "RATE_LIMIT_TURNS": "1000000",
                "LLM_PROVIDERS": "openai",
                "OPENAI_API_KEY": "sk-bench",
                "OPENAI_BASE_URL": llm_url,
                "ASR_ENGINES": "groq",
                "GROQ_API_KEY": "gsk-bench",
                "GROQ_BASE_URL": whisper_url,
                "TTS_ENGINES": "cartesia",
                "CARTESIA_API_KEY": "sk-bench",
                "CARTESIA_BASE_URL": cartesia_url,
                "VOICE_SPECULATIVE_REPLY": "1" if speculate else "0",
            }
            async with libra_processes(env, GROUPS):
                figures = await _measure(env, settings, turns=turns)
    results.update(
        {
            "first_audio_p50_ms": percentile(figures.first_audio, 50),
            "first_audio_p99_ms": percentile(figures.first_audio, 99),
            "own_p50_ms": percentile(figures.own, 50),
            "own_p99_ms": percentile(figures.own, 99),
            "abandoned": figures.abandoned,
            **{f"{k}_p50_ms": percentile(v, 50) for k, v in figures.stages.items()},
        }
    )
    report(
        results,
        as_json=as_json,
        title="libra bench voice (end of speech to the first synthesized audio at the edge; "
        "own: beyond the 500 ms rule and the simulated vendors; stages: own time, p50)",
    )
    return results
