"""Runs the model's tool calls: each bounded in time and in size, each failure a message.

Whatever happens, a call ends with a result the model reads and can pass on to the person:
an unknown tool, arguments that do not fit, a tool that raised, one that did not answer within
its timeout, or one that answered too much (cut to ``max_chars`` with a note). A tool's own
:class:`~.base.ToolError` message is shown as written; any other exception by its class only,
its text going to the log redacted (it may quote what the tool was given).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

import msgspec
from prometheus_client import Counter, Histogram

from libra.runtime.redact import describe, redact

from .base import Tool, ToolContext, ToolError

if TYPE_CHECKING:
    from libra.processors.llm.providers.base import ToolCall

__all__ = ["MAX_ARGUMENT_CHARS", "ToolErrorKind", "ToolOutcome", "ToolRunner"]

log = logging.getLogger("libra.tools")
# Arguments longer than this are refused unread (and kept this long in the events): no tool of a
# chat takes pages of input, and an event must stay well under NATS's message size.
MAX_ARGUMENT_CHARS = 16_000
TOOL_CALLS = Counter("libra_tool_calls_total", "Tool calls run, by outcome", ["tool", "outcome"])
TOOL_SECONDS = Histogram(
    "libra_tool_call_seconds",
    "How long a tool call took",
    ["tool"],
    buckets=(0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
# "limit": over TOOLS_MAX_CALLS, not run; "not_recorded": a replay's call its recording lacks.
ToolErrorKind = Literal[
    "", "unknown", "bad_arguments", "failed", "timeout", "too_large", "limit", "not_recorded"
]


class ToolOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """What a call gave: ``result`` is what the model reads (the error's message on failure)."""

    result: str
    error: ToolErrorKind = ""
    latency_ms: float = 0.0
    chars: int = 0  # the result's size before any cut


class ToolRunner:
    """Runs calls against the given tools, with a ceiling on every tool's timeout."""

    def __init__(
        self,
        tools: Mapping[str, Tool],
        *,
        max_chars: int = 4000,
        timeout_s: float = 10.0,
        secrets: Mapping[str, str] | None = None,
        services: Mapping[str, Any] | None = None,
    ) -> None:
        self.tools = tools
        self.max_chars, self.timeout_s = max_chars, timeout_s
        self._secrets = dict(secrets or {})  # setting name -> value, handed out as declared
        self.services = dict(services or {})

    def context(self, tool: Tool, base: ToolContext) -> ToolContext:
        """``base`` with the services and only the secrets ``tool`` declared."""
        given = {name: self._secrets[name] for name in tool.secrets if name in self._secrets}
        return replace(base, secrets=given, services=self.services)

    async def run(
        self, call: ToolCall, base: ToolContext, offered: Mapping[str, Tool] | None = None
    ) -> ToolOutcome:
        """Runs one call among the ``offered`` tools (default: all); never raises (but for
        cancellation)."""
        tools = self.tools if offered is None else offered
        outcome = await self._run(call, base, tools)
        # a name the model made up is not a label: it would grow the metric without bound
        name = call.name if call.name in tools else "unknown"
        TOOL_CALLS.labels(name, outcome.error or "ok").inc()
        TOOL_SECONDS.labels(name).observe(outcome.latency_ms / 1000)
        return outcome

    async def _run(
        self, call: ToolCall, base: ToolContext, tools: Mapping[str, Tool]
    ) -> ToolOutcome:
        began = time.perf_counter()
        tool = tools.get(call.name)
        if tool is None:
            offered = ", ".join(sorted(tools)) or "none"
            message = f"there is no tool named {call.name[:64]!r} here (tools: {offered})"
            return self._outcome("unknown", message, began)
        timeout = min(tool.timeout_s, self.timeout_s)
        if len(call.arguments) > MAX_ARGUMENT_CHARS:
            message = (
                f"the arguments for {tool.name} are {len(call.arguments):,} characters long,"
                f" over the {MAX_ARGUMENT_CHARS:,} a call may have"
            )
            return self._outcome("bad_arguments", message, began)
        try:
            arguments = tool.decode(call.arguments)
        except ToolError as exc:
            return self._outcome("bad_arguments", str(exc), began)
        try:
            async with asyncio.timeout(timeout):
                value = await tool.run(arguments, self.context(tool, base))
        except TimeoutError:
            message = f"the tool {tool.name} did not answer within {timeout:g} s and was stopped"
            return self._outcome("timeout", message, began)
        except ToolError as exc:
            return self._outcome("failed", f"{tool.name} failed: {redact(str(exc))}", began)
        except Exception as exc:
            log.warning("tool %s raised %s", tool.name, describe(exc))
            message = f"{tool.name} failed ({type(exc).__name__}); the call can be tried again"
            return self._outcome("failed", message, began)
        return self._result(tool, value, began)

    def _result(self, tool: Tool, value: Any, began: float) -> ToolOutcome:
        text = value if isinstance(value, str) else _json(value)
        chars = len(text)
        if chars <= self.max_chars:
            return ToolOutcome(result=text, latency_ms=_since(began), chars=chars)
        note = (
            f"\n[cut off: {tool.name} returned {chars:,} characters; only the first"
            f" {self.max_chars:,} are shown]"
        )
        return ToolOutcome(
            result=text[: self.max_chars] + note,
            error="too_large",
            latency_ms=_since(began),
            chars=chars,
        )

    @staticmethod
    def _outcome(error: ToolErrorKind, message: str, began: float) -> ToolOutcome:
        return ToolOutcome(result=f"[error: {message}]", error=error, latency_ms=_since(began))


def _json(value: Any) -> str:
    try:
        return msgspec.json.encode(value).decode()
    except (TypeError, msgspec.EncodeError):
        return str(value)


def _since(began: float) -> float:
    return round((time.perf_counter() - began) * 1000, 3)
