"""The WebSocket API (/ws) on the real stack: NATS, PostgreSQL, Redis, the voice pipeline with
the Groq Whisper wire's fake, espeak-ng speaking, and a real websocket client (``websockets``)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import numpy as np
import pytest
import websockets
from websockets.asyncio.client import ClientConnection, connect

from libra.contracts import ReplyDelivered, TextReceived, VoiceCaptured
from libra.ops.fakes.groq_whisper import FakeGroqWhisper
from libra.ops.fakes.llm_wire import Behaviour, FakeLlmWire
from libra.runtime.config import Settings
from libra.runtime.eventlog import EventLog

from .helpers import eventually, stream_events
from .stack import TEXT_PIPELINE, answering_with, running
from .voice_samples import silence, speech

pytestmark = pytest.mark.timeout(90)

REPLY = "It is sunny and warm today. A good day for a walk!"
LONG_REPLY = " ".join(["Here is a long answer that goes on for a while."] * 12)
SECRET = "jwt-secret-that-is-long-enough-789"
PIPELINE = [*TEXT_PIPELINE, "asr", "tts", "http"]


def _settings(settings: Settings, wire: FakeLlmWire, whisper: FakeGroqWhisper, **extra: str):
    """The OpenAI wire's fake answering, Groq Whisper's hearing, espeak-ng speaking."""
    return answering_with(
        settings,
        wire,
        LLM_PROVIDERS="openai",
        GROQ_API_KEY="gsk-test-key",
        **whisper.env(),
        ASR_ENGINES="groq",
        TTS_ENGINES="espeak",
        **extra,
    )


class Stack:
    def __init__(self, settings: Settings, log: EventLog, wire: FakeLlmWire) -> None:
        self.settings, self.log, self.wire = settings, log, wire
        self.url = f"ws://127.0.0.1:{settings.http_port}/ws"


async def _up(port: int) -> None:
    async def up() -> bool:
        try:
            async with httpx.AsyncClient() as http:
                return (await http.get(f"http://127.0.0.1:{port}/api/health")).status_code == 200
        except httpx.HTTPError:
            return False

    await eventually(up, timeout=15)


@pytest.fixture
async def whisper() -> AsyncIterator[FakeGroqWhisper]:
    async with FakeGroqWhisper(transcript="What is the weather like today?") as fake:
        yield fake


@pytest.fixture
async def stack(settings: Settings, whisper: FakeGroqWhisper) -> AsyncIterator[Stack]:
    async with FakeLlmWire(reply=Behaviour.ok(REPLY)) as wire:
        s = _settings(settings, wire, whisper)
        async with running(s, PIPELINE) as resources:
            await _up(s.http_port)
            yield Stack(s, resources.log, wire)


class Client:
    """A socket and what it received, control messages and audio apart."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.messages: list[dict[str, Any]] = []
        self.audio: list[tuple[float, bytes]] = []
        self.audio_turns: list[str] = []  # the turn each audio frame belongs to (its speaking)
        self.closed: websockets.ConnectionClosed | None = None
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                if isinstance(frame, bytes):
                    self.audio.append((time.monotonic(), frame))
                    self.audio_turns.append(self.of("speaking")[-1]["turn"])
                else:
                    self.messages.append(json.loads(frame))
        except websockets.ConnectionClosed as closed:
            self.closed = closed
        else:
            self.closed = True  # type: ignore[assignment]

    async def send(self, **message: Any) -> None:
        await self.ws.send(json.dumps(message))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == kind]

    async def wait(self, kind: str, count: int = 1, timeout: float = 20.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.of(kind)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {kind!r} within {timeout}s; got {self.messages}")
            if self.closed is not None:
                raise AssertionError(f"closed ({self.closed}) before {kind!r}: {self.messages}")
            await asyncio.sleep(0.01)
        return self.of(kind)

    async def wait_audio(self, frames: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.audio) < frames:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.audio)} audio frames within {timeout}s")
            await asyncio.sleep(0.01)

    async def stream_mic(self, samples: np.ndarray, *, frame_ms: int = 40) -> None:
        """Sends 16 kHz mono samples in real time, as a browser's microphone would."""
        step = 16 * frame_ms
        start = time.monotonic()
        for i, at in enumerate(range(0, len(samples), step)):
            await asyncio.sleep(max(0.0, start + i * frame_ms / 1000 - time.monotonic()))
            await self.ws.send(samples[at : at + step].tobytes())


