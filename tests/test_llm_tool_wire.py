"""Tool calls through every provider adapter, each driving its real SDK against the loopback fake
speaking that vendor's streamed tool-call format."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import msgspec
import openai
import pytest
from aiohttp import web

from libra.ops.fakes.llm_wire import (
    ANTHROPIC_MESSAGES,
    OPENAI_CHAT,
    Behaviour,
    FakeCall,
    FakeLlmWire,
)
from libra.ops.fakes.loopback import LoopbackServer
from libra.processors.llm.providers.base import (
    ChatMessage,
    ChatProvider,
    ChatRequest,
    ChatUsage,
    ProviderError,
    ToolCall,
    ToolSpec,
)
from libra.processors.llm.providers.openai_compat import OpenAICompatProvider

from .test_llm_providers import PATHS, _provider

PROVIDERS = list(PATHS)
FINISH = {name: "tool_use" if name == "anthropic" else "tool_calls" for name in PROVIDERS}
CLOCK = ToolSpec(
    name="clock",
    description="The time now in a time zone.",
    parameters={
        "type": "object",
        "properties": {"zone": {"type": "string"}, "count": {"type": "integer"}},
        "required": ["zone"],
    },
)
DICE = ToolSpec(
    name="dice",
    description="Rolls dice.",
    parameters={"type": "object", "properties": {"sides": {"type": "integer"}}},
)
TOOLS = (CLOCK, DICE)
ARGUMENTS = {"zone": "Asia/Seoul", "count": 2, "options": {"format": "24h", "days": [1, 2]}}
PROMPT = (
    ChatMessage(role="system", content="You are Libra."),
    ChatMessage(role="user", content="What time is it in Seoul?"),
)


@pytest.fixture
async def wire() -> AsyncIterator[FakeLlmWire]:
    async with FakeLlmWire() as fake:
        yield fake


@pytest.fixture
async def provider(
    wire: FakeLlmWire, request: pytest.FixtureRequest
) -> AsyncIterator[ChatProvider]:
    chosen = _provider(wire, request.param)
    try:
        yield chosen
    finally:
        await chosen.close()


Items = list[str | ToolCall]


async def _collect(
    provider: ChatProvider,
    messages: tuple[ChatMessage, ...] = PROMPT,
    tools: tuple[ToolSpec, ...] = TOOLS,
) -> tuple[Items, ChatUsage]:
    """Returns what the stream yielded before its usage (text and calls, in order), and the
    usage, checking that the usage came last and once."""
    items: Items = []
    usage = None
    async for item in provider.stream(ChatRequest(model="m-1", messages=messages, tools=tools)):
        assert usage is None, "something arrived after the usage"
        if isinstance(item, ChatUsage):
            usage = item
        else:
            items.append(item)
    assert usage is not None
    return items, usage


def _calls(items: Items) -> list[ToolCall]:
    return [item for item in items if isinstance(item, ToolCall)]


def _text(items: Items) -> str:
    return "".join(item for item in items if isinstance(item, str))


def _sent_tools(name: str, body: dict) -> list[str]:
    """The names of the tools a request body offered, checking each is in the vendor's shape."""
    names = []
    for tool, spec in zip(body["tools"], TOOLS, strict=True):
        if name == "anthropic":
            assert tool == {
                "name": spec.name,
                "description": spec.description,
                "input_schema": spec.parameters,
            }
        else:
            assert tool == {
                "type": "function",
                "function": {
                    "name": spec.name,
                    "description": spec.description,
                    "parameters": spec.parameters,
                },
            }
        names.append(spec.name)
    return names


@pytest.mark.parametrize("provider", PROVIDERS, indirect=True)
async def test_a_call_and_its_result_round_trip(wire: FakeLlmWire, provider: ChatProvider) -> None:
    name = provider.name
    path = PATHS[name]
    wire.always(path, Behaviour.tool(FakeCall("clock", ARGUMENTS), text="It is {results} there."))

    items, usage = await _collect(provider)

    (call,) = items  # no text: the model only called
    assert isinstance(call, ToolCall)
    assert call.name == "clock"
    assert msgspec.json.decode(call.arguments) == ARGUMENTS
    assert call.id
    assert usage.finish_reason == FINISH[name]
    first = wire.calls(path)[0].body
    assert _sent_tools(name, first) == ["clock", "dice"]

    history = (
        *PROMPT,
        ChatMessage(role="assistant", content="", tool_calls=(call,)),
        ChatMessage(role="tool", content="09:41 KST", tool_call_id=call.id),
    )
    items, usage = await _collect(provider, history)

    assert not _calls(items)
    assert _text(items) == "It is 09:41 KST there."
    assert usage.finish_reason in ("stop", "end_turn")
    second = wire.calls(path)[1].body
    assert "tools" in second
    if name == "anthropic":
        assert second["messages"][-2:] == [
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": call.id, "name": "clock", "input": ARGUMENTS}
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": call.id,
                        "content": "09:41 KST",
                        "is_error": False,
                    }
                ],
            },
        ]
    else:
        assert second["messages"][-2:] == [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": "clock", "arguments": call.arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.id, "content": "09:41 KST"},
        ]


