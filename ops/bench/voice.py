"""`libra bench voice`: from the end of speech to the first synthesized audio ready to play.

Speech made by espeak-ng is fed in real time, in 20 ms packets of 48 kHz stereo (what Discord
delivers), to Libra's own :class:`~libra.gateway.voice.VoiceCapture`, which runs Silero VAD and
the segmenter and writes the utterances to the log. Libra runs as production runs it, each group
of components a `libra run` process of its own (turns, asr, llm, tts, the projections), on
servers started from the real nats.conf. The vendors are loopback fakes driven by the real SDKs,
in processes of their own: Groq Whisper answering 250 ms after the upload, an OpenAI-compatible
chat API with 200 ms to the first token and then 400 tokens a second, Cartesia with 100 ms to its
first audio. The end-of-turn rule is 500 ms of silence (``VAD_SILENCE_MS``).

The clock, per turn:

- *end of speech*: the moment the last 20 ms packet holding speech is handed to the capture
  (known from the samples: the packet holding the last one louder than -50 dBFS);
- *first audio*: the moment this process receives the turn's first ``tts.synthesized`` (its
  audio already stored, ready to play), as the Discord gateway will.

``first_audio`` is the time between them. Libra's *own share* is what is left of it after the
silence rules and the simulated vendors: ``first_audio`` minus the latency that a Libra taking
no time at all would have. That ideal is the slower of the two paths to the first audio, which
run side by side: the *confirmation* (the 500 ms rule, then nothing) and the *generation* (the
speculative pause, ``VAD_SPECULATIVE_MS`` in whole frames; then the ASR's answer, the LLM up to
the token that completes the first sentence for the splitter, and the TTS's first audio, in
series; with ``--no-speculate`` the LLM starts only after the 500 ms rule). The vendors' part
is their time *as a bare HTTP client sees it* in the same run (``vendor_*_ms``: aiohttp against
the same fakes, measured after the warm-up turns: the fake's own work and the loopback hops are
the vendor's), so that ``own`` is Libra's, its SDKs included. ``own_nominal`` charges the vendors
only their configured times (250, 200 + the tokens at 400/s, 100 ms), the way the peer's 56 ms
was counted (1,126 - 1,070). ``--no-sync`` runs on nats.conf without ``sync_interval: always``,
to show what syncing every write to disk costs.

The event timestamps of each turn break the own share down along the generation path (ms, p50),
each stage minus the vendor's part in it: ``vad`` (capture published minus the end of speech
minus the pause), ``asr`` (transcript minus capture), ``admission`` (turn accepted minus
transcript, or minus the end of turn when that came later), ``llm`` (the delta that completes
the first sentence minus the turn), ``tts`` (the first clip minus that delta), ``delivery`` (the
edge's receipt of the clip minus its timestamp); ``prompt`` and ``llm_sdk`` split ``llm``
(``llm_sdk``: the provider call to its first token, as the llm measured it, minus the bare one).
With speculation they add up to ``own`` when the generation is the slower path, as it is here;
``end_of_turn`` and ``confirmation`` time the other path; ``slowest_*`` break down the slowest
turn the same way. faster-whisper's real-time factor is measured on this CPU with the tiny
random model the tests use (1 layer, 64 wide, CTranslate2 int8): not a real Whisper model, so it
says what the pipeline around the model costs.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import aiohttp
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
    decode_event,
)
from libra.gateway.voice import VoiceCapture, segmenter_config
from libra.processors.tts.espeak import utterance
from libra.processors.tts.sentences import SentenceSplitter
from libra.runtime.audio import AudioStore, wav_bytes
from libra.runtime.config import Settings
from libra.runtime.database import migrate
from libra.runtime.eventlog import EventLog

from ..embedded import free_port
from .common import (
    BenchServers,
    fake_llm_provider,
    libra_processes,
    median,
    percentile,
    report,
    servers,
)

__all__ = ["GROUPS", "Edge", "fake_vendors", "run_bench_voice", "speech_packets", "vendor_env"]

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
_BARE_ROUNDS = 10
E = TypeVar("E")


def _sentence_token() -> int:
    """The index of the reply's token that completes its first sentence for the splitter: the
    one after the terminator (the splitter needs the space that token starts with)."""
    words = REPLY.split()
    return next(i for i, w in enumerate(words) if w.endswith((".", "!", "?"))) + 1


def speech_packets() -> tuple[list[bytes], int]:
    """The utterance as 20 ms packets of 48 kHz stereo, and the index of its last voiced one."""
    said = np.frombuffer(utterance(UTTERANCE, "en-us", rate=48_000), np.int16)
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

    pcm = utterance(UTTERANCE, "en-us", rate=16_000)
    with tempfile.TemporaryDirectory(prefix="libra-bench-whisper-") as tmp:
        model = build_tiny_whisper(Path(tmp) / "tiny")
        engine = WhisperEngine(str(model), device="cpu", beam_size=1)

        async def measure() -> float:
            await engine.transcribe(pcm, "en")  # loads the model
            times = []
            for _ in range(5):
                started = time.perf_counter()
                await engine.transcribe(pcm, "en")
                times.append(time.perf_counter() - started)
            return median(times)

        return asyncio.run(measure()) / (len(pcm) / 32_000)


# --- the simulated vendors ----------------------------------------------------------------


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
def fake_vendors() -> Iterator[tuple[str, str]]:
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


@dataclass
class _Vendors:
    """Each simulated vendor's part of the generation path, seconds."""

    asr: float = ASR_S
    llm: float = LLM_TTFT_S + _sentence_token() / TOKENS_PER_S
    tts: float = TTS_TTFB_S


