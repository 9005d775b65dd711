"""A loopback fake of the LLM vendors' HTTP APIs, answering as they do, streaming included.

The real SDKs talk to it over HTTP, so tests and ``libra bench text`` exercise the adapters'
whole path: requests, SSE parsing, usage, errors and timeouts. It serves

- OpenAI chat completions, ``POST …/chat/completions`` (SSE chunks, ``data: [DONE]``, a usage
  chunk when ``stream_options.include_usage`` asks for one), on any prefix, so one fake can
  stand in for OpenAI (``/v1``), Ollama (``/ollama/v1``) and a local server (``/local/v1``);
- Groq, ``POST /openai/v1/chat/completions`` (the same chunks, usage in ``x_groq``);
- Anthropic, ``POST /v1/messages`` (message_start, content_block_start, content_block_delta…,
  content_block_stop, message_delta with usage, message_stop);
- tool calls, in each vendor's streamed shape (see :class:`Behaviour`'s ``calls``);
- OpenAI embeddings, ``POST /v1/embeddings`` (deterministic unit vectors, ``dimensions`` and
  ``encoding_format`` honoured), and ``GET /v1/models``;
- OpenAI moderation, ``POST /v1/moderations``, and Llama Guard: a chat request (not streamed)
  for a model whose name holds ``guard`` answers ``safe`` or ``unsafe\nS1,S10``. Both flag the
  texts holding a word of ``triggers`` (word -> OpenAI categories and Llama Guard codes), after
  ``moderation_latency`` seconds; a behaviour that scripts its own ``text`` makes the guard model
  answer that text instead (garbage, for tests).

Each path answers with a :class:`Behaviour`: queued ones first (``wire.queue(path, a, b)``: the
first call gets ``a``, the second ``b``), then the path's standing one (``wire.always``), then
``wire.reply``. Every request is recorded (path, model, messages, headers without secrets).

    async with FakeLlmWire() as wire:
        wire.queue(OPENAI_CHAT, Behaviour.rate_limited(0.1))
        settings = Settings.from_env({**wire.env(), "OPENAI_API_KEY": "sk-test"})
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import math
import re
import struct
import time
from array import array
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Literal

import msgspec
from aiohttp import web

from .loopback import LoopbackServer

__all__ = [
    "ANTHROPIC_MESSAGES",
    "EMBEDDINGS",
    "GROQ_CHAT",
    "LOCAL_CHAT",
    "MODELS",
    "MODERATIONS",
    "MODERATION_TRIGGERS",
    "OLLAMA_CHAT",
    "OPENAI_CHAT",
    "Behaviour",
    "FakeCall",
    "FakeLlmWire",
    "ReceivedRequest",
    "embedding",
]

OPENAI_CHAT = "/v1/chat/completions"
GROQ_CHAT = "/openai/v1/chat/completions"
OLLAMA_CHAT = "/ollama/v1/chat/completions"
LOCAL_CHAT = "/local/v1/chat/completions"
ANTHROPIC_MESSAGES = "/v1/messages"
EMBEDDINGS = "/v1/embeddings"
MODELS = "/v1/models"
MODERATIONS = "/v1/moderations"

Failure = Literal["", "hang", "malformed", "invalid_json", "disconnect"]

_PIECES = re.compile(r"\s*\S+")
_SECRET_HEADERS = frozenset(
    {"authorization", "x-api-key", "api-key", "proxy-authorization", "cookie", "x-goog-api-key"}
)
_encode = msgspec.json.encode
_decode = msgspec.json.decode
_ids = itertools.count(1)
_TEXT = "Hello from the fake model, streaming one word at a time."
# A text holding one of these words is flagged: OpenAI's categories, Llama Guard's codes.
MODERATION_TRIGGERS: dict[str, tuple[str, ...]] = {
    "stab": ("violence", "harassment/threatening", "S1"),
    "meth": ("illicit", "S2"),
    "vermin": ("hate", "S10"),
    "nsfw": ("sexual", "S12"),
    "selfharm": ("self-harm/intent", "S11"),
}
_OPENAI_MODERATION = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
_FLAGGED_SCORE = 0.9
_CLEAN_SCORE = 0.0001


def _sse_event(name: str, data: dict[str, Any]) -> bytes:
    """One named server-sent event, as Anthropic's stream has them."""
    return b"event: " + name.encode() + b"\ndata: " + _encode(data) + b"\n\n"


