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
from collections.abc import AsyncIterator, Iterable
from typing import Any

import httpx2
import msgspec
import openai

from ._errors import SdkErrors, provider_error
from .base import ChatMessage, ChatRequest, ChatUsage, ProviderError

__all__ = ["OPENAI_ERRORS", "OPENAI_URL", "OpenAICompatProvider", "openai_messages"]

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


class _Delta(msgspec.Struct):
    content: str | None = None


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


def openai_messages(messages: Iterable[ChatMessage]) -> list[dict[str, Any]]:
    """Returns the chat messages in OpenAI's wire shape, images as ``image_url`` parts."""
    wire: list[dict[str, Any]] = []
    for message in messages:
        if message.images and message.role == "user":
            parts: list[dict[str, Any]] = [{"type": "text", "text": message.content}]
            parts.extend({"type": "image_url", "image_url": {"url": url}} for url in message.images)
            wire.append({"role": "user", "content": parts})
        else:
            wire.append({"role": message.role, "content": message.content})
    return wire


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

    async def stream(self, request: ChatRequest) -> AsyncIterator[str | ChatUsage]:
        """Yields the reply's text pieces as they arrive, then one ChatUsage."""
        usage = None
        finish_reason = ""
        try:
            async with self._client.chat.completions.with_streaming_response.create(
                model=request.model,
                # The messages go as extra_body, which the SDK sends as it is: its typed-request
                # transform walks every message of the history (6 ms for 40 of them), and plain
                # text messages have nothing to transform.
                messages=[],
                extra_body={"messages": openai_messages(request.messages)},
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
                        if choice.finish_reason:
                            finish_reason = choice.finish_reason
                    if chunk.usage is not None:
                        usage = chunk.usage
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
