"""`libra bench voice --local`: end of speech to first audio with no account at all.

The same edge and clock as :mod:`.voice` (espeak-ng speech fed in real time to Libra's own
``VoiceCapture`` with Silero VAD; first audio is the turn's first ``tts.synthesized`` seen by this
process), but every engine is the one in the box, on this machine: faster-whisper tiny.en, the
embedded SmolLM2 (llama.cpp) and espeak-ng (:mod:`.local`). Each turn is a new person in a new
conversation, so that every prompt is the persona and the question alone, and the bare model can
be given the very same prompt.

Per turn, the event timestamps split first audio into stages that add up to it: ``vad``
(capture published minus end of speech, the speculative pause included), ``asr`` (transcript
minus capture), ``admission`` (turn accepted minus transcript), ``llm`` (the delta that completes
the first sentence for the splitter minus the turn), ``tts`` (the first clip minus that delta)
and ``delivery`` (its receipt here minus its timestamp); ``*_share`` is each stage's part of
the total over the measured turns. ``cpu_*_ms_per_turn``: the CPU each `libra run` process (with
its children), the servers and this process (the edge: capture and VAD) took per measured turn.

The floor, measured in the same run after the turns, on the same CPU, with the engines called
directly from this process: faster-whisper on the last second of each captured utterance (what
is left to transcribe at the end of speech for a recogniser that keeps up with the speech),
llama-cpp to the first sentence of the same prompt (``LLM_TEMPERATURE=0``: the same reply), and
espeak-ng speaking that sentence. ``first_audio_floor_ratio`` is first audio p50 over the floor.
``floor_same_first_sentence`` counts the turns whose first clip said what the bare model wrote.

``--with-text`` adds the HTTP gateway and text turns on a provider fake (:mod:`.voice_text`),
alone after the warm-up, then during the measured voice turns (their CPU counts in the
processes' then), then alone again: the baseline is both alone windows, before and after, so
that the machine's drift over the run does not read as the voice turns' cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from libra.contracts import (
    AnyEvent,
    AsrTranscribed,
    LlmDelta,
    TtsSynthesized,
    TurnAbandoned,
    TurnAccepted,
    VoiceCaptured,
    VoiceEnded,
)
from libra.processors.asr.whisper import WhisperEngine
from libra.runtime.audio import AudioStore, resample_pcm
from libra.runtime.config import Settings
from libra.runtime.database import migrate
from libra.runtime.eventlog import EventLog

from ..embedded import free_port
from .common import (
    BenchServers,
    LibraProcess,
    cpu_seconds,
    cpu_spent,
    fake_llm_provider,
    median,
    percentile,
    report,
    servers,
)
from .local import BareLlama, espeak_seconds, local_env
from .voice import GROUPS, Edge, _sentence_delta, _Turn, speech_packets
from .voice_text import TEXT_REPLY, TextTurns

__all__ = ["run_bench_voice_local"]

STAGES = ("vad", "asr", "admission", "llm", "tts", "delivery")
# GROUPS by what each one does
_GROUPS = dict(zip(("turns", "asr", "llm", "tts", "projections"), GROUPS, strict=True))
_WARM_UP = 1
_TEXT_ALONE_S = 5.0
E = TypeVar("E")


@dataclass
class _Measured:
    """One measured turn: its stages (seconds), the clip the person heard first, and the
    captured utterance and accepted turn the floor is measured with."""

    stages: dict[str, float]
    clip_text: str
    capture: VoiceCaptured
    accepted: TurnAccepted
    abandoned: int


@dataclass
class _Floor:
    """The bare engines' times per measured turn, seconds."""

    asr: list[float] = field(default_factory=list)
    llm: list[float] = field(default_factory=list)
    llm_first_token: list[float] = field(default_factory=list)
    tts: list[float] = field(default_factory=list)
    same_sentence: int = 0
    sentence: str = ""


def _last(events: Sequence[AnyEvent], kind: type[E]) -> E:
    """The turn's last event of a kind (an incremental recogniser may send several)."""
    found = [e for e in events if isinstance(e, kind)]
    if not found:
        raise RuntimeError(f"the turn has no {kind.__name__}")
    return found[-1]


