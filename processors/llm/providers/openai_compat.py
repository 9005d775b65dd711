"""OpenAI, Ollama and any OpenAI-compatible server, through the official ``openai`` SDK.

The SDK sends the request (auth, base URL, headers, its error types for HTTP failures); the
streamed chunks are read with its documented ``with_streaming_response`` and decoded here with
msgspec. The SDK's own chunk models cost about 135 µs of CPU per chunk, a quarter of that with
msgspec, and a reply is a chunk per token: at a few hundred replies a minute that is the
difference between one core and a third of one. For the same reason every provider's SDK runs
on its aiohttp transport (the SDKs' ``aiohttp`` extra): aiohttp parses HTTP in C, and a streamed
reply costs half the CPU it does on the default httpx transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Iterable
from typing import Any

import httpx2
import msgspec
import openai

from ._errors import SdkErrors, provider_error
from .base import ChatMessage, ChatRequest, ChatUsage, ProviderError, ToolCall, ToolSpec

__all__ = [
    "OPENAI_ERRORS",
    "OPENAI_URL",
    "OpenAICompatProvider",
    "ToolCallParts",
    "openai_messages",
    "openai_tools",
]

OPENAI_URL = "https://api.openai.com/v1"
# One client serves every conversation of a processor; the SDK's default pool would queue them.
CONNECTION_LIMITS = httpx2.Limits(max_connections=1000, max_keepalive_connections=200)
OPENAI_ERRORS = SdkErrors(
    status=openai.APIStatusError,
    timeout=openai.APITimeoutError,
    connection=openai.APIConnectionError,
    validation=openai.APIResponseValidationError,
    api=openai.OpenAIError,
)
_USAGE_OPTION = {"include_usage": True}
_DRAIN_S = 1.0  # a server that holds the stream open after [DONE] loses its connection
_CALL_IDS = itertools.count(1)  # for servers that send a call without an id


class _FunctionDelta(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCallDelta(msgspec.Struct):
    index: int | None = None
    id: str | None = None
    function: _FunctionDelta | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_ToolCallDelta] | None = None


class _Choice(msgspec.Struct):
    delta: _Delta = msgspec.field(default_factory=_Delta)
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Chunk(msgspec.Struct):
    """The parts of a ``chat.completion.chunk`` Libra reads; anything else is ignored."""

    choices: list[_Choice] = msgspec.field(default_factory=list)
    usage: _Usage | None = None
    error: object | None = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_NO_FUNCTION = _FunctionDelta()


def openai_messages(messages: Iterable[ChatMessage]) -> list[dict[str, Any]]:
    """Returns the chat messages in OpenAI's wire shape, images as ``image_url`` parts, the
    calls an assistant made as its ``tool_calls`` and each result as a ``tool`` message."""
    wire: list[dict[str, Any]] = []
    for message in messages:
        if message.images and message.role == "user":
            parts: list[dict[str, Any]] = [{"type": "text", "text": message.content}]
            parts.extend({"type": "image_url", "image_url": {"url": url}} for url in message.images)
            wire.append({"role": "user", "content": parts})
        elif message.tool_calls:
            wire.append(
                {
                    "role": "assistant",
                    "content": message.content or None,
                    "tool_calls": [
                        {
                            "id": call.id,
                            "type": "function",
                            "function": {"name": call.name, "arguments": call.arguments},
                        }
                        for call in message.tool_calls
                    ],
                }
            )
        elif message.role == "tool":
            wire.append(
                {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
            )
        else:
            wire.append({"role": message.role, "content": message.content})
    return wire


def openai_tools(tools: Iterable[ToolSpec]) -> list[dict[str, Any]]:
    """Returns the tools in OpenAI's (and Groq's) wire shape: each a ``function``."""
    return [
        {
            "type": "function",
            "function": {
                "name": tool.name,
                "description": tool.description,
                "parameters": tool.parameters,
            },
        }
        for tool in tools
    ]


class _PartialCall:
    __slots__ = ("fragments", "id", "name", "order")

    def __init__(self, order: int) -> None:
        self.order = order  # its index, or where it came for a server that sends none
        self.id = ""
        self.name = ""
        self.fragments: list[str] = []


class ToolCallParts:
    """Gathers the tool calls of one streamed reply from the pieces they arrive in.

    OpenAI sends a call's id and name in its first piece and its arguments in fragments after,
    each piece naming its call by ``index``; Ollama and Groq send each call whole. A piece whose
    id differs from the one its index holds starts a new call (for servers that number every
    call 0); one without an index starts a call if it has an id or a name, else continues the
    last.
    """

    __slots__ = ("_by_index", "_calls")

    def __init__(self) -> None:
        self._calls: list[_PartialCall] = []
        self._by_index: dict[int, _PartialCall] = {}

    def add(
        self, index: int | None, call_id: str | None, name: str | None, arguments: str | None
    ) -> None:
        """Adds one streamed piece of a call."""
        call: _PartialCall | None
        if index is not None:
            call = self._by_index.get(index)
            if call is not None and call_id and call.id and call_id != call.id:
                call = None
        else:
            call = None if call_id or name or not self._calls else self._calls[-1]
        if call is None:
            call = _PartialCall(len(self._calls) if index is None else index)
            self._calls.append(call)
            if index is not None:
                self._by_index[index] = call
        if call_id:
            call.id = call_id
        if name:
            call.name += name  # whole in every server known; joined should one split it
        if arguments:
            call.fragments.append(arguments)

    def extend(self, parts: Iterable[Any]) -> None:
        """Adds the pieces of one delta's ``tool_calls``: items with ``index``, ``id`` and a
        ``function`` (or None) with ``name`` and ``arguments``, msgspec's or an SDK's."""
        for part in parts:
            function = part.function or _NO_FUNCTION
            self.add(part.index, part.id, function.name, function.arguments)

    def take(self) -> list[ToolCall]:
        """Returns the whole calls, in index order, and forgets them."""
        calls = [
            ToolCall(
                id=call.id or f"call_{next(_CALL_IDS)}",
                name=call.name,
                arguments="".join(call.fragments) or "{}",
            )
            for call in sorted(self._calls, key=lambda call: call.order)
        ]
        self._calls.clear()
        self._by_index.clear()
        return calls


def _extra_body(request: ChatRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": openai_messages(request.messages)}
    if request.tools:
        body["tools"] = openai_tools(request.tools)
    return body


class OpenAICompatProvider:
    """A chat provider that speaks OpenAI's chat completions API (OpenAI, Ollama, vLLM ...)."""

    def __init__(
        self,
        name: str,
        *,
        default_model: str,
        timeout: float,
        base_url: str = OPENAI_URL,
        api_key: str = "",
        max_tokens_field: str = "max_tokens",
    ) -> None:
        self.name = name
        self.default_model = default_model
        self._secrets = (api_key,) if api_key else ()
        # OpenAI's reasoning models accept only `max_completion_tokens`; most other servers
        # know only `max_tokens`.
        self._max_tokens_field = max_tokens_field
        self._client = openai.AsyncOpenAI(
            # Local servers need no key, but the SDK refuses to start without one.
            api_key=api_key or "no-key",
            base_url=base_url,
            timeout=timeout,
            max_retries=0,  # the chain retries, with its own budget and breaker
            http_client=openai.DefaultAioHttpClient(limits=CONNECTION_LIMITS),
        )

    async def stream(self, request: ChatRequest) -> AsyncIterator[str | ToolCall | ChatUsage]:
        """Yields the reply's text pieces as they arrive, each whole tool call once the reply
        ends, then one ChatUsage."""
        usage = None
        finish_reason = ""
        calls = ToolCallParts()
        try:
            async with self._client.chat.completions.with_streaming_response.create(
                model=request.model,
                # The messages go as extra_body, which the SDK sends as it is: its typed-request
                # transform walks every message of the history (6 ms for 40 of them), and plain
                # text messages have nothing to transform. The tools go with them.
                messages=[],
                extra_body=_extra_body(request),
                temperature=request.temperature,
                stream=True,
                stream_options=_USAGE_OPTION,  # type: ignore[arg-type]
                **{self._max_tokens_field: request.max_tokens},
            ) as response:
                body = response.http_response.aiter_bytes()
                async for chunk in self._chunks(body):
                    if chunk.choices:
                        choice = chunk.choices[0]
                        if text := choice.delta.content:
                            yield text
                        if choice.delta.tool_calls:
                            calls.extend(choice.delta.tool_calls)
                        finish_reason = choice.finish_reason or finish_reason
                    if chunk.usage is not None:
                        usage = chunk.usage
                for call in calls.take():  # the stream said [DONE] (or ended)
                    yield call
                await _drain(body)
        except ProviderError:
            raise
        except Exception as exc:
            error = provider_error(self.name, exc, OPENAI_ERRORS, self._secrets)
            if error is None:
                raise
            raise error from None
        yield ChatUsage(
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            finish_reason=finish_reason,
        )

    async def _chunks(self, body: AsyncIterator[bytes]) -> AsyncIterator[_Chunk]:
        """Decodes the server-sent events of a stream until ``[DONE]``.

        It reads the body's bytes itself: a token is an event of its own, and the SDK's line
        reader (bytes, then text, then lines, each a generator) costs more per token than all
        of Libra's work on it.
        """
        pending = b""
        async for data in body:
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, event names
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    return
                chunk = _decode_chunk(payload)
                if chunk.error is not None:
                    raise ProviderError(self.name, "server", str(chunk.error)[:300])
                yield chunk

    async def close(self) -> None:
        """Closes the SDK client and its connections."""
        await self._client.close()


async def _drain(body: AsyncIterator[bytes]) -> None:
    """Reads what follows ``[DONE]`` (the body's end), briefly.

    A response closed before its end closes its connection too: every reply would open a new
    one, and a new TLS handshake with a real provider costs more than the whole of Libra's part.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_DRAIN_S):
            async for _ in body:
                pass