class FakeCall(msgspec.Struct, frozen=True):
    """A tool call the fake model makes: the tool's name and the arguments it writes."""

    name: str
    arguments: dict[str, Any] = {}


class Behaviour(msgspec.Struct, frozen=True, kw_only=True):
    """How the fake answers one request.

    ``text`` is streamed in word-sized pieces (the completion tokens), the first after ``ttft``
    seconds, then ``tokens_per_sec`` of them a second (0: as fast as the socket takes them).
    ``status`` >= 400 answers with the vendor's error body saying ``message`` (and
    ``retry_after`` as the Retry-After header). ``fail`` breaks the reply after ``after``
    pieces: ``hang`` stops answering (with ``after`` 0, before the response headers),
    ``malformed`` sends an event that is cut off mid-JSON, ``invalid_json`` sends a body (or
    first event) that is not JSON, ``disconnect`` closes the connection. ``usage`` False leaves
    token counts out, as some OpenAI-compatible servers do.

    ``calls`` are the tool calls the model makes when a streamed request offers tools and
    holds no tool result after its last user message: ``before`` is streamed as text first,
    then each call the request offered a tool for (none offered: ``text`` as usual). Otherwise
    ``{results}`` in ``text`` reads the results after the last user message, joined by " | ".
    """

    text: str = _TEXT
    ttft: float = 0.0
    tokens_per_sec: float = 0.0
    status: int = 200
    retry_after: float | None = None
    message: str = "scripted failure"
    fail: Failure = ""
    after: int = 0
    usage: bool = True
    calls: tuple[FakeCall, ...] = ()
    before: str = ""

    @classmethod
    def ok(cls, text: str, *, ttft: float = 0.0, tokens_per_sec: float = 0.0) -> Behaviour:
        """A reply of ``text``."""
        return cls(text=text, ttft=ttft, tokens_per_sec=tokens_per_sec)

    @classmethod
    def tool(cls, *calls: FakeCall, text: str = _TEXT, before: str = "") -> Behaviour:
        """Makes ``calls`` (after the text ``before``) where a request offers their tools, and
        answers ``text`` once their results come back."""
        return cls(calls=calls, text=text, before=before)

    @classmethod
    def rate_limited(cls, retry_after: float | None = 1.0) -> Behaviour:
        """HTTP 429, with a Retry-After header unless ``retry_after`` is None."""
        return cls(status=429, retry_after=retry_after)

    @classmethod
    def error(cls, status: int = 500, message: str = "scripted failure") -> Behaviour:
        """An HTTP error status with the vendor's error body (401, 500, 503 ...)."""
        return cls(status=status, message=message)

    @classmethod
    def hang(cls, *, after: int = 0, text: str = _TEXT) -> Behaviour:
        """Stops answering after ``after`` pieces (0: before the headers) until closed."""
        return cls(fail="hang", after=after, text=text)

    @classmethod
    def malformed(cls, *, after: int = 1, text: str = _TEXT) -> Behaviour:
        """Sends ``after`` good pieces, then an event cut off in the middle of its JSON."""
        return cls(fail="malformed", after=after, text=text)

    @classmethod
    def invalid_json(cls) -> Behaviour:
        """Answers 200 with a body (or, streaming, a first event) that is not JSON."""
        return cls(fail="invalid_json")

    @classmethod
    def disconnect(cls, *, after: int = 1, text: str = _TEXT) -> Behaviour:
        """Sends ``after`` pieces, then drops the connection mid-stream."""
        return cls(fail="disconnect", after=after, text=text)


class ReceivedRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One request the fake received; secret headers read ``***``."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any = None
    at: float = 0.0
    peer: str = ""  # the client's address and port: which connection the request came on

    @property
    def model(self) -> str:
        return self.body.get("model", "") if isinstance(self.body, dict) else ""

    @property
    def messages(self) -> list[Any]:
        return self.body.get("messages", []) if isinstance(self.body, dict) else []

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream")) if isinstance(self.body, dict) else False


class FakeLlmWire(LoopbackServer):
    """The fake vendors on 127.0.0.1 (an aiohttp server in this process's event loop)."""

    backlog = 2048  # benchmarks open hundreds of streams at once

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        reply: Behaviour | None = None,
        models: tuple[str, ...] = ("gpt-4o-mini", "llama-3.3-70b-versatile", "llama3.1:8b"),
        record: bool = True,
        triggers: Mapping[str, tuple[str, ...]] | None = None,
        moderation_latency: float = 0.0,
    ) -> None:
        super().__init__(host=host, port=port)
        self.reply = reply or Behaviour()
        self.triggers = dict(MODERATION_TRIGGERS if triggers is None else triggers)
        self.moderation_latency = moderation_latency
        self.models = models
        self.record = record
        self.requests: list[ReceivedRequest] = []
        self._queues: dict[str, deque[Behaviour]] = {}
        self._standing: dict[str, Behaviour] = {}

    def env(self) -> dict[str, str]:
        """Returns the base-URL settings that point every provider at this fake."""
        return {
            "OPENAI_BASE_URL": f"{self.url}/v1",
            "GROQ_BASE_URL": self.url,
            "ANTHROPIC_BASE_URL": self.url,
            "OLLAMA_URL": f"{self.url}/ollama",
            "LLM_BASE_URL": f"{self.url}/local/v1",
        }

    def queue(self, path: str, *behaviours: Behaviour) -> None:
        """Answers the next requests to ``path`` with ``behaviours``, one each, in order."""
        self._queues.setdefault(path, deque()).extend(behaviours)

    def always(self, path: str, behaviour: Behaviour | None) -> None:
        """Answers ``path`` with ``behaviour`` once its queue is empty (None: ``wire.reply``)."""
        if behaviour is None:
            self._standing.pop(path, None)
        else:
            self._standing[path] = behaviour

    def calls(self, path: str | None = None) -> list[ReceivedRequest]:
        """Returns the recorded requests, to ``path`` only when given."""
        return [r for r in self.requests if path is None or r.path == path]

    def count(self, path: str) -> int:
        """Returns how many requests ``path`` received."""
        return sum(1 for r in self.requests if r.path == path)

    def reset(self) -> None:
        """Forgets queued and standing behaviours and recorded requests."""
        self._queues.clear()
        self._standing.clear()
        self.requests.clear()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self._dispatch)

    def _behaviour(self, path: str) -> Behaviour:
        queue = self._queues.get(path)
        if queue:
            return queue.popleft()
        return self._standing.get(path, self.reply)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        raw = await request.read()
        try:
            body = _decode(raw) if raw else None
        except msgspec.DecodeError:
            body = raw.decode("utf-8", "replace")
        if self.record:
            self.requests.append(
                ReceivedRequest(
                    method=request.method,
                    path=path,
                    headers=_visible(request.headers),
                    body=body,
                    at=time.monotonic(),
                    peer=str(request.transport and request.transport.get_extra_info("peername")),
                )
            )
        if request.method == "GET" and path.endswith("/models"):
            return await self._models(request, self._behaviour(path))
        if request.method != "POST":
            return _error_response("openai", 405, "method not allowed")
        if not isinstance(body, dict):
            return _error_response(_vendor(path), 400, "the body is not a JSON object")
        if path.endswith("/chat/completions"):
            return await self._chat(request, path, body, self._behaviour(path))
        if path.endswith("/messages"):
            return await self._anthropic(request, body, self._behaviour(path))
        if path.endswith("/embeddings"):
            return await self._embeddings(request, body, self._behaviour(path))
        if path.endswith("/moderations"):
            return await self._moderations(request, body, self._behaviour(path))
        return _error_response("openai", 404, f"no route for {path}")

    async def _before_reply(
        self, request: web.Request, b: Behaviour, vendor: str, chat: dict[str, Any] | None = None
    ) -> Any:
        """Returns an early answer (an error status, a hang, a non-JSON body, the vendor's
        refusal of the ``chat`` request's tool results) or None."""
        if b.status >= 400:
            return _error_response(vendor, b.status, b.message, b.retry_after)
        if b.fail == "hang" and b.after == 0:
            await self._closing.wait()
            return _error_response(vendor, 503, "the fake is shutting down")
        if b.fail == "disconnect" and b.after == 0:
            _drop(request)
            return web.Response(status=500)
        if chat is not None:
            check = _unanswered_anthropic if vendor == "anthropic" else _unanswered_openai
            if problem := check(chat.get("messages")):
                return _error_response(vendor, 400, problem)
        return None

    async def _chat(
        self, request: web.Request, path: str, body: dict[str, Any], b: Behaviour
    ) -> web.StreamResponse:
        groq = path.endswith(GROQ_CHAT)
        vendor = "groq" if groq else "openai"
        early = await self._before_reply(request, b, vendor, body)
        if early is not None:
            return early
        model = str(body.get("model", ""))
        calls, text = _answer(b, body, anthropic=False)
        pieces: list[Any] = _PIECES.findall(text)
        style = "groq" if groq else "ollama" if path.endswith(OLLAMA_CHAT) else "openai"
        pieces += _openai_call_deltas(calls, style)
        prompt_tokens = _count_prompt(body.get("messages"))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(pieces),
            "total_tokens": prompt_tokens + len(pieces),
        }
        cid = f"chatcmpl-{next(_ids)}"
        created = int(time.time())
        if not body.get("stream"):
            text = await self._whole_text(b, text, model, body.get("messages"))
            return await self._chat_whole(request, b, cid, created, model, text, usage)
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            data = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
                **extra,
            }
            if include_usage:
                data.setdefault("usage", None)
            return b"data: " + _encode(data) + b"\n\n"

        x_groq = {"id": f"req_{cid}"}
        response = await _open_sse(request)
        if b.fail == "invalid_json":
            await response.write(b"data: {this is not json\n\n")
            return response
        first = {"x_groq": x_groq} if groq else {}
        await response.write(chunk({"role": "assistant", "content": ""}, **first))

        def piece_bytes(piece: str | dict[str, Any]) -> bytes:
            return chunk({"content": piece} if isinstance(piece, str) else piece)

        broken = b'data: {"id": "' + cid.encode() + b'", "choices": [{"delta": {"content": "br\n\n'
        if not await self._pace(request, response, b, pieces, piece_bytes, broken):
            return response
        last: dict[str, Any] = {}
        if groq and b.usage:
            last["x_groq"] = {**x_groq, "usage": {**usage, "queue_time": 0.001, "total_time": 0.1}}
        await response.write(chunk({}, "tool_calls" if calls else "stop", **last))
        if include_usage and b.usage:
            data = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            }
            await response.write(b"data: " + _encode(data) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _whole_failure(self, request: web.Request, b: Behaviour) -> web.Response | None:
        """Waits ``ttft``, then returns the broken answer to a request that did not stream."""
        await asyncio.sleep(b.ttft)
        if b.fail in ("invalid_json", "malformed"):
            return web.Response(body=b"{this is not json", content_type="application/json")
        if b.fail == "hang":
            await self._closing.wait()
            return _error_response("openai", 503, "the fake is shutting down")
        if b.fail == "disconnect":
            _drop(request)
            return web.Response(status=500)
        return None

    async def _chat_whole(
        self,
        request: web.Request,
        b: Behaviour,
        cid: str,
        created: int,
        model: str,
        text: str,
        usage: dict[str, int],
    ) -> web.StreamResponse:
        early = await self._whole_failure(request, b)
        if early is not None:
            return early
        message = {"role": "assistant", "content": text}
        data = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            **({"usage": usage} if b.usage else {}),
        }
        return web.Response(body=_encode(data), content_type="application/json")

    async def _anthropic(
        self, request: web.Request, body: dict[str, Any], b: Behaviour
    ) -> web.StreamResponse:
        early = await self._before_reply(request, b, "anthropic", body)
        if early is not None:
            return early
        model = str(body.get("model", ""))
        calls, text = _answer(b, body, anthropic=True)
        pieces: list[Any] = _PIECES.findall(text)
        prompt_tokens = _count_prompt(body.get("messages")) + _count_words(body.get("system"))
        mid = f"msg_fake{next(_ids)}"
        if not body.get("stream"):
            return await self._anthropic_whole(request, b, mid, model, prompt_tokens, pieces)
        text_block = bool(pieces) or not calls  # a reply of calls alone has no text block
        pieces += _anthropic_call_events(calls, first_index=int(text_block))
        response = await _open_sse(request)

        async def event(name: str, data: dict[str, Any]) -> None:
            await response.write(_sse_event(name, data))

        if b.fail == "invalid_json":
            await response.write(b"event: message_start\ndata: {this is not json\n\n")
            return response
        start_usage = {"input_tokens": prompt_tokens if b.usage else 0, "output_tokens": 1}
        message = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": start_usage,
        }
        await event("message_start", {"type": "message_start", "message": message})
        if text_block:
            block = {"type": "text", "text": ""}
            await event(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": block},
            )
        await event("ping", {"type": "ping"})

        def piece_bytes(piece: str | dict[str, Any]) -> bytes:
            if not isinstance(piece, str):
                return _sse_event(piece["type"], piece)
            delta = {"type": "text_delta", "text": piece}
            return _sse_event(
                "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
            )

        broken = b'event: content_block_delta\ndata: {"type": "content_block_delta", "ind\n\n'
        if not await self._pace(request, response, b, pieces, piece_bytes, broken):
            return response
        if not calls:
            await event("content_block_stop", {"type": "content_block_stop", "index": 0})
        end_usage = {"output_tokens": len(pieces) if b.usage else 0}
        delta = {"stop_reason": "tool_use" if calls else "end_turn", "stop_sequence": None}
        await event("message_delta", {"type": "message_delta", "delta": delta, "usage": end_usage})
        await event("message_stop", {"type": "message_stop"})
        await response.write_eof()
        return response

    async def _anthropic_whole(
        self,
        request: web.Request,
        b: Behaviour,
        mid: str,
        model: str,
        prompt_tokens: int,
        pieces: list[str],
    ) -> web.StreamResponse:
        early = await self._whole_failure(request, b)
        if early is not None:
            return early
        data = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "content": [{"type": "text", "text": "".join(pieces)}],
            "model": model,
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": len(pieces)},
        }
        return web.Response(body=_encode(data), content_type="application/json")

    async def _pace(
        self,
        request: web.Request,
        response: web.StreamResponse,
        b: Behaviour,
        pieces: list[str],
        piece_bytes: Callable[[Any], bytes],
        broken: bytes,
    ) -> bool:
        """Writes the pieces on the behaviour's schedule; False when it broke the reply off.

        Unpaced (``tokens_per_sec`` 0: as fast as the socket takes them) and unbroken, they go
        in one write: a write per piece would cost the fake more CPU than the client it serves,
        on the machine the benchmarks measure that client on.
        """
        loop = asyncio.get_running_loop()
        first_at = loop.time() + b.ttft
        interval = 1.0 / b.tokens_per_sec if b.tokens_per_sec > 0 else 0.0
        if not interval and not b.fail:
            if (delay := first_at - loop.time()) > 0:
                await asyncio.sleep(delay)
            if pieces:
                await response.write(b"".join(map(piece_bytes, pieces)))
            return True
        for index, piece in enumerate(pieces):
            if b.fail and index == b.after:
                return await self._break(request, response, b, broken)
            delay = first_at + index * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await response.write(piece_bytes(piece))
        if b.fail and b.after >= len(pieces):
            return await self._break(request, response, b, broken)
        return True

    async def _break(
        self, request: web.Request, response: web.StreamResponse, b: Behaviour, broken: bytes
    ) -> bool:
        if b.fail == "malformed":
            await response.write(broken)
            await response.write_eof()
        elif b.fail == "hang":
            await self._closing.wait()
        else:
            _drop(request)
        return False

    async def _embeddings(
        self, request: web.Request, body: dict[str, Any], b: Behaviour
    ) -> web.StreamResponse:
        early = await self._before_reply(request, b, "openai")
        if early is not None:
            return early
        if b.fail in ("invalid_json", "malformed"):
            return web.Response(body=b"{this is not json", content_type="application/json")
        model = str(body.get("model", "text-embedding-3-small"))
        raw = body.get("input", "")
        inputs = [raw] if isinstance(raw, str) or _is_tokens(raw) else list(raw)
        dimensions = int(body.get("dimensions") or (3072 if model.endswith("-large") else 1536))
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        tokens = 0
        for index, item in enumerate(inputs):
            text = item if isinstance(item, str) else " ".join(map(str, item))
            tokens += max(1, len(text.split()))
            vector = embedding(f"{model}\0{text}", dimensions)
            encoded: Any = (
                base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
                if as_base64
                else vector
            )
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        answer = {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return web.Response(body=_encode(answer), content_type="application/json")

    async def _whole_text(self, b: Behaviour, text: str, model: str, messages: Any) -> str:
        """The text of a reply that is not streamed: a guard model's verdict unless scripted."""
        if "guard" not in model.lower() or b.text != _TEXT:
            return text
        await asyncio.sleep(self.moderation_latency)
        return self.guard_answer(_message_text(messages))

    def flagged(self, text: str) -> set[str]:
        """The labels (OpenAI categories, Llama Guard codes) of the trigger words ``text`` holds
        (whole words: "something" does not hold "meth")."""
        words = set(re.findall(r"\w+", text.lower()))
        said = (labels for word, labels in self.triggers.items() if word in words)
        return {label for labels in said for label in labels}

    def guard_answer(self, text: str) -> str:
        """Llama Guard's answer on ``text``: ``safe`` or ``unsafe`` and its codes."""
        codes = sorted((c for c in self.flagged(text) if c[:1] == "S"), key=lambda c: int(c[1:]))
        return "unsafe\n" + ",".join(codes) if codes else "safe"

    async def _moderations(
        self, request: web.Request, body: dict[str, Any], b: Behaviour
    ) -> web.StreamResponse:
        early = await self._before_reply(request, b, "openai")
        if early is not None:
            return early
        await asyncio.sleep(self.moderation_latency)
        early = await self._whole_failure(request, b)
        if early is not None:
            return early
        raw = body.get("input", "")
        many = isinstance(raw, list) and all(isinstance(item, str) for item in raw)
        inputs = raw if many else [_message_text([{"content": raw}])]
        answer = {
            "id": f"modr-{next(_ids)}",
            "model": str(body.get("model", "omni-moderation-latest")),
            "results": [self._moderation_result(text) for text in inputs],
        }
        return web.Response(body=_encode(answer), content_type="application/json")

    def _moderation_result(self, text: str) -> dict[str, Any]:
        flagged = self.flagged(text)
        categories = {name: name in flagged for name in _OPENAI_MODERATION}
        return {
            "flagged": any(categories.values()),
            "categories": categories,
            "category_scores": {
                name: _FLAGGED_SCORE if on else _CLEAN_SCORE for name, on in categories.items()
            },
            "category_applied_input_types": {name: ["text"] for name in _OPENAI_MODERATION},
        }

    async def _models(self, request: web.Request, b: Behaviour) -> web.StreamResponse:
        early = await self._before_reply(request, b, "openai")
        if early is not None:
            return early
        data = [
            {"id": name, "object": "model", "created": 1_700_000_000, "owned_by": "libra-fake"}
            for name in self.models
        ]
        return web.Response(
            body=_encode({"object": "list", "data": data}), content_type="application/json"
        )


def embedding(text: str, dimensions: int) -> list[float]:
    """Returns a deterministic unit vector for ``text`` (the same text, the same vector)."""
    digest = hashlib.shake_256(text.encode()).digest(dimensions * 2)
    values = array("h", digest)
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


async def _open_sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "x-request-id": f"req_fake{next(_ids)}",
        }
    )
    await response.prepare(request)
    return response