@pytest.mark.parametrize("provider", PROVIDERS, indirect=True)
async def test_two_calls_in_one_reply(wire: FakeLlmWire, provider: ChatProvider) -> None:
    path = PATHS[provider.name]
    wire.queue(path, Behaviour.tool(FakeCall("clock", ARGUMENTS), FakeCall("dice", {"sides": 20})))

    items, usage = await _collect(provider)

    calls = _calls(items)
    assert items == calls
    assert [call.name for call in calls] == ["clock", "dice"]
    assert [msgspec.json.decode(call.arguments) for call in calls] == [ARGUMENTS, {"sides": 20}]
    assert len({call.id for call in calls}) == 2
    assert usage.finish_reason == FINISH[provider.name]


@pytest.mark.parametrize("provider", PROVIDERS, indirect=True)
async def test_text_before_a_call_comes_first(wire: FakeLlmWire, provider: ChatProvider) -> None:
    path = PATHS[provider.name]
    before = "Let me look that up."
    wire.queue(path, Behaviour.tool(FakeCall("dice"), before=before))

    items, usage = await _collect(provider)

    *texts, call = items
    assert texts == ["Let", " me", " look", " that", " up."]
    assert isinstance(call, ToolCall)
    assert (call.name, msgspec.json.decode(call.arguments)) == ("dice", {})
    assert usage.finish_reason == FINISH[provider.name]
    assert usage.completion_tokens > 0


@pytest.mark.parametrize("provider", PROVIDERS, indirect=True)
async def test_no_tools_offered_no_call(wire: FakeLlmWire, provider: ChatProvider) -> None:
    path = PATHS[provider.name]
    wire.queue(path, Behaviour.tool(FakeCall("clock", ARGUMENTS), text="Just text."))

    items, usage = await _collect(provider, tools=())

    assert items == ["Just", " text."]
    assert usage.finish_reason in ("stop", "end_turn")
    assert "tools" not in wire.calls(path)[0].body


@pytest.mark.parametrize("provider", PROVIDERS, indirect=True)
async def test_a_call_to_a_tool_not_offered_is_left_out(
    wire: FakeLlmWire, provider: ChatProvider
) -> None:
    path = PATHS[provider.name]
    wire.queue(path, Behaviour.tool(FakeCall("weather"), FakeCall("dice", {"sides": 6})))
    items, _ = await _collect(provider)
    assert [call.name for call in _calls(items)] == ["dice"]

    wire.queue(path, Behaviour.tool(FakeCall("weather"), text="No such tool."))
    items, usage = await _collect(provider)
    assert items == ["No", " such", " tool."]
    assert usage.finish_reason in ("stop", "end_turn")


@pytest.mark.parametrize("provider", PROVIDERS, indirect=True)
async def test_a_result_for_no_call_is_refused(wire: FakeLlmWire, provider: ChatProvider) -> None:
    history = (*PROMPT, ChatMessage(role="tool", content="orphan", tool_call_id="call_nowhere"))
    with pytest.raises(ProviderError) as caught:
        await _collect(provider, history)
    assert (caught.value.kind, caught.value.status) == ("bad_request", 400)