async def _client(url: str, **hello: Any) -> Client:
    client = Client(await connect(url, max_size=2**22))
    await client.send(type="hello", **hello)
    return client


async def _events(log: EventLog, subject: str) -> list:
    return await stream_events(log.js, "LIBRA", subject)


async def _delivery(log: EventLog, turn: str) -> ReplyDelivered:
    """The turn's ``reply.delivered``, once it is in the log."""
    found: list[ReplyDelivered] = []

    async def delivered() -> bool:
        events = await _events(log, "libra.reply.delivered.>")
        found[:] = [e for e in events if e.turn == turn and isinstance(e, ReplyDelivered)]
        return bool(found)

    await eventually(delivered, timeout=10)
    return found[0]


async def _closed(client: Client) -> None:
    async def closed() -> bool:
        return client.closed is not None

    await eventually(closed, timeout=5)


# --- text --------------------------------------------------------------------------------------


async def test_a_typed_message_streams_its_reply_and_is_delivered(stack: Stack) -> None:
    client = await _client(stack.url, userId="alice", sampleRate=16000)
    [ready] = await client.wait("ready")
    assert ready["conversation"] == "web-alice" and ready["sampleRate"] == 24000
    await client.send(type="text", text="What is the weather like?")
    [done] = await client.wait("done")
    deltas = client.of("delta")
    assert "".join(d["content"] for d in deltas) == REPLY == done["text"]
    assert {d["turn"] for d in deltas} == {done["turn"]} and client.of("accepted")
    said = [e for e in await _events(stack.log, "libra.text.received.>") if e.id == done["turn"]]
    assert said[0].user == "web:alice" and said[0].origin.platform == "web"
    await _delivery(stack.log, done["turn"])
    await client.ws.close()


async def test_bad_messages_get_errors_and_the_socket_stays_open(stack: Stack) -> None:
    client = Client(await connect(stack.url))
    await client.ws.send(b"\x00\x01")  # audio before hello
    await client.ws.send("not json")
    await client.send(type="hello", userId="bob", sampleRate=22050)  # a rate it does not take
    await client.send(type="hello", userId="bob", sampleRate=16000)
    await client.wait("ready")
    await client.send(type="dance")
    await client.send(type="text", text="")
    await client.send(type="text", text="x" * 5000)
    await client.ws.send(b"\x00" * (64 * 1024 + 2))  # over the frame limit
    await client.ws.send(b"\x00\x01\x02")  # not whole samples
    await client.send(type="start")  # push-to-talk in auto mode
    errors = await client.wait("error", 9)
    assert [e["error"] for e in errors] == [
        "invalid_request",
        "invalid_request",
        "unsupported_sample_rate",
        "unknown_type",
        "invalid_request",
        "too_long",
        "too_large",
        "invalid_audio",
        "invalid_request",
    ]
    assert all(e["message"] for e in errors)
    await client.send(type="text", text="Still there?")
    await client.wait("done")  # the socket still works
    await client.ws.close()


async def test_credentials_as_for_http_or_a_token_in_the_url(
    settings: Settings, whisper: FakeGroqWhisper
) -> None:
    async with FakeLlmWire(reply=Behaviour.ok(REPLY)) as wire:
        s = _settings(settings, wire, whisper, BFF_API_KEY="service-key-123", JWT_SECRET=SECRET)
        async with running(s, ["http"]):
            await _up(s.http_port)
            url = f"ws://127.0.0.1:{s.http_port}/ws"
            nobody = Client(await connect(url))  # refused with a reason a browser can show
            await _closed(nobody)
            assert nobody.ws.close_code == 1008 and "service key" in nobody.ws.close_reason
            token = jwt.encode({"sub": "carol", "exp": time.time() + 60}, SECRET)
            client = await _client(f"{url}?token={token}", userId="dave")
            [error] = await client.wait("error")
            assert error["error"] == "forbidden"  # a person's token talks as that person only
            await client.send(type="hello", userId="carol")
            await client.wait("ready")
            await client.ws.close()
            keyed = Client(await connect(url, additional_headers={"X-API-Key": "service-key-123"}))
            await keyed.send(type="hello", userId="anyone")
            await keyed.wait("ready")
            await keyed.ws.close()


