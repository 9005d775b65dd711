"""The tts processor: speaks the reply to each voice turn as it streams, in order.

It consumes ``turn.accepted`` on its durable consumer, so one instance owns each turn (the
reply's pieces are ordered, and a turn must not be split across instances), and ignores turns
that are not voice. For a voice turn it follows the turn's ``llm.delta`` events as they come
(:class:`~libra.runtime.follow.TurnFollower`), cuts them into sentences and synthesizes each one
as soon as it is complete, while the rest of the reply is still being written.

The audio goes out as ``tts.synthesized`` clips (``index`` 0, 1, ...), each stored as 48 kHz
stereo s16le under ``tts/<conversation>/<id>``. The first clip leaves with the first audio the
engine sends; each later one waits until it is as long as all the audio before it, or until its
sentence ends, so playback starts at once and never runs dry while the engine is faster than
real time. A sentence's text is on its first clip (later pieces of it have ``text`` ""), so the
clips' texts joined are what was said. The last clip has ``final`` set; when the reply ends after
its last audio went out, an empty clip carries ``final``. A failed reply (``llm.failed``) speaks
its message. Clip ids derive from the turn's id and the index: a redelivered turn is spoken
again, and the clips the log already has are dropped as duplicates.

A voice turn that admission refuses (``turn.rejected``: moderated, rate-limited, ...) in a call
is answered aloud with the refusal's message, as a person in a text channel reads it.

A speculative turn (answered before the end of the turn is certain) is spoken at once too, but
into a buffer: its clips are stored as they come and published only once ``turn.confirmed``
arrives, the ones made by then all at once, stamped with that moment. ``turn.abandoned`` or
``turn.rejected`` ends the synthesis, and what was made is never published (its audio is left
to the bucket's TTL).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import msgspec

from libra.contracts import (
    CONSUMERS,
    AnyEvent,
    LlmCompleted,
    LlmDelta,
    LlmFailed,
    TtsSynthesized,
    TurnAbandoned,
    TurnAccepted,
    TurnConfirmed,
    TurnRejected,
    derive,
    derive_id,
)
from libra.runtime.audio import AudioStore
from libra.runtime.config import ConfigError, Settings
from libra.runtime.eventlog import EventLog
from libra.runtime.follow import TurnFollower
from libra.runtime.metrics import VOICE_PROCESSING_SECONDS

from .base import TtsEngine, primary_language
from .cartesia import CartesiaEngine
from .chain import DISCORD_CHANNELS, DISCORD_RATE, Audio, SpeechInterrupted, TtsChain
from .cloudflare import CloudflareEngine
from .elevenlabs import ElevenLabsEngine
from .espeak import EspeakEngine
from .sentences import SentenceSplitter

__all__ = ["TtsProcessor", "build_engines", "spoken_language"]

_HANGUL = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")
_LATIN = re.compile(r"[A-Za-z]")
_FRAME_BYTES = DISCORD_RATE // 50 * DISCORD_CHANNELS * 2  # 20 ms: the smallest clip worth sending
# The llm processor may wait out timeouts and fall back across providers before its first
# piece; the follower reads the log back after this long without news, then gives up.
_REPLY_IDLE_S = 120.0
_CATCH_UP_S = 0.05


def spoken_language(sentence: str, reply_language: str) -> str:
    """Returns the language to speak ``sentence`` in: the reply's, unless the script says not.

    A Korean reply may quote English and the other way round; a voice reads its own script
    best, so Hangul is spoken with the Korean voice, and a Korean reply's sentence in Latin
    letters only with the English one.
    """
    language = primary_language(reply_language)
    if _HANGUL.search(sentence):
        return "ko"
    if language == "ko" and _LATIN.search(sentence):
        return "en"
    return language


class _Script:
    """The reply's sentences as they complete, handed from the follower to the speaker."""

    def __init__(self) -> None:
        self.sentences: list[str] = []
        self.done = False
        self.error: BaseException | None = None
        self._changed = asyncio.Event()

    @classmethod
    def of(cls, text: str) -> _Script:
        """A whole text, known at once (a refusal)."""
        script = cls()
        script.add(_sentences(text))
        script.finish()
        return script

    def add(self, sentences: list[str]) -> None:
        if sentences:
            self.sentences.extend(sentences)
            self._changed.set()

    def finish(self, error: BaseException | None = None) -> None:
        self.done, self.error = True, error
        self._changed.set()

    @property
    def finished(self) -> bool:
        """Nothing more will come: the reply is over and every sentence was taken."""
        return self.done and not self.sentences

    async def next(self) -> str | None:
        """Returns the next sentence, waiting for it; None at the end of the reply."""
        while not self.sentences:
            if self.done:
                if self.error is not None:
                    raise self.error
                return None
            self._changed.clear()
            await self._changed.wait()
        return self.sentences.pop(0)


