"""Groq, through the official ``groq`` SDK; usage arrives in the last chunk's ``x_groq``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import groq
import httpx

from ._errors import SdkErrors, provider_error
from .base import ChatRequest, ChatUsage, ProviderError, ToolCall
from .openai_compat import ToolCallParts, openai_messages, openai_tools

__all__ = ["GROQ_ERRORS", "GROQ_URL", "GroqProvider"]

GROQ_URL = "https://api.groq.com"
# The SDK's default pool holds 100 connections; a processor streams more replies than that.
CONNECTION_LIMITS = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
GROQ_ERRORS = SdkErrors(
    status=groq.APIStatusError,
    timeout=groq.APITimeoutError,
    connection=groq.APIConnectionError,
    validation=groq.APIResponseValidationError,
    api=groq.GroqError,
)


class GroqProvider:
    """A chat provider for Groq's OpenAI-shaped API."""

    name = "groq"

    def __init__(
        self, *, api_key: str, default_model: str, timeout: float, base_url: str = GROQ_URL
    ) -> None:
        self.default_model = default_model
        self._secrets = (api_key,)
        self._client = groq.AsyncGroq(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            max_retries=0,  # the chain retries, with its own budget and breaker
            http_client=groq.DefaultAioHttpClient(limits=CONNECTION_LIMITS),
        )

    async def stream(self, request: ChatRequest) -> AsyncIterator[str | ToolCall | ChatUsage]:
        """Yields the reply's text pieces as they arrive, each whole tool call once the reply
        ends, then one ChatUsage."""
        usage = None
        finish_reason = ""
        calls = ToolCallParts()
        tools = openai_tools(request.tools) if request.tools else groq.omit
        try:
            response = await self._client.chat.completions.create(
                model=request.model,
                messages=openai_messages(request.messages),  # type: ignore[arg-type]
                tools=tools,  # type: ignore[arg-type]
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                stream=True,
            )
            async with response:
                async for chunk in response:
                    if chunk.choices:
                        choice = chunk.choices[0]
                        if text := choice.delta.content:
                            yield text
                        if choice.delta.tool_calls:
                            calls.extend(choice.delta.tool_calls)
                        finish_reason = choice.finish_reason or finish_reason
                    usage = self._usage(chunk) or usage
                for call in calls.take():
                    yield call
        except ProviderError:
            raise
        except Exception as exc:
            error = provider_error(self.name, exc, GROQ_ERRORS, self._secrets)
            if error is None:
                raise
            raise error from None
        yield ChatUsage(
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            finish_reason=finish_reason,
        )

    def _usage(self, chunk: Any) -> Any:
        """Returns a chunk's counts (OpenAI's ``usage``, else Groq's in ``x_groq``) or None;
        raises the error a stream reports in ``x_groq``."""
        extra = chunk.x_groq
        if extra is None:
            return chunk.usage
        if extra.error:
            raise ProviderError(self.name, "server", extra.error)
        return chunk.usage or extra.usage

    async def close(self) -> None:
        """Closes the SDK client and its connections."""
        await self._client.close()
