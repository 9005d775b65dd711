"""The HTTP voice routes: a clip of speech in, through the log, a transcript and a spoken reply out.

- ``POST /api/stt/transcribe`` (multipart): ``file``, a 16-bit PCM WAV or raw PCM s16le mono at
  ``sampleRate`` (default 16000), and optionally ``userId``. Answers
  ``{"text", "language", "confidence"}``; no turn is made of it.
- ``POST /voice/process`` (JSON): ``{"userId", "audioData" (base64 PCM s16le mono),
  "sampleRate"}``. Answers server-sent events: ``{"type": "transcript", "text", ...}``, then
  ``{"type": "llm", "content"}`` as the reply streams (``"restart": true`` on the first piece
  of a reply the llm started over) and ``{"type": "audio", "data"}`` (a base64
  WAV, 48 kHz stereo) per synthesized clip, in order, ending with ``{"type": "done"}``.

Like every edge these routes call no engine. A clip is checked (base64, whole samples, a
supported rate, ``MAX_AUDIO_BYTES``), resampled to 16 kHz mono and run through the VAD with the
rules of a live capture; a clip without speech is refused (422 ``no_speech``) before anything
is stored. A clip with speech goes to the audio bucket and becomes one ``voice.captured``, not
speculative (the clip is complete) and, for the transcription route, with ``reply`` False. The
route then follows the turn's events; once the last clip has been sent it publishes
``reply.delivered``, as the chat route does for text. Without NATS both routes answer 503
``unavailable`` with ``Retry-After`` at once, as the chat route does.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import wave
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from libra.contracts import (
    AnyEvent,
    AsrTranscribed,
    DeadLetter,
    LlmCompleted,
    LlmDelta,
    LlmFailed,
    Origin,
    ReplyDelivered,
    TtsSynthesized,
    TurnAccepted,
    TurnRejected,
    VoiceCaptured,
    conversation_id,
    derive,
    make,
    new_id,
    user_id,
)
from libra.gateway.voice import FRAME_SAMPLES, SAMPLE_RATE, Segmenter, SegmenterConfig, SileroVad
from libra.runtime.audio import AudioStore, resample_pcm, wav_bytes
from libra.runtime.eventlog import EventLog
from libra.runtime.follow import ReplyTimeout, TurnFollower

from .app import Caller, _error, _rejection, _sse, log_down
from .inputs import MAX_ID_CHARS, UserId
from .limits import SpeechLimits, SpeechRefused

__all__ = ["SAMPLE_RATES", "VoiceOptions", "VoiceRequest", "install_voice"]

SAMPLE_RATES = (8_000, 16_000, 22_050, 24_000, 32_000, 44_100, 48_000)
_FOLLOWED = ("asr", "turn", "llm", "tts", "dead")  # a dead letter of the turn ends the wait
_FORM_SLACK = 64 * 1024  # multipart headers and fields around the file


class VoiceRequest(BaseModel):
    userId: UserId = Field(min_length=1, max_length=MAX_ID_CHARS)
    audioData: str = Field(description="The clip: base64 of PCM s16le mono")
    sampleRate: int = Field(default=16_000, description=f"Hz: one of {SAMPLE_RATES}")


class Transcription(BaseModel):
    text: str
    language: str
    confidence: float


class _BadAudio(Exception):
    """A clip the routes refuse; becomes the JSON error ``{"error", "message"}``."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message

    def response(self) -> JSONResponse:
        return _error(self.status, self.error, self.message)


