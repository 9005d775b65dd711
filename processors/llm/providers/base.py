"""What every chat provider adapter offers: one streaming call, and one error type.

An adapter is a thin wrapper over the vendor's official SDK. It turns a :class:`ChatRequest`
into the SDK's call, yields text pieces as they arrive, each whole :class:`ToolCall` the model
asks for (its arguments gathered from however many pieces the vendor streamed them in) and,
last, one :class:`ChatUsage`; and
it turns every SDK error into a :class:`ProviderError` whose ``kind`` says whether trying again
can help. Timeouts, retries, the circuit breaker and the fallback order live in the chain
(``processors/llm/chain.py``), not in adapters.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal, Protocol

import msgspec

__all__ = [
    "ChatMessage",
    "ChatProvider",
    "ChatRequest",
    "ChatUsage",
    "ErrorKind",
    "ProviderError",
    "ToolCall",
    "ToolSpec",
]

ErrorKind = Literal[
    "timeout", "rate_limited", "server", "connection", "malformed", "auth", "bad_request"
]
_RETRYABLE = frozenset({"timeout", "rate_limited", "server", "connection", "malformed"})


class ToolSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A tool as a model is offered it: ``parameters`` is the JSON Schema of its arguments."""

    name: str
    description: str
    parameters: dict[str, Any]


class ToolCall(msgspec.Struct, frozen=True, kw_only=True):
    """A call the model asked for: ``id`` is the vendor's, ``arguments`` the JSON text it wrote
    (possibly not JSON at all: the runner says so to the model)."""

    id: str
    name: str
    arguments: str = "{}"


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One message of the prompt; ``images`` are URLs, sent only to models that can see.

    An ``assistant`` message may carry the ``tool_calls`` the model made (``content`` is then
    the text it wrote before them, often empty); a ``tool`` message is one call's result, for
    the call ``tool_call_id``, with ``is_error`` where the call failed.
    """

    role: Literal["system", "user", "assistant", "tool"]
    content: str
    images: tuple[str, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    is_error: bool = False


class ChatRequest(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    messages: tuple[ChatMessage, ...]
    max_tokens: int = 512
    temperature: float = 0.6
    tools: tuple[ToolSpec, ...] = ()  # offered to the model; none: a plain chat request


class ChatUsage(msgspec.Struct, frozen=True, kw_only=True):
    """Token counts as the provider reported them (0 where it did not)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""


class ProviderError(Exception):
    """A provider call failed; ``kind`` tells whether a retry or the next provider can help."""

    def __init__(
        self,
        provider: str,
        kind: ErrorKind,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{provider}: {kind}: {message}")
        self.provider = provider
        self.kind = kind
        self.message = message
        self.status = status
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.kind in _RETRYABLE


class ChatProvider(Protocol):
    """A chat model vendor behind its official SDK."""

    name: str
    default_model: str

    def stream(self, request: ChatRequest) -> AsyncIterator[str | ToolCall | ChatUsage]:
        """Yields text pieces as they arrive and each whole tool call, then one ChatUsage;
        raises ProviderError."""
        ...

    async def close(self) -> None: ...
