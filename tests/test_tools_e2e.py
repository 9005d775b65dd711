"""Tools end to end over HTTP, through each provider's real SDK against the loopback fake of
its tool-calling wire (streamed): the model asks for a tool, Libra runs it, the events say so,
the model is handed the result and the person reads it; a replay hands the recorded result
back instead of calling the tool again."""

from __future__ import annotations

import json
import re
import sys

import httpx
import pytest

from libra.contracts import LlmCompleted, ToolCalled, ToolReturned
from libra.ops.eval.plan import Candidate, EvalPlan
from libra.ops.eval.run import run_eval
from libra.ops.fakes.llm_wire import (
    ANTHROPIC_MESSAGES,
    GROQ_CHAT,
    OLLAMA_CHAT,
    OPENAI_CHAT,
    Behaviour,
    FakeCall,
    FakeLlmWire,
)
from libra.ops.replay import REPLAY_STREAM, Selection, replay

from .helpers import stream_events, wait_http
from .stack import TEXT_PIPELINE, answering_with, running
from .tool_plugin import write_plugin

PROVIDERS = {
    "openai": (OPENAI_CHAT, {}),
    "groq": (GROQ_CHAT, {"LLM_PROVIDERS": "groq", "GROQ_API_KEY": "gsk_test"}),
    "anthropic": (ANTHROPIC_MESSAGES, {"LLM_PROVIDERS": "anthropic", "ANTHROPIC_API_KEY": "ak"}),
    "ollama": (OLLAMA_CHAT, {"LLM_PROVIDERS": "ollama"}),
}
ROLLED = re.compile(r"rolled 2d6: (\d), (\d) \(total (\d+)\)")


@pytest.fixture
async def wire():
    async with FakeLlmWire() as fake:
        yield fake


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(write_plugin(tmp_path / "site")))
    import libra_tool_demo

    libra_tool_demo.CALLS.clear()
    yield libra_tool_demo
    sys.modules.pop("libra_tool_demo", None)


async def _ask(port: int, user: str, message: str) -> httpx.Response:
    await wait_http(port)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        return await http.post("/api/chat/completions", json={"userId": user, "message": message})


def _offered(provider: str, body: dict) -> set[str]:
    if provider == "anthropic":
        return {tool["name"] for tool in body["tools"]}
    assert all(tool["type"] == "function" for tool in body["tools"])
    return {tool["function"]["name"] for tool in body["tools"]}


@pytest.mark.parametrize("provider", list(PROVIDERS))
async def test_the_model_calls_a_tool_and_answers_with_its_result(settings, wire, provider) -> None:
    path, extra = PROVIDERS[provider]
    wire.always(
        path,
        Behaviour.tool(
            FakeCall("dice", {"count": 2, "sides": 6}), before="Rolling.", text=" {results}"
        ),
    )
    s = answering_with(settings, wire, **wire.env(), **extra)
    async with running(s, [*TEXT_PIPELINE, "http"]) as resources:
        answer = await _ask(s.http_port, "ann", "Roll two dice for me")
        assert answer.status_code == 200, answer.text
        content = answer.json()["content"]
        assert content.startswith("Rolling. rolled")
        rolled = ROLLED.search(content)
        assert rolled is not None, content
        assert int(rolled.group(1)) + int(rolled.group(2)) == int(rolled.group(3))

        events = await stream_events(resources.log.js, "LIBRA", "libra.>")
    [called] = [e for e in events if isinstance(e, ToolCalled)]
    [returned] = [e for e in events if isinstance(e, ToolReturned)]
    [completed] = [e for e in events if isinstance(e, LlmCompleted)]
    assert called.name == "dice" and json.loads(called.arguments) == {"count": 2, "sides": 6}
    assert returned.call == called.call and returned.error == "" and not returned.recorded
    assert returned.result == rolled.group(0) and returned.latency_ms > 0
    assert called.turn == returned.turn == completed.turn
    [use] = completed.tools
    assert (use.name, use.result, use.call) == ("dice", returned.result, called.call)
    assert completed.text == content and completed.provider == provider

    first, second = wire.calls(path)
    # server_info reads a Discord server: an HTTP turn is not offered it
    assert _offered(provider, first.body) == {"time", "knowledge_search", "dice"}
    sent = json.dumps(second.messages)
    assert returned.result in sent and called.call in sent


