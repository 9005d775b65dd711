"""OpenAI, Ollama and any OpenAI-compatible server, through the official ``openai`` SDK."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

import httpx2
import openai

from ._errors import SdkErrors, provider_error
from .base import ChatMessage, ChatRequest, ChatUsage

__all__ = ["OPENAI_URL", "OpenAICompatProvider", "openai_messages"]

OPENAI_URL = "https://api.openai.com/v1"
# One client serves every conversation of a processor; the SDK's default pool would queue them.
CONNECTION_LIMITS = httpx2.Limits(max_connections=1000, max_keepalive_connections=200)
_SDK = SdkErrors(
    status=openai.APIStatusError,
    timeout=openai.APITimeoutError,
    connection=openai.APIConnectionError,
    validation=openai.APIResponseValidationError,
    api=openai.OpenAIError,
)
_USAGE_OPTION = {"include_usage": True}


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
            http_client=openai.DefaultAsyncHttpxClient(limits=CONNECTION_LIMITS),
        )

    async def stream(self, request: ChatRequest) -> AsyncIterator[str | ChatUsage]:
        """Yields the reply's text pieces as they arrive, then one ChatUsage."""
        usage = None
        finish_reason = ""
        try:
            response = await self._client.chat.completions.create(
                model=request.model,
                messages=openai_messages(request.messages),  # type: ignore[arg-type]
                temperature=request.temperature,
                stream=True,
                stream_options=_USAGE_OPTION,  # type: ignore[arg-type]
                **{self._max_tokens_field: request.max_tokens},
            )
            async with response:
                async for chunk in response:
                    if chunk.choices:
                        choice = chunk.choices[0]
                        if text := choice.delta.content:
                            yield text
                        if choice.finish_reason:
                            finish_reason = choice.finish_reason
                    if chunk.usage is not None:
                        usage = chunk.usage
        except Exception as exc:
            error = provider_error(self.name, exc, _SDK, self._secrets)
            if error is None:
                raise
            raise error from None
        yield ChatUsage(
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            finish_reason=finish_reason,
        )

    async def close(self) -> None:
        """Closes the SDK client and its connections."""
        await self._client.close()