async def _bare_vendors(whisper: str, cartesia: str, llm: str, wav: bytes) -> _Vendors:
    """The vendors' times as a bare aiohttp client sees them: the medians of a few calls."""
    times: dict[str, list[float]] = {"asr": [], "llm": [], "tts": []}
    async with aiohttp.ClientSession() as http:
        for _ in range(_BARE_ROUNDS):
            times["asr"].append(await _bare_asr(http, whisper, wav))
            times["llm"].append(await _bare_llm(http, llm))
            times["tts"].append(await _bare_tts(http, cartesia))
    return _Vendors(**{name: median(values) for name, values in times.items()})


async def _bare_asr(http: aiohttp.ClientSession, base: str, wav: bytes) -> float:
    """Seconds to the transcript."""
    form = aiohttp.FormData()
    form.add_field("file", wav, filename="utterance.wav", content_type="audio/wav")
    form.add_field("model", "whisper-large-v3-turbo")
    form.add_field("response_format", "verbose_json")
    started = time.perf_counter()
    async with http.post(f"{base}/openai/v1/audio/transcriptions", data=form) as response:
        await response.json()
    return time.perf_counter() - started


async def _bare_llm(http: aiohttp.ClientSession, base: str) -> float:
    """Seconds to the token that completes the first sentence (the stream is read to its end)."""
    body = {"model": "default", "messages": [{"role": "user", "content": "?"}], "stream": True}
    started = time.perf_counter()
    tokens, took = 0, 0.0
    async with http.post(f"{base}/chat/completions", json=body) as response:
        async for line in response.content:
            if b'"content":"' in line and b'"content":""' not in line:  # a token, not the role
                tokens += 1
                if tokens == _sentence_token() + 1:
                    took = time.perf_counter() - started
    return took


async def _bare_tts(http: aiohttp.ClientSession, base: str) -> float:
    """Seconds to the first audio (the stream is read to its end)."""
    body = {
        "model_id": "sonic-3",
        "transcript": REPLY.split(". ")[0] + ".",
        "voice": {"mode": "id", "id": "bench"},
        "output_format": {"container": "raw", "encoding": "pcm_s16le", "sample_rate": 48_000},
    }
    started = time.perf_counter()
    took = 0.0
    async with http.post(f"{base}/tts/sse", json=body) as response:
        async for line in response.content:
            if not took and line.startswith(b"data:") and b'"chunk"' in line:
                took = time.perf_counter() - started
    return took


# --- the edge -----------------------------------------------------------------------------


@dataclass
class _Turn:
    """What the edge saw of one turn: the end of speech, and every event of its conversation."""

    speech_end: float = 0.0  # wall clock, seconds
    seen: list[tuple[float, AnyEvent]] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def on_event(self, at: float, event: AnyEvent) -> None:
        self.seen.append((at, event))
        if isinstance(event, TtsSynthesized) and event.final:
            self.done.set()