def _drop(request: web.Request) -> None:
    """Closes the connection under the response, as a crashing upstream does."""
    if request.transport is not None:
        request.transport.close()


def _vendor(path: str) -> str:
    if path.endswith("/messages"):
        return "anthropic"
    return "groq" if path.endswith(GROQ_CHAT) else "openai"


_ERROR_TYPES = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("invalid_request_error", "authentication_error"),
    403: ("insufficient_permissions", "permission_error"),
    404: ("invalid_request_error", "not_found_error"),
    429: ("rate_limit_exceeded", "rate_limit_error"),
    529: ("server_error", "overloaded_error"),
}


def _error_response(
    vendor: str, status: int, message: str, retry_after: float | None = None
) -> web.Response:
    """Returns the vendor's error body: OpenAI's and Groq's ``{"error": …}``, Anthropic's
    ``{"type": "error", "error": …}``."""
    openai_type, anthropic_type = _ERROR_TYPES.get(status, ("server_error", "api_error"))
    if vendor == "anthropic":
        body: dict[str, Any] = {
            "type": "error",
            "error": {"type": anthropic_type, "message": message},
        }
    else:
        error = {"message": message, "type": openai_type, "param": None, "code": None}
        body = {"error": error}
    headers = {"x-request-id": f"req_fake{next(_ids)}"}
    if retry_after is not None:
        headers["retry-after"] = f"{retry_after:g}"
    return web.Response(
        status=status, body=_encode(body), content_type="application/json", headers=headers
    )