def _base64_pcm(data: str, limit: int) -> bytes:
    if limit and len(data) * 3 // 4 > limit + 2:  # refused before decoding it
        raise _BadAudio(413, "too_large", f"the audio is over {limit} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _BadAudio(400, "invalid_audio", "audioData is not base64") from None


def _wav_pcm(data: bytes) -> tuple[bytes, int, int]:
    """Returns a WAV file's samples, sample rate and channel count."""
    try:
        with wave.open(io.BytesIO(data)) as w:
            width, rate, channels = w.getsampwidth(), w.getframerate(), w.getnchannels()
            samples = w.readframes(w.getnframes())
    # The stdlib parser's failures on a broken file are no closed set (wave.Error, EOFError, a
    # bare RuntimeError for a chunk longer than the file, struct.error), and its words name its
    # internals: any of them is the same refusal.
    except Exception:
        raise _BadAudio(400, "invalid_audio", "the file is not a readable WAV") from None
    if width != 2:
        raise _BadAudio(400, "invalid_audio", "the WAV is not 16-bit PCM")
    return samples, rate, channels


def _speech_in(pcm16k: bytes, config: SegmenterConfig) -> bool:
    """Whether the VAD finds an utterance in the clip, by the rules of a live capture."""
    segmenter = Segmenter(SileroVad(), replace(config, speculative_ms=0))
    samples = np.frombuffer(pcm16k, np.int16)
    samples = np.concatenate([samples, np.zeros(-len(samples) % FRAME_SAMPLES, np.int16)])
    for frame in samples.reshape(-1, FRAME_SAMPLES):
        if segmenter.feed(frame):
            return True
    return bool(segmenter.flush())


@dataclass(frozen=True)
class VoiceOptions:
    """What the voice routes need: the audio bucket (opened on first use), its size limit
    (``MAX_AUDIO_BYTES``, 0 for none), the VAD's rules and how much may be transcribed."""

    audio: Callable[[], Awaitable[AudioStore]]
    max_audio_bytes: int
    segmentation: SegmenterConfig
    limits: SpeechLimits


class _Clips:
    """Checks a clip, and stores the ones that hold speech."""

    def __init__(self, options: VoiceOptions) -> None:
        self.options = options

    async def capture(
        self, pcm: bytes, *, user: str, sample_rate: int, channels: int = 1, reply: bool
    ) -> VoiceCaptured:
        """Returns the ``voice.captured`` of a good clip, its audio stored (not yet published)."""
        limit = self.options.max_audio_bytes
        if limit and len(pcm) > limit:
            raise _BadAudio(413, "too_large", f"the audio is over {limit} bytes")
        if sample_rate not in SAMPLE_RATES:
            rates = ", ".join(map(str, SAMPLE_RATES))
            raise _BadAudio(
                400, "unsupported_sample_rate", f"audio at {sample_rate} Hz: send one of {rates}"
            )
        if channels not in (1, 2):
            raise _BadAudio(400, "invalid_audio", f"audio with {channels} channels: send mono")
        if not pcm:
            raise _BadAudio(400, "empty", "the audio is empty")
        if len(pcm) % (2 * channels):
            raise _BadAudio(400, "invalid_audio", "the audio is not whole 16-bit samples")
        pcm16k = resample_pcm(
            pcm, rate=sample_rate, channels=channels, to_rate=SAMPLE_RATE, to_channels=1
        )
        segmentation = self.options.segmentation
        if not await asyncio.to_thread(_speech_in, pcm16k, segmentation):  # ~0.1 ms a frame
            raise _BadAudio(422, "no_speech", "no speech was heard in the audio")
        conversation = conversation_id("http", user)
        event_id = new_id()
        ref = await (await self.options.audio()).put(
            f"voice/{conversation}/{event_id}", pcm16k, format="pcm_s16le", sample_rate=SAMPLE_RATE
        )
        return make(
            VoiceCaptured,
            id=event_id,
            conversation=conversation,
            user=user_id("http", user),
            audio=ref,
            origin=Origin(platform="http", channel=conversation),
            reply=reply,
        )


async def _follow(log: EventLog, captured: VoiceCaptured, idle_s: float) -> AsyncIterator[AnyEvent]:
    """Publishes the capture and yields its turn's events (its id is the turn's id)."""
    async with TurnFollower(
        log, captured.conversation, captured.id, domains=_FOLLOWED, until=()
    ) as follower:
        await log.publish(captured)
        async for event in follower.events(idle_s=idle_s):
            yield event


async def _next(events: AsyncIterator[AnyEvent], *kinds: type) -> AnyEvent:
    """Returns the next event of one of ``kinds``, or a dead letter of the turn."""
    async for event in events:
        if isinstance(event, (*kinds, DeadLetter)):
            return event
    raise ReplyTimeout("the turn ended without an answer")


_STAGES = {"asr": "transcribed", "turns": "admitted", "tts": "spoken"}


def _failure(letter: DeadLetter) -> tuple[str, str]:
    # The letter's error may quote a vendor's answer: the person gets the stage, not the text.
    stage = _STAGES.get(letter.consumer, "answered")
    return f"{letter.consumer}_failed", f"the speech could not be {stage}"


async def _admitted(events: AsyncIterator[AnyEvent]) -> AsrTranscribed | JSONResponse:
    """Waits for the transcript and the turn's admission; returns the transcript or a refusal."""
    heard = await _next(events, AsrTranscribed)
    if isinstance(heard, DeadLetter):
        return _error(502, *_failure(heard))
    if not heard.text:  # the VAD heard speech, the recogniser no words: no turn is made
        return _error(422, "no_speech", "no words were recognised in the audio")
    decision = await _next(events, TurnAccepted, TurnRejected)
    if isinstance(decision, DeadLetter):
        return _error(502, *_failure(decision))
    if isinstance(decision, TurnRejected):
        return _rejection(decision)
    return heard


class _Reply:
    """Writes one voice turn's events as server-sent events, clips in order."""

    def __init__(self, log: EventLog, audio: AudioStore, heard: AsrTranscribed) -> None:
        self.log, self.audio, self.heard = log, audio, heard
        self._clips: dict[int, TtsSynthesized] = {}
        self._next_clip = 0
        self.sent = 0
        self.replied = self.spoken = self.streamed = False

    async def stream(self, events: AsyncIterator[AnyEvent]) -> AsyncIterator[bytes]:
        heard = self.heard
        yield _sse(
            {
                "type": "transcript",
                "text": heard.text,
                "language": heard.language,
                "confidence": heard.confidence,
                "turn": heard.turn,
            }
        )
        try:
            async for event in events:
                async for chunk in self._write(event):
                    yield chunk
                if self.replied and self.spoken:
                    break
        except ReplyTimeout as exc:
            yield _sse({"type": "error", "error": "timeout", "message": str(exc)})
        finally:
            await events.aclose()
        yield _sse({"type": "done", "turn": heard.turn, "clips": self.sent})

    async def _write(self, event: AnyEvent) -> AsyncIterator[bytes]:
        match event:
            case LlmDelta(text=text, index=index):
                # The llm restarted mid-reply: its text starts over (the audio keeps to one try).
                restart = {"restart": True} if self.streamed and index == 0 else {}
                self.streamed = True
                yield _sse({"type": "llm", "content": text} | restart)
            case LlmCompleted():
                self.replied = True
            case LlmFailed():  # its message is spoken too: the clips still follow
                self.replied = True
                yield _sse({"type": "error", "error": event.error, "message": event.message})
            case TtsSynthesized():
                self._clips[event.index] = event
                while (clip := self._clips.pop(self._next_clip, None)) is not None:
                    self._next_clip += 1
                    if clip.audio.size:
                        yield _sse(await self._audio(clip))
                        self.sent += 1
                    if clip.final:
                        self.spoken = True
                        await self.log.publish(
                            derive(
                                clip,
                                ReplyDelivered,
                                key="delivered",
                                modality="voice",
                                clips=self.sent,
                                origin=clip.origin,
                            )
                        )
            case DeadLetter(consumer="tts"):  # (the llm's is told by its llm.failed)
                self.replied = self.spoken = True
                error, message = _failure(event)
                yield _sse({"type": "error", "error": error, "message": message})

    async def _audio(self, clip: TtsSynthesized) -> dict[str, Any]:
        ref = clip.audio
        pcm = await self.audio.get(ref)
        wav = wav_bytes(pcm, sample_rate=ref.sample_rate, channels=ref.channels)
        return {
            "type": "audio",
            "data": base64.b64encode(wav).decode("ascii"),
            "format": "wav",
            "sampleRate": ref.sample_rate,
            "channels": ref.channels,
            "durationMs": ref.duration_ms,
            "index": clip.index,
            "text": clip.text,
            "language": clip.language,
            "engine": clip.engine,
            "voice": clip.voice,
        }


def install_voice(
    app: FastAPI, log: EventLog, options: VoiceOptions, *, reply_idle_s: float
) -> dict[str, int]:
    """Adds the voice routes; returns the request body size each route needs."""
    clips = _Clips(options)

    @app.exception_handler(_BadAudio)
    @app.exception_handler(SpeechRefused)
    async def refused(_request: Request, exc: _BadAudio | SpeechRefused) -> JSONResponse:
        return exc.response()

    _install_transcribe(app, log, clips, reply_idle_s)
    _install_process(app, log, clips, reply_idle_s)
    if not options.max_audio_bytes:
        return {}
    need = options.max_audio_bytes * 4 // 3 + _FORM_SLACK  # base64 makes 4 bytes of every 3
    return {"/api/stt/transcribe": need, "/voice/process": need}


def _install_transcribe(app: FastAPI, log: EventLog, clips: _Clips, idle_s: float) -> None:
    @app.post(
        "/api/stt/transcribe",
        response_model=Transcription,
        summary="Speech to text: a WAV or raw PCM clip in, its transcript out",
        responses={422: {"description": "no speech in the audio"}},
    )
    async def transcribe(
        principal: Caller,
        file: Annotated[UploadFile, File(description="16-bit PCM WAV, or raw PCM s16le mono")],
        sampleRate: Annotated[int, Form(description="Hz, for raw PCM")] = 16_000,
        userId: Annotated[UserId, Form(max_length=MAX_ID_CHARS)] = "",
    ) -> Transcription | JSONResponse:
        user = userId or principal.user or "anonymous"
        if not principal.may_act_as(user):
            return _error(403, "forbidden", "this token may only transcribe as its own user")
        if (down := log_down(log)) is not None:  # (the clip goes to the log's object store)
            return down
        data = await file.read()
        channels = 1
        if data[:4] == b"RIFF":
            data, sampleRate, channels = _wav_pcm(data)
        async with clips.options.limits.transcribing(user_id("http", user)):
            captured = await clips.capture(
                data, user=user, sample_rate=sampleRate, channels=channels, reply=False
            )
            events = _follow(log, captured, idle_s)
            try:
                heard = await _next(events, AsrTranscribed)
            except ReplyTimeout as exc:
                return _error(504, "timeout", str(exc))
            finally:
                await events.aclose()
        if isinstance(heard, DeadLetter):
            return _error(502, *_failure(heard))
        if not heard.text:
            return _error(422, "no_speech", "no words were recognised in the audio")
        return Transcription(text=heard.text, language=heard.language, confidence=heard.confidence)


def _install_process(app: FastAPI, log: EventLog, clips: _Clips, idle_s: float) -> None:
    @app.post(
        "/voice/process",
        summary="Talk to Libra by voice: a clip in, the transcript and spoken reply streamed out",
        responses={422: {"description": "no speech in the audio"}},
    )
    async def process(body: VoiceRequest, principal: Caller) -> Response:
        if not principal.may_act_as(body.userId):
            return _error(403, "forbidden", "this token may only talk as its own user")
        if (down := log_down(log)) is not None:
            return down
        pcm = _base64_pcm(body.audioData, clips.options.max_audio_bytes)
        async with clips.options.limits.transcribing(user_id("http", body.userId)):
            captured = await clips.capture(
                pcm, user=body.userId, sample_rate=body.sampleRate, reply=True
            )
            events = _follow(log, captured, idle_s)
            try:
                heard = await _admitted(events)
            except ReplyTimeout as exc:
                heard = _error(504, "timeout", str(exc))
        if isinstance(heard, JSONResponse):
            await events.aclose()
            return heard
        # the stream closes the follower when the reply ends or the client goes
        return StreamingResponse(
            _Reply(log, await clips.options.audio(), heard).stream(events),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Libra-Turn": captured.id},
        )