async def test_a_socket_that_goes_idle_is_closed_with_a_reason(
    settings: Settings, whisper: FakeGroqWhisper
) -> None:
    async with FakeLlmWire(reply=Behaviour.ok(REPLY)) as wire:
        s = _settings(settings, wire, whisper, HTTP_WS_IDLE_SEC="0.5")
        async with running(s, ["http"]):
            await _up(s.http_port)
            client = await _client(f"ws://127.0.0.1:{s.http_port}/ws", userId="erin")
            await client.wait("ready")
            await _closed(client)
            assert (client.ws.close_code, client.ws.close_reason) == (1000, "idle")


# --- voice -------------------------------------------------------------------------------------


async def test_speech_is_transcribed_answered_and_spoken_back_in_order(stack: Stack) -> None:
    client = await _client(stack.url, userId="frank", sampleRate=16000)
    await client.wait("ready")
    said = np.concatenate([silence(300), speech("What is the weather like today?", "en")])
    await client.stream_mic(np.concatenate([said, silence(1200)]))
    [done] = await client.wait("done", timeout=30)
    [transcript] = client.of("transcript")
    assert transcript["text"] == "What is the weather like today?"
    assert transcript["turn"] == done["turn"] and not done.get("interrupted")
    kinds = [m["type"] for m in client.messages]
    assert kinds.index("listening") < kinds.index("heard") < kinds.index("transcript")
    assert kinds.index("speaking") < kinds.index("done")
    pcm = b"".join(frame for _, frame in client.audio)
    assert len(pcm) > 24_000 * 2  # over a second of speech, 24 kHz mono s16le
    assert all(len(frame) <= 960 for _, frame in client.audio)  # 20 ms frames
    captured = [
        e for e in await _events(stack.log, "libra.voice.captured.>") if e.id == done["turn"]
    ]
    assert isinstance(captured[0], VoiceCaptured) and captured[0].user == "web:frank"
    assert captured[0].origin.platform == "web"
    delivery = await _delivery(stack.log, done["turn"])
    assert delivery.modality == "voice" and delivery.clips >= 1 and not delivery.interrupted
    await client.ws.close()


async def test_barge_in_stops_the_audio_and_marks_the_reply_interrupted(
    settings: Settings, whisper: FakeGroqWhisper
) -> None:
    async with FakeLlmWire(reply=Behaviour.ok(LONG_REPLY)) as wire:
        s = _settings(settings, wire, whisper)
        async with running(s, PIPELINE) as resources:
            await _up(s.http_port)
            client = await _client(f"ws://127.0.0.1:{s.http_port}/ws", userId="gina")
            await client.wait("ready")
            question = speech("What is the weather like today?", "en")
            await client.stream_mic(np.concatenate([silence(300), question, silence(1200)]))
            await client.wait("speaking", timeout=30)
            await client.wait_audio(10)
            # Talking over Libra: the audio stops, and the reply is cut.
            talk = asyncio.create_task(client.stream_mic(np.concatenate([question, silence(800)])))
            [done] = await client.wait("done", timeout=20)
            cut_at = time.monotonic()
            assert done["interrupted"] is True
            await talk
            assert len(client.of("done")) == 1  # the cut ends the turn, once
            after = [
                at
                for (at, _), turn in zip(client.audio, client.audio_turns, strict=True)
                if turn == done["turn"] and at > cut_at
            ]
            assert not after  # nothing of that reply came after the cut
            delivery = await _delivery(resources.log, done["turn"])
            assert delivery.interrupted and delivery.modality == "voice"
            await client.ws.close()


async def test_a_reconnect_follows_the_reply_in_progress(
    settings: Settings, whisper: FakeGroqWhisper
) -> None:
    slow = Behaviour.ok(REPLY, ttft=1.5)
    async with FakeLlmWire(reply=slow) as wire:
        s = _settings(settings, wire, whisper)
        async with running(s, PIPELINE) as resources:
            await _up(s.http_port)
            url = f"ws://127.0.0.1:{s.http_port}/ws"
            first = await _client(url, userId="hank")
            [ready] = await first.wait("ready")
            await first.send(type="text", text="Tell me something")
            await first.wait("accepted")
            await first.ws.close()  # gone before the reply
            again = await _client(url, userId="hank", conversation=ready["conversation"])
            [done] = await again.wait("done", timeout=20)
            assert done["text"] == REPLY
            said = await _events(resources.log, "libra.text.received.>")
            assert done["turn"] in {e.id for e in said if isinstance(e, TextReceived)}
            await again.ws.close()
