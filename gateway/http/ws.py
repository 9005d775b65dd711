"""The WebSocket API (``/ws``): one socket per person, voice and text both ways, in real time.

The protocol is in README ("WebSocket"): JSON text frames for control, binary frames for audio
(16-bit PCM mono; the client's microphone at the ``hello``'s rate, Libra's speech at the rate
``ready`` names). Like every edge this module calls no engine: the microphone goes through a
:class:`~libra.gateway.voice.VoiceCapture` as a Discord speaker's does (VAD, early cut,
speculative reply, confirmation), typed messages become ``text.received``, and each turn's
events are followed from the log, so replay and evals see a web turn as any other
(``platform`` ``web``).

What a slow or hostile client gets: a frame over ``MAX_FRAME_BYTES``, an unknown type, a wrong
sample rate, audio before ``hello``: an ``error`` message, and the socket stays open. Audio a
slow reader lets pile up is dropped, oldest first; past ``_MAX_QUEUED`` messages the socket is
closed (1013). A socket that does not say ``hello`` within ``_HELLO_S``, or says nothing for
``idle_s``, is closed. A reconnect that names its conversation follows the reply in progress
again, from the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.errors
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.exceptions import HTTPException
from nats.aio.msg import Msg
from prometheus_client import Gauge, Histogram

from libra.contracts import (
    LOG_STREAM,
    AnyEvent,
    AsrTranscribed,
    DeadLetter,
    EventDecodeError,
    LlmCompleted,
    LlmDelta,
    LlmFailed,
    Origin,
    ReplyDelivered,
    TextReceived,
    TtsSynthesized,
    TurnAccepted,
    TurnRejected,
    VoiceCaptured,
    VoiceResumed,
    conversation_id,
    decode_event,
    derive,
    make,
    user_id,
)
from libra.gateway.voice import SegmenterConfig, VoiceCapture
from libra.runtime.audio import AudioStore, resample_pcm
from libra.runtime.eventlog import EventLog
from libra.runtime.follow import ReplyTimeout, TurnFollower

from .auth import Authenticator, Principal
from .inputs import MAX_ID_CHARS, id_problem

__all__ = ["MAX_FRAME_BYTES", "OUT_RATE", "RATES", "WsOptions", "install_ws"]

log = logging.getLogger("libra.http.ws")

RATES = (16_000, 48_000)  # the microphone rates taken (what a browser's AudioContext can be)
OUT_RATE = 24_000  # Libra's speech on the socket: 16-bit PCM mono at this rate
MAX_FRAME_BYTES = 64 * 1024
MAX_TEXT_CHARS = 4_000
_FRAME_S = 0.020
_OUT_FRAME = int(OUT_RATE * _FRAME_S) * 2  # bytes of one 20 ms frame of Libra's speech
_LEAD_S = 0.2  # how far ahead of real time Libra's speech is sent
_MAX_AUDIO_QUEUED = OUT_RATE * 2 * 2  # 2 s of speech waiting for a slow reader: older is dropped
_MAX_QUEUED = 4_096  # messages waiting for a reader that does not read: the socket is closed
_HELLO_S = 10.0
_FOLLOWED = ("voice", "asr", "turn", "llm", "tts", "dead")
_STAGES = {"asr": "transcribed", "turns": "admitted", "tts": "spoken", "llm": "answered"}
SOCKETS = Gauge("libra_ws_sockets", "WebSocket connections open")
FRAME_SECONDS = Histogram(
    "libra_ws_frame_seconds",
    "Time to take one audio frame from a WebSocket (VAD and segmentation)",
    buckets=(5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 7.5e-4, 1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2.5e-2),
)
_decode_json = msgspec.json.Decoder(dict).decode
_encode_json = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class WsOptions:
    """What the socket needs beyond the log: credentials, the audio bucket, the VAD's rules."""

    auth: Authenticator
    audio: Callable[[], Awaitable[AudioStore]] | None  # None: no voice (text only)
    segmentation: SegmenterConfig | None
    reply_idle_s: float = 90.0
    idle_s: float = 300.0