class TtsProcessor:
    """Speaks each voice turn's reply as it streams."""

    spec = CONSUMERS["tts"]

    def __init__(self, log: EventLog, audio: AudioStore, chain: TtsChain) -> None:
        self.log = log
        self.audio = audio
        self.chain = chain

    async def handle(self, event: AnyEvent) -> AsyncIterator[TtsSynthesized]:
        if isinstance(event, TurnRejected) and _heard_live(event):
            async for clip in self._speak(event, _Script.of(event.message)):
                yield clip
            return
        if not isinstance(event, TurnAccepted) or event.modality != "voice":
            return
        script = _Script()
        confirmed = asyncio.get_running_loop().create_future()
        if not event.speculative:
            confirmed.set_result(True)
        follower = TurnFollower(
            self.log,
            event.conversation,
            event.turn,
            # a speculative turn's confirmation comes as a turn event
            domains=("llm", "turn") if event.speculative else ("llm",),
            until=(LlmCompleted, LlmFailed, TurnAbandoned, TurnRejected),
            restarts=False,  # what was said stays said: a restarted llm's rest is in its completed
        )
        async with follower:
            reader = asyncio.create_task(_read_reply(follower, script, confirmed))
            catch_up = asyncio.create_task(_catch_up(follower))
            try:
                async for clip in _once_confirmed(confirmed, self._speak(event, script)):
                    yield clip
            finally:
                for task in (reader, catch_up):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def _speak(
        self, turn: TurnAccepted | TurnRejected, script: _Script
    ) -> AsyncIterator[TtsSynthesized]:
        """Yields the turn's clips: pieces of each sentence's audio as it streams in."""
        index = sent = 0  # clips and bytes of audio sent so far in this turn
        final = False
        while (sentence := await script.next()) is not None:
            language = spoken_language(sentence, turn.language)
            started = time.perf_counter()
            text, pending, audio = sentence, b"", None
            try:
                async for audio in self.chain.stream(sentence, language):
                    pending += audio.pcm
                    # The first audio goes out at once; after that a piece waits until it is as
                    # long as everything sent before it, so playback never runs dry while the
                    # engine is faster than real time, and a sentence is a handful of clips.
                    if len(pending) >= max(sent, _FRAME_BYTES):
                        yield await self._clip(turn, index, text, language, audio, pending, started)
                        index, sent, text, pending = index + 1, sent + len(pending), "", b""
            except SpeechInterrupted:  # logged by the chain; what was said stays said
                pass
            # The end of the reply is known here only if its last audio is still to be sent;
            # otherwise an empty clip says it below.
            final = bool(pending) and script.finished
            if pending and audio is not None:
                yield await self._clip(turn, index, text, language, audio, pending, started, final)
                index, sent = index + 1, sent + len(pending)
        if not final:  # the reply ended after its last clip went out, or said nothing
            yield await self._clip(
                turn, index, "", turn.language, None, b"", time.perf_counter(), True
            )

    async def _clip(
        self,
        turn: TurnAccepted | TurnRejected,
        index: int,
        text: str,
        language: str,
        audio: Audio | None,
        pcm: bytes,
        started: float,
        final: bool = False,
    ) -> TtsSynthesized:
        key = f"tts/{index}"
        if audio is not None:
            stage = "tts_first_audio" if index == 0 else "tts"
            VOICE_PROCESSING_SECONDS.labels(stage).observe(time.perf_counter() - started)
        ref = await self.audio.put(
            f"tts/{turn.conversation}/{derive_id(turn.id, key)}",
            pcm,
            format="pcm_s16le",
            sample_rate=DISCORD_RATE,
            channels=DISCORD_CHANNELS,
        )
        return derive(
            turn,
            TtsSynthesized,
            key=key,
            audio=ref,
            index=index,
            text=text,
            engine=audio.engine if audio else "",
            voice=audio.voice if audio else "",
            language=language,
            ttfb_ms=audio.ttfb_ms if audio else 0.0,
            total_ms=round((time.perf_counter() - started) * 1000, 2) if audio else 0.0,
            final=final,
            origin=turn.origin,
        )


async def _catch_up(follower: TurnFollower) -> None:
    """Reads back what the log already has of the reply (a cached answer, a redelivered turn):
    soon, rather than after the follower's idle time, but not at once, while the llm builds its
    prompt on the same cores; the follower drops what it has seen already."""
    await asyncio.sleep(_CATCH_UP_S)
    await follower.catch_up()