class Edge:
    """One speaker: a capture fed in real time, and a subscription to their conversation."""

    def __init__(
        self,
        log: EventLog,
        audio: AudioStore,
        settings: Settings,
        *,
        conversation: str = "bench-1",
        user: str = "speaker-1",
    ) -> None:
        self.log = log
        self.conversation = conversation
        self.capture = VoiceCapture(
            log,
            audio,
            conversation=conversation,
            user=user,
            origin=Origin(platform="bench", channel="1"),
            config=segmenter_config(settings),
        )
        self.turn = _Turn()

    async def _on_msg(self, msg: Msg) -> None:
        received = time.time()
        with contextlib.suppress(EventDecodeError):
            self.turn.on_event(received, decode_event(msg.data))

    async def speak(self, packets: list[bytes], last_voiced: int) -> _Turn:
        """Says the utterance in real time and waits until its reply has been spoken."""
        loop = asyncio.get_running_loop()
        turn = self.turn = _Turn()
        start = loop.time()
        for i, packet in enumerate(packets):  # a packet arrives once its 20 ms have passed
            await asyncio.sleep(max(0.0, start + (i + 1) * 0.02 - loop.time()))
            if i == last_voiced:
                turn.speech_end = time.time()
            self.capture.feed(packet)
        await asyncio.wait_for(turn.done.wait(), 30)
        return turn

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Edge]:
        sub = await self.log.nc.subscribe(f"libra.*.*.{self.conversation}", cb=self._on_msg)
        try:
            async with self.capture:
                yield self
        finally:
            await sub.unsubscribe()


# --- the figures --------------------------------------------------------------------------


@dataclass
class _Figures:
    vendors: _Vendors
    silence_s: float
    pause_s: float
    first_audio: list[float] = field(default_factory=list)
    own: list[float] = field(default_factory=list)
    own_nominal: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=dict)
    abandoned: int = 0

    def ideal(self, vendors: _Vendors, speculative: bool) -> float:
        """The first-audio latency of a Libra that takes no time itself."""
        if speculative:
            generation = self.pause_s + vendors.asr + vendors.llm + vendors.tts
        else:
            generation = max(self.silence_s, self.pause_s + vendors.asr) + vendors.llm
            generation += vendors.tts
        return max(self.silence_s, generation)

    def add(self, turn: _Turn) -> None:
        """Adds one turn's first-audio time, own share and stage breakdown."""
        ended = _first([e for _, e in turn.seen], VoiceEnded)
        seen = [(at, e) for at, e in turn.seen if e.turn == ended.turn]
        events = [e for _, e in seen]
        first_seen, first = next(
            (at, e) for at, e in seen if isinstance(e, TtsSynthesized) and e.index == 0
        )
        capture, heard = _first(events, VoiceCaptured), _first(events, AsrTranscribed)
        accepted, confirmed = _first(events, TurnAccepted), _first(events, TurnConfirmed)
        completed = _first(events, LlmCompleted)
        deltas = sorted((e for e in events if isinstance(e, LlmDelta)), key=lambda d: d.index)
        sentence = _sentence_delta(deltas)
        latency = first_seen - turn.speech_end
        self.first_audio.append(latency * 1000)
        self.own.append((latency - self.ideal(self.vendors, accepted.speculative)) * 1000)
        self.own_nominal.append((latency - self.ideal(_Vendors(), accepted.speculative)) * 1000)
        self.abandoned += sum(1 for _, e in turn.seen if isinstance(e, TurnAbandoned))
        admitted_after = _ts(heard.at)
        if not accepted.speculative:
            admitted_after = max(admitted_after, _ts(ended.at))
        v = self.vendors
        stages = {
            "vad": _ts(capture.at) - turn.speech_end - self.pause_s,
            "asr": _ts(heard.at) - _ts(capture.at) - v.asr,
            "admission": _ts(accepted.at) - admitted_after,
            "llm": _ts(sentence.at) - _ts(accepted.at) - v.llm,
            "prompt": _ts(deltas[0].at) - _ts(accepted.at) - completed.ttft_ms / 1000,
            "llm_sdk": completed.ttft_ms / 1000 - (v.llm - _sentence_token() / TOKENS_PER_S),
            "tts": _ts(first.at) - _ts(sentence.at) - v.tts,
            "delivery": first_seen - _ts(first.at),
            "end_of_turn": _ts(ended.at) - turn.speech_end - self.silence_s,
        }
        if confirmed is not None:
            stages["confirmation"] = _ts(confirmed.at) - _ts(ended.at)
        for name, seconds in stages.items():
            self.stages.setdefault(name, []).append(seconds * 1000)

    def results(self) -> dict:
        slowest = self.first_audio.index(max(self.first_audio))
        return {
            "first_audio_p50_ms": percentile(self.first_audio, 50),
            "first_audio_p99_ms": percentile(self.first_audio, 99),
            "own_p50_ms": percentile(self.own, 50),
            "own_p99_ms": percentile(self.own, 99),
            "own_nominal_p50_ms": percentile(self.own_nominal, 50),
            "own_nominal_p99_ms": percentile(self.own_nominal, 99),
            "vendor_asr_ms": self.vendors.asr * 1000,
            "vendor_llm_ms": self.vendors.llm * 1000,
            "vendor_tts_ms": self.vendors.tts * 1000,
            "abandoned": self.abandoned,
            **{f"{k}_p50_ms": percentile(v, 50) for k, v in self.stages.items()},
            # where the slowest turn lost its time
            **{
                f"slowest_{k}_ms": v[slowest] for k, v in self.stages.items() if k != "confirmation"
            },
        }


