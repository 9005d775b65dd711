"""The tools a reply may use: which are offered for a turn, and how their calls are answered.

A turn is offered the installed tools its server enabled (``/tools``; else ``TOOLS_ENABLED``),
less those it may not have (``server_info`` outside a Discord server). Live, a call runs through
the :class:`~libra.tools.runner.ToolRunner`; in a replay or an eval (``recorded``) it is answered
with the result the turn's recorded ``llm.completed`` holds for the same call (same tool and
arguments, else the same tool, in order), and a call the recording does not have gets an error
saying so: a replay never rolls the dice again nor reads today's time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

from libra.contracts import Event, ToolCalled, ToolReturned, ToolUse, TurnAccepted, derive
from libra.processors.knowledge.retrieval import RecordedCompletions
from libra.processors.knowledge.scopes import turn_scopes
from libra.tools.base import Tool, ToolContext
from libra.tools.registry import enabled_names
from libra.tools.runner import MAX_ARGUMENT_CHARS, ToolOutcome, ToolRunner

from .chain import ChainResult, ProviderChain
from .providers.base import ChatMessage, ChatUsage, ToolCall, ToolSpec

__all__ = ["ToolBox", "TurnTools", "answer_with_tools"]

_LIMIT = "the limit of {n} tool calls for one reply is reached: answer with what you have"
_TOO_MANY = {
    "en": "I stopped here: answering this took more tool calls than I may make for one reply.",
    "ko": "여기서 멈췄어요. 이 답에는 한 번에 쓸 수 있는 것보다 많은 도구 호출이 필요했어요.",
}
_NOT_RECORDED = "this call was not made when the turn was recorded, so a replay cannot make it"


class TurnTools:
    """The tools one reply was offered, and the calls it made so far."""

    def __init__(
        self,
        box: ToolBox,
        turn: TurnAccepted,
        tools: Mapping[str, Tool],
        recorded: tuple[ToolUse, ...] | None,
    ) -> None:
        self.box, self.tools = box, tools
        self.specs: tuple[ToolSpec, ...] = tuple(box.specs[name] for name in tools)
        self.uses: list[ToolUse] = []
        self._recorded = list(recorded) if recorded is not None else None
        self._context = ToolContext(
            user=turn.user,
            conversation=turn.conversation,
            platform=turn.origin.platform,
            guild=turn.origin.guild,
            channel=turn.origin.channel,
            language=turn.language,
            scopes=tuple(turn_scopes(turn)),
        )

    async def answer(self, calls: list[ToolCall]) -> list[ToolOutcome]:
        """Runs a round's calls side by side (or reads their recorded results), in order; those
        past ``TOOLS_MAX_CALLS`` for the reply are not run: their result says the limit is
        reached. Each is remembered for the reply's ``llm.completed``."""
        left = max(0, self.box.max_calls - sum(use.error != "limit" for use in self.uses))
        outcomes = list(await asyncio.gather(*(self._one(call) for call in calls[:left])))
        limit = f"[error: {_LIMIT.format(n=self.box.max_calls)}]"
        outcomes += [ToolOutcome(result=limit, error="limit") for _ in calls[left:]]
        for call, outcome in zip(map(_kept, calls), outcomes, strict=True):
            self.uses.append(
                ToolUse(
                    call=call.id,
                    name=call.name,
                    arguments=call.arguments,
                    result=outcome.result,
                    error=outcome.error,
                )
            )
        return outcomes

    async def _one(self, call: ToolCall) -> ToolOutcome:
        if self._recorded is not None:
            return self._replayed(call)
        return await self.box.runner.run(call, self._context, self.tools)

    def _replayed(self, call: ToolCall) -> ToolOutcome:
        assert self._recorded is not None
        for same_arguments in (True, False):
            for index, use in enumerate(self._recorded):
                if use.name == call.name and (
                    not same_arguments or use.arguments == call.arguments
                ):
                    del self._recorded[index]
                    error: Any = use.error  # as recorded
                    return ToolOutcome(result=use.result, error=error, chars=len(use.result))
        return ToolOutcome(result=f"[error: {_NOT_RECORDED}]", error="not_recorded")


class ToolBox:
    """The installed tools, what is enabled by default, and the limits on their calls.

    ``recorded_from`` (a replay's or an eval's): answer calls from the turns' recorded
    completions instead of running them.
    """

    def __init__(
        self,
        tools: Mapping[str, Tool],
        *,
        default: str,
        max_calls: int = 4,
        max_chars: int = 4000,
        timeout_s: float = 10.0,
        secrets: Mapping[str, str] | None = None,
        services: Mapping[str, Any] | None = None,
        recorded_from: RecordedCompletions | None = None,
    ) -> None:
        self.tools, self.default = dict(tools), default
        # the JSON Schema of a tool's arguments is made once, not for every turn
        self.specs = {name: tool.spec() for name, tool in self.tools.items()}
        self.max_calls = max(0, max_calls)
        self.runner = ToolRunner(
            self.tools,
            max_chars=max_chars,
            timeout_s=timeout_s,
            secrets=secrets,
            services=services,
        )
        self.recorded_from = recorded_from

    def offered(self, turn: TurnAccepted, chosen: str = "") -> dict[str, Tool]:
        """The tools the turn may call: enabled here, installed, and allowed where it is."""
        if self.max_calls <= 0:
            return {}
        in_server = turn.origin.platform == "discord" and bool(turn.origin.guild)
        offered = {}
        for name in enabled_names(self.default, chosen):
            tool = self.tools.get(name)
            if tool is None:
                continue  # enabled but not installed (a plugin removed): `libra tools` says so
            if tool.access == "servers" and not in_server:
                continue
            offered[name] = tool
        return offered

    async def for_turn(self, turn: TurnAccepted, chosen: str = "") -> TurnTools | None:
        """The turn's tools, or None when it is offered none."""
        tools = self.offered(turn, chosen)
        if not tools:
            return None
        recorded = None
        if self.recorded_from is not None:
            completion = await self.recorded_from.get(turn)
            recorded = completion.tools if completion is not None else ()
        return TurnTools(self, turn, tools, recorded)