def _visible(headers: Mapping[str, str]) -> dict[str, str]:
    return {
        name.lower(): "***" if name.lower() in _SECRET_HEADERS else value
        for name, value in headers.items()
    }


def _count_words(content: Any) -> int:
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        return sum(_count_words(part.get("text", "")) for part in content if isinstance(part, dict))
    return 0


def _message_text(messages: Any) -> str:
    """The text of chat messages (strings or text parts), one message a line."""
    if not isinstance(messages, list):
        return ""
    texts: list[str] = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(p.get("text", "") for p in content if isinstance(p, dict))
    return "\n".join(texts)


def _count_prompt(messages: Any) -> int:
    """Counts a prompt's tokens as words plus a few per message, as tokenizers roughly do."""
    if not isinstance(messages, list):
        return 0
    return sum(3 + _count_words(m.get("content")) for m in messages if isinstance(m, dict))


def _is_tokens(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], int)


def _answer(b: Behaviour, body: dict[str, Any], *, anthropic: bool) -> tuple[list[FakeCall], str]:
    """Returns the calls the model makes (the request offered their tools and has no result
    yet) with the text it writes first, or no calls and its text, ``{results}`` filled in."""
    if not b.calls and "{results}" not in b.text:
        return [], b.text
    results = _tool_results(body.get("messages"), anthropic=anthropic)
    tools = body.get("tools")
    if b.calls and tools and isinstance(tools, list) and not results and body.get("stream"):
        offered = {_tool_name(tool) for tool in tools if isinstance(tool, dict)}
        calls = [call for call in b.calls if call.name in offered]
        if calls:
            return calls, b.before
    return [], b.text.replace("{results}", " | ".join(results))