@pytest.mark.parametrize("provider", ["anthropic"], indirect=True)
async def test_anthropic_results_of_one_turn_go_in_one_message(
    wire: FakeLlmWire, provider: ChatProvider
) -> None:
    wire.queue(ANTHROPIC_MESSAGES, Behaviour.ok("Got {results}."))
    calls = (
        ToolCall(id="toolu_1", name="clock", arguments='{"zone": "UTC"}'),
        ToolCall(id="toolu_2", name="dice", arguments="not json"),
    )
    history = (
        *PROMPT,
        ChatMessage(role="assistant", content="Checking.", tool_calls=calls),
        ChatMessage(role="tool", content="12:00", tool_call_id="toolu_1"),
        ChatMessage(role="tool", content="bad arguments", tool_call_id="toolu_2", is_error=True),
    )
    items, _ = await _collect(provider, history)
    assert _text(items) == "Got 12:00 | bad arguments."
    (request,) = wire.calls(ANTHROPIC_MESSAGES)
    assert request.messages[-2:] == [
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "clock", "input": {"zone": "UTC"}},
                {"type": "tool_use", "id": "toolu_2", "name": "dice", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": "12:00",
                    "is_error": False,
                },
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_2",
                    "content": "bad arguments",
                    "is_error": True,
                },
            ],
        },
    ]


@pytest.mark.parametrize("provider", ["openai", "groq"], indirect=True)
async def test_openai_results_of_one_turn_are_tool_messages(
    wire: FakeLlmWire, provider: ChatProvider
) -> None:
    path = PATHS[provider.name]
    wire.queue(path, Behaviour.ok("Got {results}."))
    calls = (
        ToolCall(id="call_a", name="clock", arguments='{"zone": "UTC"}'),
        ToolCall(id="call_b", name="dice", arguments="{}"),
    )
    history = (
        *PROMPT,
        ChatMessage(role="assistant", content="Checking.", tool_calls=calls),
        ChatMessage(role="tool", content="12:00", tool_call_id="call_a"),
        ChatMessage(role="tool", content="4", tool_call_id="call_b", is_error=True),
    )
    items, _ = await _collect(provider, history)
    assert _text(items) == "Got 12:00 | 4."
    (request,) = wire.calls(path)
    assert request.messages[-3]["content"] == "Checking."
    assert [m["tool_call_id"] for m in request.messages[-2:]] == ["call_a", "call_b"]


# --- servers that stream calls their own way -------------------------------------------------


class _RawCalls(LoopbackServer):
    """Streams the events of ``EVENTS`` as one OpenAI-compatible reply, each its own write."""

    EVENTS: tuple[dict, ...] = ()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in self.EVENTS:
            await response.write(b"data: " + msgspec.json.encode(event) + b"\n\n")
            await asyncio.sleep(0.002)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _delta(delta: dict, finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


class _NoIndexNoId(_RawCalls):
    """An older Ollama: whole calls with neither index nor id, two in one chunk."""

    EVENTS = (
        _delta(
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"function": {"name": "clock", "arguments": '{"zone":"UTC"}'}},
                    {"function": {"name": "dice", "arguments": '{"sides":6}'}},
                ],
            }
        ),
        _delta({}, "tool_calls"),
    )


