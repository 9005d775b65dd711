"""Anthropic, through the official ``anthropic`` SDK's streaming messages API."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

import anthropic
import httpx2
import msgspec

from ._errors import SdkErrors, provider_error
from .base import ChatMessage, ChatRequest, ChatUsage, ToolCall, ToolSpec

__all__ = ["ANTHROPIC_URL", "AnthropicProvider", "anthropic_messages", "anthropic_tools"]

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
    """Returns the system prompt (a parameter of its own here) and the other messages.

    The calls an assistant made are its ``tool_use`` blocks; the results of consecutive
    ``tool`` messages go together as ``tool_result`` blocks of one user message, as Anthropic
    wants every result of a turn in the message right after it.
    """
    system: list[str] = []
    wire: list[dict[str, Any]] = []
    results: list[dict[str, Any]] | None = None  # the blocks of the user message being filled
    for message in messages:
        if message.role == "tool":
            if results is None:
                results = []
                wire.append({"role": "user", "content": results})
            results.append(
                {
                    "type": "tool_result",
                    "tool_use_id": message.tool_call_id,
                    "content": message.content,
                    "is_error": message.is_error,
                }
            )
            continue
        results = None
        if message.role == "system":
            system.append(message.content)
        elif message.images and message.role == "user":
            blocks: list[dict[str, Any]] = [_image_block(url) for url in message.images]
            blocks.append({"type": "text", "text": message.content})
            wire.append({"role": "user", "content": blocks})
        elif message.tool_calls:
            wire.append({"role": "assistant", "content": _tool_use_blocks(message)})
        else:
            wire.append({"role": message.role, "content": message.content})
    return "\n\n".join(system), wire


def anthropic_tools(tools: Iterable[ToolSpec]) -> list[dict[str, Any]]:
    """Returns the tools in Anthropic's wire shape."""
    return [
        {"name": tool.name, "description": tool.description, "input_schema": tool.parameters}
        for tool in tools
    ]


def _tool_use_blocks(message: ChatMessage) -> list[dict[str, Any]]:
    """An assistant message's text (where it wrote any) and one ``tool_use`` block a call."""
    blocks: list[dict[str, Any]] = []
    if message.content:
        blocks.append({"type": "text", "text": message.content})
    for call in message.tool_calls:
        blocks.append(
            {"type": "tool_use", "id": call.id, "name": call.name, "input": _input(call.arguments)}
        )
    return blocks


def _input(arguments: str) -> dict[str, Any]:
    """A call's arguments as the object Anthropic wants: ``{}`` where the model wrote no JSON
    object (the runner told it so in the call's result)."""
    try:
        value = msgspec.json.decode(arguments)
    except msgspec.DecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _image_block(url: str) -> dict[str, Any]:
    """Returns an image block: a ``data:`` URL becomes a base64 source, any other a url one."""
    if url.startswith("data:") and ";base64," in url:
        header, data = url[5:].split(";base64,", 1)
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": header, "data": data},
        }
    return {"type": "image", "source": {"type": "url", "url": url}}


class _ToolUses:
    """The ``tool_use`` blocks of one streamed reply, each gathered from its
    ``input_json_delta`` pieces until its ``content_block_stop``."""

    __slots__ = ("_open",)

    def __init__(self) -> None:
        self._open: dict[int, tuple[str, str, list[str]]] = {}  # index -> id, name, JSON

    def see(self, event: Any) -> ToolCall | None:
        """Takes one stream event; returns the call whose block it ended."""
        if event.type == "content_block_start":
            if event.content_block.type == "tool_use":
                block = event.content_block
                self._open[event.index] = (block.id, block.name, [])
        elif event.type == "content_block_delta":
            if event.delta.type == "input_json_delta" and event.index in self._open:
                self._open[event.index][2].append(event.delta.partial_json)
        elif event.type == "content_block_stop" and event.index in self._open:
            call_id, name, json = self._open.pop(event.index)
            return ToolCall(id=call_id, name=name, arguments="".join(json) or "{}")
        return None


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

    async def stream(self, request: ChatRequest) -> AsyncIterator[str | ToolCall | ChatUsage]:
        """Yields the reply's text pieces as they arrive, each tool call as its block ends,
        then one ChatUsage."""
        system, messages = anthropic_messages(request.messages)
        prompt_tokens = completion_tokens = 0
        finish_reason = ""
        calls = _ToolUses()
        tools = anthropic_tools(request.tools) if request.tools else anthropic.omit
        try:
            response = await self._client.messages.create(
                model=request.model,
                messages=messages,  # type: ignore[arg-type]
                system=system or anthropic.omit,
                tools=tools,  # type: ignore[arg-type]
                max_tokens=request.max_tokens,
                # No temperature: the messages API of SDK 2.x has no sampling parameters.
                stream=True,
            )
            async with response:
                async for event in response:
                    if event.type == "content_block_delta" and event.delta.type == "text_delta":
                        if event.delta.text:
                            yield event.delta.text
                    elif event.type == "message_start":
                        prompt_tokens = event.message.usage.input_tokens or 0
                        completion_tokens = event.message.usage.output_tokens or 0
                    elif event.type == "message_delta":
                        # Counts here are cumulative: they replace, not add to, the start's.
                        prompt_tokens = event.usage.input_tokens or prompt_tokens
                        completion_tokens = event.usage.output_tokens or completion_tokens
                        finish_reason = event.delta.stop_reason or finish_reason
                    elif (call := calls.see(event)) is not None:
                        yield call
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