def _tool_name(tool: dict[str, Any]) -> str:
    """An offered tool's name: Anthropic's ``name``, OpenAI's ``function.name``."""
    function = tool.get("function")
    return str(tool.get("name") or (function.get("name") if isinstance(function, dict) else ""))


def _tool_results(messages: Any, *, anthropic: bool) -> list[str]:
    """The contents of the tool results after the last user message, oldest first: OpenAI's
    ``tool`` messages, Anthropic's ``tool_result`` blocks (in user messages of their own)."""
    results: list[str] = []
    for message in reversed(messages if isinstance(messages, list) else []):
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        if anthropic and role == "user":
            content = message.get("content")
            blocks = content if isinstance(content, list) else []
            found = [_text(b.get("content")) for b in blocks if _is_tool_result(b)]
            if not found:
                break
            results.extend(reversed(found))
        elif role == "user":
            break
        elif role == "tool" and not anthropic:
            results.append(_text(message.get("content")))
    results.reverse()
    return results


def _is_tool_result(block: Any) -> bool:
    return isinstance(block, dict) and block.get("type") == "tool_result"


def _text(content: Any) -> str:
    """A content's text: a string, or the text of its blocks (parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
    return ""


def _unanswered_openai(messages: Any) -> str:
    """OpenAI's complaint about a ``tool`` message answering no earlier call, or ""."""
    asked: set[Any] = set()
    for message in messages if isinstance(messages, list) else []:
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            asked.update(c.get("id") for c in message["tool_calls"] if isinstance(c, dict))
        elif role == "tool" and message.get("tool_call_id") not in asked:
            return (
                "Invalid parameter: messages with role 'tool' must be a response to a preceding"
                f" message with 'tool_calls' (tool_call_id {message.get('tool_call_id')!r})."
            )
    return ""