class _Refused(Exception):
    """A message the socket answers with ``{"type": "error", ...}`` and otherwise ignores."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error, self.message = error, message


class _TooSlow(Exception):
    """The client does not read what it is sent."""


class _Outbox:
    """What goes to the client, in order. Speech a slow reader lets pile up is dropped, oldest
    first (it would be stale by the time it played); control messages never are."""

    def __init__(self, ws: WebSocket) -> None:
        self._ws = ws
        self._items: deque[str | bytes] = deque()
        self._audio = 0
        self._wake = asyncio.Event()
        self.dropped = 0

    def json(self, payload: dict[str, Any]) -> None:
        self._put(_encode_json(payload).decode())

    def audio(self, pcm: bytes) -> None:
        while self._audio + len(pcm) > _MAX_AUDIO_QUEUED:
            stale = next(i for i, item in enumerate(self._items) if isinstance(item, bytes))
            self._audio -= len(self._items[stale])
            del self._items[stale]
            self.dropped += 1
        self._audio += len(pcm)
        self._put(pcm)

    def _put(self, item: str | bytes) -> None:
        if len(self._items) >= _MAX_QUEUED:
            raise _TooSlow
        self._items.append(item)
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._items:
                item = self._items.popleft()
                if isinstance(item, bytes):
                    self._audio -= len(item)
                    await self._ws.send_bytes(item)
                else:
                    await self._ws.send_text(item)


@dataclass
class _Turn:
    """One turn on this socket, as far as it has been shown and played."""

    id: str
    voice: bool
    played: asyncio.Event = field(default_factory=asyncio.Event)
    speaking: bool = False
    interrupted: bool = False
    finished: bool = False  # ``done`` was sent
    clips: int = 0
    last: TtsSynthesized | None = None  # the latest clip (what a delivery derives from)


class _Speaker:
    """Plays the turns' speech on the socket, paced about real time, one turn at a time."""

    def __init__(self, outbox: _Outbox) -> None:
        self._outbox = outbox
        self._queue: asyncio.Queue[tuple[_Turn, bytes | None]] = asyncio.Queue()
        self._clock = 0.0  # loop time at which the speech sent so far ends playing
        self._waiting: dict[str, _Turn] = {}  # turns with speech queued or playing

    def say(self, turn: _Turn, pcm: bytes | None) -> None:
        """Queues speech of ``turn``; ``None`` marks its end."""
        self._waiting[turn.id] = turn
        self._queue.put_nowait((turn, pcm))

    def interrupt(self) -> list[_Turn]:
        """Stops the turn being spoken and drops the speech queued behind it (the person is
        talking: it would answer what they said before); returns those turns."""
        cut = [turn for turn in self._waiting.values() if not turn.played.is_set()]
        self._waiting.clear()
        for turn in cut:
            turn.interrupted = True
            turn.played.set()
        self._clock = 0.0
        return cut

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            turn, pcm = await self._queue.get()
            if turn.interrupted:
                continue
            if pcm is None:
                turn.played.set()
                self._waiting.pop(turn.id, None)
                continue
            if not turn.speaking:
                turn.speaking = True
                self._outbox.json({"type": "speaking", "turn": turn.id})
            for start in range(0, len(pcm), _OUT_FRAME):
                ahead = self._clock - loop.time()
                if ahead > _LEAD_S:
                    await asyncio.sleep(ahead - _LEAD_S)
                if turn.interrupted:
                    break
                chunk = pcm[start : start + _OUT_FRAME]
                self._outbox.audio(chunk)
                self._clock = max(self._clock, loop.time()) + len(chunk) / (2 * OUT_RATE)