def _first(events: list[AnyEvent], kind: type[E]) -> E | None:
    return next((e for e in events if isinstance(e, kind)), None)


def _sentence_delta(deltas: list[LlmDelta]) -> LlmDelta:
    """The delta with which the tts's splitter completes the first sentence."""
    splitter = SentenceSplitter()
    return next((d for d in deltas if splitter.push(d.text)), deltas[-1])


def _ts(at: datetime) -> float:
    return at.timestamp()


# --- the run ------------------------------------------------------------------------------


async def _measure(
    env: dict[str, str], settings: Settings, urls: tuple[str, str, str], *, turns: int
) -> _Figures:
    packets, last_voiced = speech_packets()
    wav = wav_bytes(utterance(UTTERANCE, "en-us", rate=16_000), sample_rate=16_000)
    log = await EventLog.connect(env["NATS_URL"], name="bench-voice-edge")
    try:
        audio = await AudioStore.open(log, max_bytes=settings.max_audio_bytes)
        async with Edge(log, audio, settings).running() as edge:
            for _ in range(_WARM_UP):
                await edge.speak(packets, last_voiced)
            figures = _Figures(
                vendors=await _bare_vendors(*urls, wav),
                silence_s=settings.vad_silence_ms / 1000,
                pause_s=-(-settings.vad_speculative_ms // 20) * 0.02,  # in whole frames
            )
            for _ in range(turns):
                await asyncio.sleep(0.3)  # the person listens, then speaks again
                figures.add(await edge.speak(packets, last_voiced))
    finally:
        await log.close()
    return figures


async def run_bench_voice(
    settings: Settings, *, turns: int, speculate: bool, sync: bool, as_json: bool
) -> dict:
    """Runs ``turns`` spoken turns one after another and prints the figures."""
    results: dict = {"turns": turns, "speculate": speculate, "sync": sync}
    results["whisper_rtf"] = await asyncio.to_thread(_whisper_rtf)
    results["whisper_model"] = "tiny random CTranslate2 Whisper (test model), CPU int8"
    async with servers(settings, postgres=True, redis=True) as urls:
        await migrate(urls.database_url)
        with (
            fake_vendors() as (whisper_url, cartesia_url),
            fake_llm_provider(REPLY, ttft=LLM_TTFT_S, tokens_per_sec=TOKENS_PER_S) as llm_url,
        ):
            env = vendor_env(
                urls,
                (whisper_url, cartesia_url, llm_url),
                speculate=speculate,
                sync=sync,
            )
            async with libra_processes(env, GROUPS):
                vendors = (whisper_url, cartesia_url, llm_url)
                figures = await _measure(env, settings, vendors, turns=turns)
    results.update(figures.results())
    report(
        results,
        as_json=as_json,
        title="libra bench voice (end of speech to the first synthesized audio at the edge; "
        "own: beyond the silence rules and the vendors as a bare client sees them; "
        "stages: own time along the generation path, p50)",
    )
    return results


def vendor_env(
    urls: BenchServers, vendors: tuple[str, str, str], *, speculate: bool = True, sync: bool = True
) -> dict[str, str]:
    """The environment of Libra's processes against the simulated vendors (whisper, cartesia,
    llm URLs) and the bench's servers."""
    whisper_url, cartesia_url, llm_url = vendors
    return {
        **{k: v for k, v in os.environ.items() if not k.endswith(("_KEY", "_URL"))},
        "NATS_URL": urls.nats_url if sync else urls.nats_nosync_url,
        "DATABASE_URL": urls.database_url,
        "REDIS_URL": urls.redis_url,
        "LOG_LEVEL": "WARNING",
        "LLM_CACHE_ENABLED": "0",
        "RATE_LIMIT_TURNS": "1000000",
        # the OpenAI-compatible path through the official SDK; without an OpenAI key,
        # memories use the local embedder (an embedding API is not among the vendors
        # simulated here)
        "LLM_PROVIDERS": "local",
        "LLM_BASE_URL": llm_url,
        "ASR_ENGINES": "groq",
        "GROQ_API_KEY": "gsk-bench",
        "GROQ_BASE_URL": whisper_url,
        "TTS_ENGINES": "cartesia",
        "CARTESIA_API_KEY": "sk-bench",
        "CARTESIA_BASE_URL": cartesia_url,
        "VOICE_SPECULATIVE_REPLY": "1" if speculate else "0",
    }