async def _once_confirmed(
    confirmed: asyncio.Future[bool], clips: AsyncIterator[TtsSynthesized]
) -> AsyncIterator[TtsSynthesized]:
    """Yields the clips once the turn is confirmed (those made before, at once); else none."""
    if confirmed.done() and confirmed.result():
        async for clip in clips:
            yield clip
        return
    made: asyncio.Queue[TtsSynthesized | None] = asyncio.Queue()
    sent = asyncio.Event()

    async def make() -> None:
        try:
            async for clip in clips:
                made.put_nowait(clip)
                if confirmed.done():
                    # Decided: one clip at a time, the next made once this one is published,
                    # as without a buffer (the next clip's audio would be written first).
                    sent.clear()
                    await sent.wait()
        finally:
            made.put_nowait(None)

    maker = asyncio.create_task(make())
    try:
        if not await confirmed:
            return
        released = datetime.now(UTC)
        while (clip := await made.get()) is not None:
            yield msgspec.structs.replace(clip, at=max(clip.at, released))
            sent.set()
        await maker  # raises what stopped the synthesis, if anything did
    finally:
        maker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await maker


async def _read_reply(
    follower: TurnFollower, script: _Script, confirmed: asyncio.Future[bool]
) -> None:
    """Feeds the reply's sentences to the script as the llm writes them, and settles whether
    the turn goes ahead (a speculative turn's reply ends only after its confirmation)."""
    splitter = SentenceSplitter()
    heard = ""
    try:
        async for event in follower.events(idle_s=_REPLY_IDLE_S):
            match event:
                case LlmDelta():
                    heard += event.text
                    script.add(splitter.push(event.text))
                case LlmCompleted():
                    # Deltas live in a memory stream: if some never came, the whole reply is here.
                    if event.text.startswith(heard):
                        script.add(splitter.push(event.text[len(heard) :]))
                    script.add(splitter.flush())
                case LlmFailed():
                    script.add(splitter.flush())
                    script.add(_sentences(event.message))  # what they would have read: say it
                case TurnAbandoned() | TurnRejected():
                    _settle(confirmed, False)
            # (the llm ends a speculative turn's reply only once the turn is confirmed)
            if isinstance(event, TurnConfirmed | LlmCompleted | LlmFailed):
                _settle(confirmed, True)
    except Exception as exc:  # the speaker raises it, and the runtime retries the turn
        script.finish(exc)
        if not confirmed.done():
            confirmed.set_exception(exc)
        return
    script.finish()


def _sentences(text: str) -> list[str]:
    """A whole text's sentences, cut as a streamed reply's are."""
    splitter = SentenceSplitter()
    return splitter.push(text) + splitter.flush()


def _heard_live(rejected: TurnRejected) -> bool:
    """Whether a refusal is said aloud: a voice turn in a call (Discord); the HTTP voice API
    answers its refusals in its response."""
    return rejected.modality == "voice" and rejected.origin.platform != "http"


def _settle(confirmed: asyncio.Future[bool], value: bool) -> None:
    if not confirmed.done():
        confirmed.set_result(value)


def build_engines(settings: Settings) -> list[TtsEngine]:
    """Returns the engines in ``TTS_ENGINES`` order (default: every keyed one, then espeak)."""
    s = settings
    names = [n.strip() for n in s.tts_engines.split(",") if n.strip()]
    if not names:
        keyed = {
            "cartesia": s.cartesia_api_key,
            "elevenlabs": s.elevenlabs_api_key,
            "cloudflare": s.cf_api_token and s.cf_account_id,
        }
        names = [name for name, key in keyed.items() if key] + ["espeak"]
    return [_engine(name, s) for name in names]


def _engine(name: str, s: Settings) -> TtsEngine:
    timeout = s.tts_timeout_sec
    if name == "espeak":
        return EspeakEngine({"ko": s.espeak_voice_ko, "en": s.espeak_voice_en})
    if name == "cartesia" and s.cartesia_api_key:
        return CartesiaEngine(
            api_key=s.cartesia_api_key,
            base_url=s.cartesia_base_url,
            model=s.cartesia_model,
            voices={"ko": s.cartesia_voice_ko, "en": s.cartesia_voice_en},
            timeout_s=timeout,
        )
    if name == "elevenlabs" and s.elevenlabs_api_key:
        return ElevenLabsEngine(
            api_key=s.elevenlabs_api_key,
            base_url=s.elevenlabs_base_url,
            model=s.elevenlabs_model,
            voices={"ko": s.elevenlabs_voice_ko, "en": s.elevenlabs_voice_en},
            timeout_s=timeout,
        )
    if name == "cloudflare" and s.cf_api_token and s.cf_account_id:
        return CloudflareEngine(
            api_token=s.cf_api_token,
            account_id=s.cf_account_id,
            base_url=s.cf_base_url,
            model=s.cf_tts_model,
            timeout_s=timeout,
        )
    known = "cartesia, elevenlabs, cloudflare, espeak"
    if name in known.split(", "):
        raise ConfigError(f"TTS_ENGINES names {name}, but its key or account is not set")
    raise ConfigError(f"TTS_ENGINES: unknown engine {name!r} ({known})")