async def answer_with_tools(
    chain: ProviderChain,
    turn: TurnAccepted,
    messages: tuple[ChatMessage, ...],
    tools: TurnTools | None,
    *,
    attempt: str,
    max_tokens: int,
    temperature: float,
    model_override: str | None = None,
) -> AsyncIterator[str | Event | ChainResult]:
    """A reply's text pieces and its tool calls' events, then one ChainResult.

    Each round is one request to the chain; a round that ends in tool calls has them answered
    (side by side), their results added to the messages, and the next round asks again. A model
    that calls tools past ``TOOLS_MAX_CALLS`` is told the limit is reached instead; one round
    more than the limit allows is the last, and a call made then ends the reply with a note.
    """
    specs = tools.specs if tools is not None else ()
    rounds = (tools.box.max_calls + 1) if tools is not None else 0
    spent: list[ChainResult] = []
    for round_ in range(rounds + 1):
        calls: list[ToolCall] = []
        text: list[str] = []
        stream = chain.stream(
            messages,
            max_tokens=max_tokens,
            temperature=temperature,
            model_override=model_override,
            tools=specs,
        )
        async with contextlib.aclosing(stream):  # a dropped draft hangs up on the provider
            async for item in stream:
                if type(item) is str:
                    text.append(item)
                    yield item
                elif isinstance(item, ToolCall):
                    calls.append(item)
                else:
                    spent.append(item)
        if not calls or tools is None or round_ == rounds:
            if calls:  # still calling tools after being told the limit was reached
                yield ("\n\n" if text else "") + _TOO_MANY.get(turn.language, _TOO_MANY["en"])
            yield _merged(spent)
            return
        kept = [_kept(call) for call in calls]
        # keyed by place, not by the vendor's id: a server may give two calls the same id
        for place, call in enumerate(kept):
            yield derive(
                turn,
                ToolCalled,
                key=f"tool/{attempt}/{round_}.{place}/called",
                call=call.id,
                name=call.name,
                arguments=call.arguments,
                round=round_,
                attempt=attempt,
                origin=turn.origin,
            )
        outcomes = await tools.answer(calls)
        results: list[ChatMessage] = []
        for place, (call, outcome) in enumerate(zip(calls, outcomes, strict=True)):
            yield derive(
                turn,
                ToolReturned,
                key=f"tool/{attempt}/{round_}.{place}/returned",
                call=kept[place].id,
                name=kept[place].name,
                result=outcome.result,
                error=outcome.error,
                latency_ms=outcome.latency_ms,
                chars=outcome.chars,
                attempt=attempt,
                recorded=tools.box.recorded_from is not None,
                origin=turn.origin,
            )
            results.append(
                ChatMessage(
                    role="tool",
                    content=outcome.result,
                    tool_call_id=call.id,
                    is_error=bool(outcome.error),
                )
            )
        asked = ChatMessage(role="assistant", content="".join(text), tool_calls=tuple(calls))
        messages = (*messages, asked, *results)


def _merged(results: list[ChainResult]) -> ChainResult:
    """One result for a reply made in several rounds: the last round's provider, model and
    finish, every round's tokens and failed tries, the first round's time to first token."""
    if len(results) == 1:
        return results[0]
    last = results[-1]
    usage = ChatUsage(
        prompt_tokens=sum(r.usage.prompt_tokens for r in results),
        completion_tokens=sum(r.usage.completion_tokens for r in results),
        finish_reason=last.usage.finish_reason,
    )
    return ChainResult(
        provider=last.provider,
        model=last.model,
        usage=usage,
        attempts=tuple(a for r in results for a in r.attempts),
        ttft_ms=results[0].ttft_ms,
        total_ms=sum(r.total_ms for r in results),
    )


def _kept(call: ToolCall) -> ToolCall:
    """The call as events and the record keep it: what the model wrote is bounded, so that a
    model (or a server) that writes pages cannot make an event too large to publish."""
    if len(call.id) <= 64 and len(call.name) <= 64 and len(call.arguments) <= MAX_ARGUMENT_CHARS:
        return call
    return ToolCall(
        id=call.id[:64], name=call.name[:64], arguments=call.arguments[:MAX_ARGUMENT_CHARS]
    )