def _measured(turn: _Turn) -> _Measured:
    """Splits one turn's first audio into stages that add up to it."""
    ended = _last([e for _, e in turn.seen], VoiceEnded)
    seen = [(at, e) for at, e in turn.seen if e.turn == ended.turn]
    events = [e for _, e in seen]
    heard_at, first = next(
        (at, e) for at, e in seen if isinstance(e, TtsSynthesized) and e.index == 0
    )
    accepted = _last(events, TurnAccepted)
    heard = [e for e in events if isinstance(e, AsrTranscribed) and e.at <= accepted.at]
    captured = [e for e in events if isinstance(e, VoiceCaptured)]
    deltas = sorted((e for e in events if isinstance(e, LlmDelta)), key=lambda d: d.index)
    capture, transcript = captured[-1], heard[-1]
    sentence = _sentence_delta(deltas)
    marks = [
        turn.speech_end,
        capture.at.timestamp(),
        transcript.at.timestamp(),
        accepted.at.timestamp(),
        sentence.at.timestamp(),
        first.at.timestamp(),
        heard_at,
    ]
    return _Measured(
        stages={name: marks[i + 1] - marks[i] for i, name in enumerate(STAGES)},
        clip_text=first.text,
        capture=capture,
        accepted=accepted,
        abandoned=sum(1 for e in turn.seen if isinstance(e[1], TurnAbandoned)),
    )


@contextlib.asynccontextmanager
async def _libra(
    env: dict[str, str], urls: BenchServers, groups: dict[str, list[str]]
) -> AsyncIterator[dict[str, int]]:
    """Every component as a `libra run` process; yields the pids to read CPU times from."""
    procs = {name: LibraProcess(names, env, urls.folder) for name, names in groups.items()}
    try:
        for proc in procs.values():
            await proc.start()
        pids = {name: proc.pid for name, proc in procs.items()}
        pids.update({name: s.proc.pid for name, s in urls.embedded.items() if s.proc})
        yield {**pids, "edge": os.getpid()}
    finally:
        for proc in procs.values():
            await proc.stop()


async def _speak_turns(
    log: EventLog,
    audio: AudioStore,
    settings: Settings,
    pids: dict[str, int],
    turns: int,
    text: TextTurns | None,
) -> tuple[list[_Measured], dict[str, float]]:
    """The warm-up and measured turns, each a new person, with ``text`` turns alone after the
    warm-up, during the measured ones, and alone again after them; returns the turns and the CPU
    they took."""
    packets, last_voiced = speech_packets()

    async def spoken(n: int) -> _Turn:
        edge = Edge(log, audio, settings, conversation=f"bench-local-{n}", user=f"speaker-{n}")
        async with edge.running():
            turn = await edge.speak(packets, last_voiced)
        await asyncio.sleep(0.3)  # the person listens, then speaks again
        return turn

    for n in range(_WARM_UP):
        await spoken(n)
    if text is not None:
        await text.alone(_TEXT_ALONE_S)
    before = cpu_seconds(pids)
    async with text.running("with_voice") if text else contextlib.nullcontext():
        measured = [_measured(await spoken(n)) for n in range(_WARM_UP, _WARM_UP + turns)]
    spent = cpu_spent(before, cpu_seconds(pids))
    if text is not None:  # alone again: the baseline spans the voice turns, as the machine drifts
        await text.alone(_TEXT_ALONE_S)
    return measured, spent


async def _floor(audio: AudioStore, settings: Settings, turns: list[_Measured]) -> _Floor:
    """The engines' own times for each turn's work, called directly (after a warm-up each)."""
    whisper = WhisperEngine(
        "",
        device=settings.whisper_device,
        compute_type=settings.whisper_compute_type,
        beam_size=settings.whisper_beam_size,
    )
    llama = await asyncio.to_thread(BareLlama)
    voice = settings.espeak_voice_en
    floor = _Floor()
    for i, turn in enumerate([turns[0], *turns]):
        ref = turn.capture.audio
        pcm = resample_pcm(
            await audio.get(ref),
            rate=ref.sample_rate,
            channels=ref.channels,
            to_rate=16_000,
            to_channels=1,
        )
        last_second = pcm[-32_000:]
        started = asyncio.get_running_loop().time()
        await whisper.transcribe(last_second, None)
        asr = asyncio.get_running_loop().time() - started
        generation = await asyncio.to_thread(
            llama.generate, await BareLlama.messages(turn.accepted), whole=False
        )
        tts = await asyncio.to_thread(espeak_seconds, generation.sentence, voice)
        if i == 0:
            continue  # the warm-up: models loading
        floor.asr.append(asr)
        floor.llm.append(generation.first_sentence_s)
        floor.llm_first_token.append(generation.first_token_s)
        floor.tts.append(tts)
        floor.same_sentence += generation.sentence == turn.clip_text
        floor.sentence = generation.sentence
    return floor