class _EveryCallIndexZero(_RawCalls):
    """A server that numbers every whole call 0, each with its own id."""

    EVENTS = (
        _delta({"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "clock"}}]}),
        _delta({"tool_calls": [{"index": 0, "function": {"arguments": '{"zone":'}}]}),
        _delta({"tool_calls": [{"index": 0, "function": {"arguments": '"UTC"}'}}]}),
        _delta({"tool_calls": [{"index": 0, "id": "c2", "function": {"name": "dice"}}]}),
        _delta({}, "tool_calls"),
    )


@pytest.mark.parametrize("server", [_NoIndexNoId, _EveryCallIndexZero])
async def test_calls_without_index_or_id_are_told_apart(server: type[_RawCalls]) -> None:
    async with server() as fake:
        provider = OpenAICompatProvider(
            "local", default_model="m", timeout=5.0, base_url=f"{fake.url}/v1"
        )
        try:
            items, usage = await _collect(provider)
        finally:
            await provider.close()
    calls = _calls(items)
    assert [(c.name, msgspec.json.decode(c.arguments)) for c in calls] == [
        ("clock", {"zone": "UTC"}),
        ("dice", {"sides": 6} if server is _NoIndexNoId else {}),
    ]
    assert all(call.id for call in calls)
    assert len({call.id for call in calls}) == 2
    assert usage.finish_reason == "tool_calls"


# --- the fake's own wire ---------------------------------------------------------------------


async def _events(wire: FakeLlmWire, path: str, body: dict) -> list[dict]:
    """Posts ``body`` to the fake and returns the JSON of every event it streamed back."""
    async with aiohttp.ClientSession() as session, session.post(wire.url + path, json=body) as r:
        assert r.status == 200, await r.text()
        text = await r.text()
    lines = (line[5:].strip() for line in text.splitlines() if line.startswith("data:"))
    return [msgspec.json.decode(line) for line in lines if line != "[DONE]"]


def _openai_body(tools: list[dict]) -> dict:
    user = [{"role": "user", "content": "What time is it?"}]
    return {"model": "m", "stream": True, "messages": user, "tools": tools}


OPENAI_TOOLS = [{"type": "function", "function": {"name": "clock", "parameters": {}}}]


@pytest.mark.parametrize("name", ["openai", "local", "ollama", "groq"])
async def test_the_fake_streams_openai_shaped_calls(wire: FakeLlmWire, name: str) -> None:
    wire.queue(PATHS[name], Behaviour.tool(FakeCall("clock", ARGUMENTS)))
    events = await _events(wire, PATHS[name], _openai_body(OPENAI_TOOLS))
    deltas = [event["choices"][0]["delta"] for event in events if event["choices"]]
    parts = [part for delta in deltas for part in delta.get("tool_calls", ())]
    head, *rest = parts
    assert head["index"] == 0
    assert head["id"].startswith("call_")
    assert head["type"] == "function"
    assert head["function"]["name"] == "clock"
    if name in ("openai", "local"):
        assert head["function"]["arguments"] == ""
        assert len(rest) >= 2
        assert all(set(part) == {"index", "function"} for part in rest)
        json = "".join(part["function"]["arguments"] for part in rest)
    else:  # Ollama and Groq send each call whole
        assert rest == []
        json = head["function"]["arguments"]
    assert msgspec.json.decode(json) == ARGUMENTS
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_the_fake_streams_anthropic_tool_use_blocks(wire: FakeLlmWire) -> None:
    wire.queue(ANTHROPIC_MESSAGES, Behaviour.tool(FakeCall("clock", ARGUMENTS)))
    body = {
        "model": "m",
        "max_tokens": 64,
        "stream": True,
        "messages": [{"role": "user", "content": "What time is it?"}],
        "tools": [{"name": "clock", "input_schema": {}}],
    }
    events = await _events(wire, ANTHROPIC_MESSAGES, body)
    blocks = [e for e in events if e["type"].startswith("content_block")]
    start, *deltas, stop = blocks
    assert start["index"] == 0  # no text before it: no text block
    assert start["content_block"]["type"] == "tool_use"
    assert start["content_block"]["name"] == "clock"
    fragments = [d["delta"]["partial_json"] for d in deltas]
    assert all(d["delta"]["type"] == "input_json_delta" for d in deltas)
    assert len([f for f in fragments if f]) >= 2
    assert msgspec.json.decode("".join(fragments)) == ARGUMENTS
    assert stop == {"type": "content_block_stop", "index": 0}
    (end,) = [e for e in events if e["type"] == "message_delta"]
    assert end["delta"]["stop_reason"] == "tool_use"


async def test_the_fake_reads_anthropic_results_given_as_text_blocks(wire: FakeLlmWire) -> None:
    wire.queue(ANTHROPIC_MESSAGES, Behaviour.tool(FakeCall("clock"), text="Saw {results}"))
    result = {
        "type": "tool_result",
        "tool_use_id": "t1",
        "content": [{"type": "text", "text": "42"}],
    }
    body = {
        "model": "m",
        "max_tokens": 64,
        "stream": True,
        "tools": [{"name": "clock", "input_schema": {}}],
        "messages": [
            {"role": "user", "content": "Go."},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "clock"}]},
            {"role": "user", "content": [result]},
        ],
    }
    events = await _events(wire, ANTHROPIC_MESSAGES, body)
    text = "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")
    assert text == "Saw 42"


async def test_a_request_that_is_not_streamed_gets_text(wire: FakeLlmWire) -> None:
    wire.queue(OPENAI_CHAT, Behaviour.tool(FakeCall("clock"), text="Plain."))
    client = openai.AsyncOpenAI(api_key="sk-test", base_url=f"{wire.url}/v1", max_retries=0)
    try:
        reply = await client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "Go."}],
            tools=OPENAI_TOOLS,  # type: ignore[arg-type]
        )
    finally:
        await client.close()
    assert reply.choices[0].message.content == "Plain."