def _unanswered_anthropic(messages: Any) -> str:
    """Anthropic's complaint about a ``tool_result`` block answering no earlier ``tool_use``,
    or ""."""
    asked: set[Any] = set()
    for index, message in enumerate(messages if isinstance(messages, list) else []):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for place, block in enumerate(content):
            if not isinstance(block, dict):
                continue
            if block.get("type") == "tool_use":
                asked.add(block.get("id"))
            elif block.get("type") == "tool_result" and block.get("tool_use_id") not in asked:
                return (
                    f"messages.{index}.content.{place}: unexpected `tool_use_id` found in"
                    f" `tool_result` blocks: {block.get('tool_use_id')}. Each `tool_result` block"
                    " must have a corresponding `tool_use` block in the previous message."
                )
    return ""


def _fragments(arguments: dict[str, Any]) -> list[str]:
    """A call's arguments as JSON cut into two or more pieces, anywhere, as models stream them."""
    text = _encode(arguments).decode()
    size = max(1, min(8, len(text) // 2))
    return [text[start : start + size] for start in range(0, len(text), size)]


def _openai_call_deltas(calls: list[FakeCall], style: str) -> list[dict[str, Any]]:
    """The chunk deltas of the calls: OpenAI's (the id and name first, then the arguments in
    fragments), Groq's (each call whole in one delta) or Ollama's (the same, in a delta that
    also says its role and an empty content)."""
    deltas: list[dict[str, Any]] = []
    for index, call in enumerate(calls):
        head = {"index": index, "id": f"call_{next(_ids)}", "type": "function"}
        if style != "openai":
            function = {"name": call.name, "arguments": _encode(call.arguments).decode()}
            delta = {"tool_calls": [{**head, "function": function}]}
            deltas.append(
                {"role": "assistant", "content": "", **delta} if style == "ollama" else delta
            )
            continue
        deltas.append({"tool_calls": [{**head, "function": {"name": call.name, "arguments": ""}}]})
        deltas.extend(
            {"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}
            for fragment in _fragments(call.arguments)
        )
    return deltas


def _anthropic_call_events(calls: list[FakeCall], *, first_index: int) -> list[dict[str, Any]]:
    """The events of the calls' ``tool_use`` blocks, from ``first_index`` on; a text block
    before them (``first_index`` 1) is stopped first."""
    events: list[dict[str, Any]] = []
    if calls and first_index:
        events.append({"type": "content_block_stop", "index": 0})
    for index, call in enumerate(calls, first_index):
        block = {"type": "tool_use", "id": f"toolu_fake{next(_ids)}", "name": call.name}
        events.append(
            {"type": "content_block_start", "index": index, "content_block": {**block, "input": {}}}
        )
        events.extend(
            {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": "input_json_delta", "partial_json": fragment},
            }
            for fragment in ["", *_fragments(call.arguments)]
        )
        events.append({"type": "content_block_stop", "index": index})
    return events