def _results(turns: list[_Measured], floor: _Floor, cpu: dict[str, float]) -> dict:
    first_audio = [sum(t.stages.values()) * 1000 for t in turns]
    parts = {
        "asr_last_1s": median(floor.asr) * 1000,
        "llm_first_sentence": median(floor.llm) * 1000,
        "tts_first_sentence": median(floor.tts) * 1000,
    }
    floor_ms = sum(parts.values())
    p50 = percentile(first_audio, 50)
    total = sum(first_audio) / 1000
    return {
        "first_audio_p50_ms": p50,
        "first_audio_p99_ms": percentile(first_audio, 99),
        "floor_ms": floor_ms,
        "first_audio_floor_ratio": p50 / floor_ms,
        **{f"floor_{name}_ms": ms for name, ms in parts.items()},
        "floor_llm_first_token_ms": median(floor.llm_first_token) * 1000,
        "floor_same_first_sentence": floor.same_sentence,
        "first_sentence": turns[-1].clip_text,
        "bare_first_sentence": floor.sentence,
        **{f"{s}_p50_ms": percentile([t.stages[s] * 1000 for t in turns], 50) for s in STAGES},
        **{f"{s}_share": sum(t.stages[s] for t in turns) / total for s in STAGES},
        **{f"cpu_{name}_ms_per_turn": s * 1000 / len(turns) for name, s in sorted(cpu.items())},
        "abandoned": sum(t.abandoned for t in turns),
    }


def _text_results(text: TextTurns) -> dict:
    alone = percentile(text.times["alone"], 50)
    with_voice = percentile(text.times["with_voice"], 50)
    return {
        "text_turns_alone": len(text.times["alone"]),
        "text_turns_with_voice": len(text.times["with_voice"]),
        "text_first_reply_alone_p50_ms": alone,
        "text_first_reply_with_voice_p50_ms": with_voice,
        "text_with_voice_ratio_p50": with_voice / alone,
    }


async def run_bench_voice_local(
    settings: Settings, *, turns: int, with_text: bool, as_json: bool
) -> dict:
    """Runs ``turns`` spoken turns on the local engines and prints the figures and the floor;
    ``with_text``: and text turns on the HTTP API beside them."""
    results: dict = {"turns": turns, "asr_engine": WhisperEngine("").label}
    text = None
    async with servers(settings, postgres=True, redis=True) as urls:
        await migrate(urls.database_url)
        env = local_env(
            os.environ,
            NATS_URL=urls.nats_url,
            DATABASE_URL=urls.database_url,
            REDIS_URL=urls.redis_url,
        )
        groups = dict(_GROUPS)
        with contextlib.ExitStack() as stack:
            if with_text:
                port = free_port()
                env.update(
                    LLM_PROVIDERS="embedded,local",
                    LLM_BASE_URL=stack.enter_context(fake_llm_provider(TEXT_REPLY)),
                    HTTP_HOST="127.0.0.1",
                    HTTP_PORT=str(port),
                )
                groups["http"] = ["http"]
                text = TextTurns(f"http://127.0.0.1:{port}")
            local = Settings.from_env(env)
            async with _libra(env, urls, groups) as pids:
                log = await EventLog.connect(urls.nats_url, name="bench-voice-local-edge")
                try:
                    if text is not None:
                        await text.route_to_fake(log, urls.database_url)
                    audio = await AudioStore.open(log, max_bytes=local.max_audio_bytes)
                    measured, cpu = await _speak_turns(log, audio, local, pids, turns, text)
                    floor = await _floor(audio, local, measured)
                finally:
                    await log.close()
    results.update(_results(measured, floor, cpu))
    if text is not None:
        results.update(_text_results(text))
    report(
        results,
        as_json=as_json,
        title="libra bench voice --local (end of speech to the first synthesized audio, every "
        "engine on this machine; floor: whisper on the last 1 s + llama-cpp to the first "
        "sentence + espeak-ng on it, called bare in the same run)",
    )
    return results
