"""Anthropic, through the official ``anthropic`` SDK's streaming messages API."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

import anthropic
import httpx2

from ._errors import SdkErrors, provider_error
from .base import ChatMessage, ChatRequest, ChatUsage

__all__ = ["ANTHROPIC_URL", "AnthropicProvider", "anthropic_messages"]

ANTHROPIC_URL = "https://api.anthropic.com"
# One client serves every conversation of a processor; the SDK's default pool would queue them.
CONNECTION_LIMITS = httpx2.Limits(max_connections=1000, max_keepalive_connections=200)
_SDK = SdkErrors(
    status=anthropic.APIStatusError,
    timeout=anthropic.APITimeoutError,
    connection=anthropic.APIConnectionError,
    validation=anthropic.APIResponseValidationError,
    api=anthropic.AnthropicError,
)


def anthropic_messages(messages: Iterable[ChatMessage]) -> tuple[str, list[dict[str, Any]]]:
    """Returns the system prompt (a parameter of its own here) and the other messages."""
    system: list[str] = []
    wire: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "system":
            system.append(message.content)
        elif message.images and message.role == "user":
            blocks: list[dict[str, Any]] = [_image_block(url) for url in message.images]
            blocks.append({"type": "text", "text": message.content})
            wire.append({"role": "user", "content": blocks})
        else:
            wire.append({"role": message.role, "content": message.content})
    return "\n\n".join(system), wire


def _image_block(url: str) -> dict[str, Any]:
    """Returns an image block: a ``data:`` URL becomes a base64 source, any other a url one."""
    if url.startswith("data:") and ";base64," in url:
        header, data = url[5:].split(";base64,", 1)
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": header, "data": data},
        }
    return {"type": "image", "source": {"type": "url", "url": url}}


class AnthropicProvider:
    """A chat provider for Anthropic's messages API."""

    name = "anthropic"

    def __init__(
        self, *, api_key: str, default_model: str, timeout: float, base_url: str = ANTHROPIC_URL
    ) -> None:
        self.default_model = default_model
        self._secrets = (api_key,)
        self._client = anthropic.AsyncAnthropic(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            max_retries=0,  # the chain retries, with its own budget and breaker
            http_client=anthropic.DefaultAioHttpClient(limits=CONNECTION_LIMITS),
        )

    async def stream(self, request: ChatRequest) -> AsyncIterator[str | ChatUsage]:
        """Yields the reply's text pieces as they arrive, then one ChatUsage."""
        system, messages = anthropic_messages(request.messages)
        prompt_tokens = completion_tokens = 0
        finish_reason = ""
        try:
            response = await self._client.messages.create(
                model=request.model,
                messages=messages,  # type: ignore[arg-type]
                system=system or anthropic.omit,
                max_tokens=request.max_tokens,
                # No temperature: the messages API of SDK 2.x has no sampling parameters.
                stream=True,
            )
            async with response:
                async for event in response:
                    if event.type == "content_block_delta":
                        if event.delta.type == "text_delta" and event.delta.text:
                            yield event.delta.text
                    elif event.type == "message_start":
                        prompt_tokens = event.message.usage.input_tokens or 0
                        completion_tokens = event.message.usage.output_tokens or 0
                    elif event.type == "message_delta":
                        # Counts here are cumulative: they replace, not add to, the start's.
                        prompt_tokens = event.usage.input_tokens or prompt_tokens
                        completion_tokens = event.usage.output_tokens or completion_tokens
                        finish_reason = event.delta.stop_reason or finish_reason
        except Exception as exc:
            error = provider_error(self.name, exc, _SDK, self._secrets)
            if error is None:
                raise
            raise error from None
        yield ChatUsage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            finish_reason=finish_reason,
        )

    async def close(self) -> None:
        """Closes the SDK client and its connections."""
        await self._client.close()