async def test_a_replay_hands_the_recorded_result_back_instead_of_calling_again(
    settings, eventlog, wire, plugin, tmp_path
) -> None:
    wire.always(OPENAI_CHAT, Behaviour.tool(FakeCall("echo", {"text": "ping"}), text="{results}"))
    s = answering_with(settings, wire, TOOLS_ENABLED="echo,dice")
    async with running(s, [*TEXT_PIPELINE, "http"]):
        answer = await _ask(s.http_port, "bo", "Echo ping")
        assert answer.status_code == 200
        assert json.loads(answer.json()["content"]) == {"echo": "ping", "user": "http:bo"}
    assert plugin.CALLS == [("echo", "ping")]

    wire.reset()
    wire.always(
        OPENAI_CHAT,
        Behaviour.tool(FakeCall("echo", {"text": "ping"}), FakeCall("dice"), text="{results}"),
    )
    result = await replay(s, "llm", Selection(conversation="http-bo"), run="t1")
    assert result.inputs == 1 and result.errors == 0
    assert plugin.CALLS == [("echo", "ping")]  # not called again
    replayed = await stream_events(eventlog.js, REPLAY_STREAM, "replay.t1.>")
    returned = {e.name: e for e in replayed if isinstance(e, ToolReturned)}
    assert returned["echo"].recorded and returned["echo"].result == answer.json()["content"]
    # the recording has no roll: the replay does not roll now
    assert returned["dice"].error == "not_recorded" and "rolled" not in returned["dice"].result

    # an eval's candidate is handed the recorded result too
    plan = EvalPlan(candidates=(Candidate(provider="openai", model="gpt-4o-mini"),))
    done = await run_eval(s, plan, Selection(conversation="http-bo"), tmp_path, progress=False)
    assert (done.turns, done.answered) == (1, 1)
    assert plugin.CALLS == [("echo", "ping")]
    [row] = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert row["text"].startswith(answer.json()["content"])
    assert "this call was not made when the turn was recorded" in row["text"]


async def test_a_tool_that_hangs_fails_or_goes_past_the_limit_ends_in_words(
    settings, wire, plugin
) -> None:
    wire.always(
        OPENAI_CHAT,
        Behaviour.tool(
            FakeCall("hang", {"text": "a"}),
            FakeCall("boom", {"text": "b"}),
            FakeCall("echo", {"text": "c"}),
            text="Sorry: {results}",
        ),
    )
    s = answering_with(settings, wire, TOOLS_ENABLED="hang,boom,echo", TOOLS_MAX_CALLS="2")
    async with running(s, [*TEXT_PIPELINE, "http"]) as resources:
        answer = await _ask(s.http_port, "cy", "Do everything")
        events = await stream_events(resources.log.js, "LIBRA", "libra.tool.returned.>")
    assert answer.status_code == 200
    content = answer.json()["content"]
    assert "the tool hang did not answer within 0.3 s and was stopped" in content
    assert "boom failed (RuntimeError)" in content
    assert "the limit of 2 tool calls for one reply is reached" in content
    errors = {e.name: e.error for e in events if isinstance(e, ToolReturned)}
    assert errors == {"hang": "timeout", "boom": "failed", "echo": "limit"}
    assert ("echo", "c") not in plugin.CALLS  # over the limit: never run


async def test_on_discord_the_server_tool_reads_the_server_and_the_reply_names_it(
    settings, world, gateways, wire
) -> None:
    fake = world.fake
    wire.always(OPENAI_CHAT, Behaviour.tool(FakeCall("server_info"), text="Here: {results}"))
    stack = answering_with(settings, wire, DISCORD_TOKEN=fake.token, DISCORD_REST_URL=fake.rest_url)
    async with running(stack, TEXT_PIPELINE) as resources:
        await gateways.start()
        await fake.send_message(
            world.channel, "Tell me about this server", author=world.alice, mention_bot=True
        )

        await fake.wait_for(
            lambda: any("-# Tools" in m["content"] for m in fake.bot_messages(world.channel)[-1:]),
            timeout=30,
        )
        events = await stream_events(resources.log.js, "LIBRA", "libra.tool.returned.>")
    [reply] = fake.bot_messages(world.channel)
    head, footer = reply["content"].rsplit("\n", 1)
    assert footer == "-# Tools: server\\_info"  # escaped Markdown: shown as server_info
    info = json.loads(head.removeprefix("Here: "))
    assert info["name"] == fake.guilds[world.guild]["name"] and info["members"] >= 1
    [returned] = events
    assert returned.error == "" and fake.token not in returned.result
    assert _offered("openai", wire.calls(OPENAI_CHAT)[0].body) == {
        "time",
        "knowledge_search",
        "dice",
        "server_info",
    }