class _Socket:
    """One person's socket: their microphone and messages in, their turns out."""

    def __init__(
        self, ws: WebSocket, log_: EventLog, options: WsOptions, principal: Principal
    ) -> None:
        self.ws, self.log, self.options, self.principal = ws, log_, options, principal
        self.outbox = _Outbox(ws)
        self.speaker = _Speaker(self.outbox)
        self.user = ""
        self.conversation = ""
        self.capture: VoiceCapture | None = None
        self._rate, self._mode = 16_000, "auto"
        self._hearing = False
        self._turns: dict[str, asyncio.Task[None]] = {}
        self._audio: AudioStore | None = None

    # --- the socket's life --------------------------------------------------------------------

    async def run(self) -> None:
        writer = asyncio.create_task(self.outbox.run())
        speaker = asyncio.create_task(self.speaker.run())
        subscription = None
        try:
            if not await self._hello():
                return
            if self.options.audio is not None:
                await self._open_voice()
            subscription = await self.log.nc.subscribe(
                f"libra.voice.captured.{self.conversation}", cb=self._on_captured
            )
            await self._resume()
            await self._listen()
        except _TooSlow:
            await self.ws.close(1013, "the client does not read what it is sent")
        except WebSocketDisconnect:
            pass
        finally:
            if subscription is not None:
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()
            if self.capture is not None:
                await self.capture.close()  # what the person was saying is settled and written
            for task in (*self._turns.values(), speaker):
                task.cancel()
            await asyncio.gather(*self._turns.values(), speaker, return_exceptions=True)
            await asyncio.sleep(0)  # the writer sends what the cancelled turns queued last
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    async def _receive(self, timeout: float) -> dict[str, Any] | None:
        """The next message (None on disconnect); raises TimeoutError past ``timeout``."""
        async with asyncio.timeout(timeout):
            message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            return None
        return message

    async def _hello(self) -> bool:
        """Waits for a good ``hello``; each bad one gets an error. False: the socket is over."""
        while True:
            try:
                message = await self._receive(_HELLO_S)
            except TimeoutError:
                await self.ws.close(1008, "say hello first")
                return False
            if message is None:
                return False
            try:
                self._start(self._json(message, first=True))
                return True
            except _Refused as refused:
                self._error(refused.error, refused.message)

    async def _listen(self) -> None:
        while True:
            try:
                message = await self._receive(self.options.idle_s)
            except TimeoutError:
                await self.ws.close(1000, "idle")
                return
            if message is None:
                return
            try:
                if message.get("bytes") is not None:
                    with FRAME_SECONDS.time():
                        self._on_audio(message["bytes"])
                else:
                    self._on_control(self._json(message))
            except _Refused as refused:
                self._error(refused.error, refused.message)

    def _json(self, message: dict[str, Any], *, first: bool = False) -> dict[str, Any]:
        text = message.get("text")
        if text is None:
            if first:
                raise _Refused("invalid_request", 'say {"type": "hello", "userId": ...} first')
            raise _Refused("invalid_request", "binary frames carry audio only")
        if len(text) > MAX_FRAME_BYTES:
            raise _Refused("too_large", f"a message is over {MAX_FRAME_BYTES} bytes")
        try:
            payload = _decode_json(text)
        except msgspec.DecodeError:
            raise _Refused("invalid_request", "a text frame must be a JSON object") from None
        if first and payload.get("type") != "hello":
            raise _Refused("invalid_request", 'say {"type": "hello", "userId": ...} first')
        return payload

    def _error(self, error: str, message: str, **more: Any) -> None:
        self.outbox.json({"type": "error", "error": error, "message": message, **more})

    # --- hello ---------------------------------------------------------------------------------

    def _start(self, hello: dict[str, Any]) -> None:
        user = hello.get("userId") or self.principal.user or ""
        if not isinstance(user, str) or not user:
            raise _Refused("invalid_request", "hello needs a userId")
        if len(user) > MAX_ID_CHARS or (problem := id_problem(user)) is not None:
            raise _Refused("invalid_request", f"userId {problem or 'is too long'}")
        if not self.principal.may_act_as(user):
            raise _Refused("forbidden", "this token may only talk as its own user")
        own = conversation_id("web", user)
        conversation = hello.get("conversation") or own
        if conversation != own and not str(conversation).startswith(own + "-"):
            raise _Refused("forbidden", "a conversation of this user's own (from ready) only")
        rate, mode = hello.get("sampleRate", 16_000), hello.get("mode", "auto")
        if rate not in RATES:
            raise _Refused(
                "unsupported_sample_rate", f"microphone audio at {rate} Hz: send 16000 or 48000"
            )
        if mode not in ("auto", "manual"):
            raise _Refused("invalid_request", 'mode is "auto" or "manual"')
        self.user, self.conversation = user, conversation
        self._rate, self._mode = rate, mode
        self.outbox.json(
            {
                "type": "ready",
                "conversation": conversation,
                "sampleRate": OUT_RATE,
                "mode": mode,
                "voice": self.options.audio is not None,
            }
        )

    async def _open_voice(self) -> None:
        """Opens the microphone's capture before the next message is read, so that audio and
        push-to-talk work from the first; without the audio bucket, text still does."""
        try:
            await self._voice()
        except (nats.errors.Error, TimeoutError):
            self._error("unavailable", "Libra cannot take voice just now; text still works")

    async def _store(self) -> AudioStore:
        if self._audio is None:
            assert self.options.audio is not None
            self._audio = await self.options.audio()
        return self._audio

    async def _voice(self) -> VoiceCapture:
        """The microphone's capture (it needs the audio bucket)."""
        if self.capture is None:
            store = await self._store()
            self.capture = VoiceCapture(
                self.log,
                store,
                conversation=self.conversation,
                user=user_id("web", self.user),
                origin=Origin(platform="web", channel=self.conversation),
                config=self.options.segmentation,
                automatic=self._mode == "auto",
                sample_rate=self._rate,
                channels=1,
            )
            self.capture.start()
        return self.capture

    # --- what the person sends -------------------------------------------------------------------

    def _on_audio(self, pcm: bytes) -> None:
        if self.options.audio is None:
            raise _Refused("invalid_request", "this server takes no voice")
        if len(pcm) > MAX_FRAME_BYTES:
            raise _Refused("too_large", f"an audio frame is over {MAX_FRAME_BYTES} bytes")
        if len(pcm) % 2:
            raise _Refused("invalid_audio", "audio is whole 16-bit samples")
        if self.capture is None:
            raise _Refused("unavailable", "Libra cannot take voice just now; try again shortly")
        self.capture.feed(pcm)
        self._heard()

    def _heard(self) -> None:
        """Barge-in and the page's state: the VAD heard the person start talking."""
        assert self.capture is not None
        hearing = self.capture.segmenter.in_utterance
        if hearing and not self._hearing:
            self.outbox.json({"type": "listening"})
            self._interrupt()
        self._hearing = hearing

    def _on_control(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        match kind:
            case "text":
                self._on_text(message.get("text"))
            case "start" | "stop":
                self._on_push(kind)
            case "mode":
                self._on_mode(message.get("mode"))
            case "interrupt":
                self._interrupt()
            case "hello":
                raise _Refused("invalid_request", "hello was said already")
            case _:
                raise _Refused("unknown_type", f"no message of type {kind!r}")

    def _on_text(self, text: object) -> None:
        if not isinstance(text, str) or not text.strip():
            raise _Refused("invalid_request", "a text message needs some text")
        if len(text) > MAX_TEXT_CHARS:
            raise _Refused("too_long", f"a message is over {MAX_TEXT_CHARS} characters")
        self._follow(self._said(text), voice=False)

    def _on_push(self, what: str) -> None:
        """Push-to-talk, in manual mode."""
        if self.capture is None or self.capture.segmenter.automatic:
            raise _Refused("invalid_request", f"{what} is for manual mode, once audio comes")
        if what == "start":
            self._interrupt()
            self.capture.start_recording()
        else:
            self.capture.stop_recording()

    def _on_mode(self, mode: object) -> None:
        if mode not in ("auto", "manual"):
            raise _Refused("invalid_request", 'mode is "auto" or "manual"')
        self._mode = str(mode)
        if self.capture is not None:
            self.capture.set_automatic(mode == "auto")

    def _said(self, text: str) -> TextReceived:
        return make(
            TextReceived,
            conversation=self.conversation,
            user=user_id("web", self.user),
            text=text,
            origin=Origin(platform="web", channel=self.conversation),
        )

    def _interrupt(self) -> None:
        for turn in self.speaker.interrupt():
            log.info("turn %s interrupted", turn.id)
            self._done(turn, "")  # at once: the page stops playing what it holds
            if turn.last is not None:  # delivered as far as it was heard
                self._background(f"cut-{turn.id}", self._delivered(turn))

    def _background(self, name: str, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._turns[name] = task
        task.add_done_callback(lambda _: self._turns.pop(name, None))

    # --- the turns -----------------------------------------------------------------------------

    async def _on_captured(self, msg: Msg) -> None:
        try:
            event = decode_event(msg.data)
        except EventDecodeError:
            return
        if isinstance(event, VoiceCaptured) and event.reply and event.id not in self._turns:
            self.outbox.json({"type": "heard", "turn": event.id})
            self._follow(event, voice=True)

    async def _resume(self) -> None:
        """After a reconnect: follows the conversation's reply still in progress, if any."""
        try:
            last = await self.log.js.get_last_msg(LOG_STREAM, f"libra.turn.*.{self.conversation}")
            decision = decode_event(last.data or b"")
        except (nats.errors.Error, EventDecodeError, TimeoutError):
            return  # nothing of this conversation, or no log: nothing to resume
        if not isinstance(decision, TurnAccepted):
            return
        with contextlib.suppress(nats.errors.Error, TimeoutError, EventDecodeError):
            done = await self.log.js.get_last_msg(
                LOG_STREAM, f"libra.reply.delivered.{self.conversation}"
            )
            if decode_event(done.data or b"").turn == decision.turn:
                return
        self._follow(None, voice=decision.modality == "voice", turn=decision.turn)

    def _follow(self, start: AnyEvent | None, *, voice: bool, turn: str = "") -> None:
        turn = turn or (start.id if start is not None else "")
        self._background(turn, self._turn(_Turn(turn, voice), start))

    async def _turn(self, turn: _Turn, start: AnyEvent | None) -> None:
        try:
            async with TurnFollower(
                self.log, self.conversation, turn.id, domains=_FOLLOWED, until=()
            ) as follower:
                if isinstance(start, TextReceived):
                    await self.log.publish(start)
                else:
                    await follower.catch_up()  # what came before the follower subscribed
                await self._show(turn, follower.events(idle_s=self.options.reply_idle_s))
        except (nats.errors.Error, TimeoutError):
            self._error("unavailable", "Libra's event log is unreachable; try again shortly")
            self._done(turn, "")
        except ReplyTimeout as exc:
            self._error("timeout", str(exc), turn=turn.id)
            self._done(turn, "")
        except _TooSlow:
            with contextlib.suppress(Exception):
                await self.ws.close(1013, "the client does not read what it is sent")

    async def _show(self, turn: _Turn, events: Any) -> None:
        """Sends the turn's events to the client until the turn is over."""
        view = _TurnView(self, turn)
        async for event in events:
            if turn.finished or await view.take(event):
                break
        if not turn.finished:
            self._done(turn, view.text)

    async def _speak(self, turn: _Turn, clip: TtsSynthesized) -> None:
        turn.last = clip
        if clip.audio.size and not turn.interrupted:
            ref = clip.audio
            pcm = resample_pcm(
                await (await self._store()).get(ref),
                rate=ref.sample_rate,
                channels=ref.channels,
                to_rate=OUT_RATE,
                to_channels=1,
            )
            turn.clips += 1
            self.speaker.say(turn, pcm)
        if clip.final:
            self.speaker.say(turn, None)
            await turn.played.wait()
            if not turn.interrupted:  # (an interrupted one was delivered when it was cut)
                await self._delivered(turn)

    async def _delivered(self, turn: _Turn) -> None:
        assert turn.last is not None
        await self.log.publish(
            derive(
                turn.last,
                ReplyDelivered,
                key="delivered",
                modality="voice",
                clips=turn.clips,
                interrupted=turn.interrupted,
                origin=turn.last.origin,
            )
        )

    def _done(self, turn: _Turn, text: str) -> None:
        turn.finished = True
        done: dict[str, Any] = {"type": "done", "turn": turn.id}
        if turn.interrupted:
            done["interrupted"] = True
        if text:
            done["text"] = text
        self.outbox.json(done)


class _TurnView:
    """One turn's events, shown on the socket; :meth:`take` says when the turn is over.

    A typed turn ends with its reply (or refusal); a spoken one with its last clip played, as
    a voice turn's refusals and failures are spoken too.
    """

    def __init__(self, socket: _Socket, turn: _Turn) -> None:
        self.socket, self.turn = socket, turn
        self.pieces: list[str] = []
        self.streamed = False
        self.clips: dict[int, TtsSynthesized] = {}
        self.next_clip = 0

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    async def take(self, event: AnyEvent) -> bool:
        handler = _VIEW.get(type(event))
        return bool(handler is not None and await handler(self, event))

    def _send(self, payload: dict[str, Any]) -> None:
        self.socket.outbox.json(payload | {"turn": self.turn.id})

    async def resumed(self, _event: VoiceResumed) -> bool:
        self.turn.finished = True  # the person talked on: this cut was not a turn
        return True

    async def transcribed(self, event: AsrTranscribed) -> bool:
        if not event.text:
            self._send({"type": "error", "error": "no_speech", "message": "no words were heard"})
            return True
        self._send({"type": "transcript", "text": event.text, "language": event.language})
        return False

    async def accepted(self, _event: TurnAccepted) -> bool:
        if not self.turn.voice:
            self._send({"type": "accepted"})
        return False

    async def rejected(self, event: TurnRejected) -> bool:
        more: dict[str, Any] = {}
        if event.retry_after_s is not None:
            more["retryAfter"] = event.retry_after_s
        if event.reason == "moderated" and event.moderation is not None:
            more["categories"] = list(event.moderation.categories)
        self._send({"type": "error", "error": event.reason, "message": event.message} | more)
        return not self.turn.voice

    async def delta(self, event: LlmDelta) -> bool:
        restart = self.streamed and event.index == 0  # the llm started its reply over
        self.pieces = [] if restart else self.pieces
        self.streamed = True
        self.pieces.append(event.text)
        self._send(
            {"type": "delta", "content": event.text} | ({"restart": True} if restart else {})
        )
        return False

    async def completed(self, event: LlmCompleted) -> bool:
        self.pieces = [event.text] if event.text else self.pieces
        if self.turn.voice:
            return False
        await self.socket.log.publish(
            derive(event, ReplyDelivered, key="delivered", origin=event.origin)
        )
        return True

    async def failed(self, event: LlmFailed) -> bool:
        self._send({"type": "error", "error": event.error, "message": event.message})
        return not self.turn.voice

    async def synthesized(self, event: TtsSynthesized) -> bool:
        if not self.turn.voice:
            return False
        self.clips[event.index] = event
        while (clip := self.clips.pop(self.next_clip, None)) is not None:
            self.next_clip += 1
            await self.socket._speak(self.turn, clip)
        return self.turn.played.is_set()

    async def dead(self, event: DeadLetter) -> bool:
        stage = _STAGES.get(event.consumer, "answered")
        error, message = f"{event.consumer}_failed", f"the turn could not be {stage}"
        self._send({"type": "error", "error": error, "message": message})
        return True


_VIEW: dict[type, Callable[[_TurnView, Any], Awaitable[bool]]] = {
    VoiceResumed: _TurnView.resumed,
    AsrTranscribed: _TurnView.transcribed,
    TurnAccepted: _TurnView.accepted,
    TurnRejected: _TurnView.rejected,
    LlmDelta: _TurnView.delta,
    LlmCompleted: _TurnView.completed,
    LlmFailed: _TurnView.failed,
    TtsSynthesized: _TurnView.synthesized,
    DeadLetter: _TurnView.dead,
}


def _principal(auth: Authenticator, ws: WebSocket) -> Principal:
    """The caller, from the headers as for HTTP, or from ``?token=`` (a browser's only way)."""
    token = ws.query_params.get("token", "")
    return auth.from_token(token) if token else auth(ws)


def install_ws(app: FastAPI, log_: EventLog, options: WsOptions) -> None:
    """Adds ``/ws``."""

    @app.websocket("/ws")
    async def socket(ws: WebSocket) -> None:
        await ws.accept()  # first, so that a refusal can say why (a browser sees no status)
        try:
            principal = _principal(options.auth, ws)
        except HTTPException as exc:
            detail = exc.detail if isinstance(exc.detail, dict) else {}
            await ws.close(1008, str(detail.get("message", "unauthorized"))[:120])
            return
        started = time.monotonic()
        session = _Socket(ws, log_, options, principal)
        with SOCKETS.track_inprogress():
            await session.run()
        log.info(
            "socket of %s closed after %.0fs (%d stale audio frames dropped)",
            session.user or "nobody",
            time.monotonic() - started,
            session.outbox.dropped,
        )
