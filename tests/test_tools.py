"""Tools: declared once, found through the ``libra.tools`` entry points (a real plugin package
on the path), listed by ``libra tools``, and run so that every call ends in a result the model
and the person can read: a failing, hanging, flooding or misused tool is cut off, and a tool is
handed only the secrets it declared."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import msgspec
import pytest
from prometheus_client import REGISTRY

from libra.contracts import Origin, TurnAccepted, make
from libra.processors.llm.providers.base import ToolCall
from libra.processors.llm.tooling import ToolBox
from libra.tools import Tool, ToolContext
from libra.tools.registry import enabled_names, installed
from libra.tools.runner import ToolRunner

from .tool_plugin import write_plugin

BASE = ToolContext(user="http:ann", conversation="http-ann", platform="http")
SECRET = "demo-secret-value-0123456789"


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    folder = write_plugin(tmp_path / "site")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("DEMO_TOKEN", SECRET)
    yield folder
    sys.modules.pop("libra_tool_demo", None)


def _call(name: str, arguments: object = None) -> ToolCall:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments or {})
    return ToolCall(id=f"call_{name}", name=name, arguments=text)


def _turn(platform: str = "http", guild: str = "") -> TurnAccepted:
    return make(
        TurnAccepted,
        conversation=f"{platform}-ann",
        user=f"{platform}:ann",
        text="hello",
        origin=Origin(platform=platform, guild=guild, channel="5" if guild else ""),
    )


def test_a_plugin_is_found_through_its_entry_point_beside_the_built_in_tools(plugin) -> None:
    found = installed()
    assert {"time", "dice", "knowledge_search", "server_info"} <= set(found.tools)
    assert {"echo", "hang", "boom", "refuse", "flood", "peek"} <= set(found.tools)
    assert found.sources["echo"] == "libra-tool-demo"
    assert found.sources["dice"] == "libra-bot"
    assert found.problems == ()


def test_libra_tools_lists_what_is_installed_and_enabled_and_what_failed(tmp_path) -> None:
    folder = write_plugin(tmp_path / "site", broken=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(folder),
        "TOOLS_ENABLED": "dice,echo,weather",
        "LIBRA_DATA_DIR": str(tmp_path / "data"),
    }
    libra = [sys.executable, "-m", "libra.ops"]
    done = subprocess.run(
        [*libra, "tools", "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    report = json.loads(done.stdout)
    rows = {row["name"]: row for row in report["tools"]}
    assert rows["echo"]["enabled"] and rows["echo"]["source"] == "libra-tool-demo"
    assert rows["dice"]["enabled"] and not rows["time"]["enabled"]
    assert rows["server_info"]["access"] == "servers"
    assert rows["server_info"]["secrets"] == ["DISCORD_TOKEN"]
    assert report["missing"] == ["weather"]
    assert any(p.startswith("missing (libra-tool-demo)") for p in report["problems"])

    shown = subprocess.run([*libra, "tools"], env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 1  # a plugin that did not load is an operator's problem
    assert re.search(r"^echo +enabled +libra-tool-demo", shown.stdout, re.M)
    assert "TOOLS_ENABLED names 'weather', which is not installed" in shown.stderr
    assert "not loaded: missing (libra-tool-demo)" in shown.stderr


async def test_a_tool_that_hangs_fails_or_floods_is_cut_off_with_a_readable_result(
    plugin,
) -> None:
    runner = ToolRunner(installed().tools, max_chars=1000, timeout_s=5.0)
    timeouts = {"tool": "hang", "outcome": "timeout"}
    before = REGISTRY.get_sample_value("libra_tool_calls_total", timeouts) or 0

    hung = await runner.run(_call("hang", {"text": "x"}), BASE)
    assert hung.error == "timeout" and "did not answer within 0.3 s" in hung.result
    assert hung.latency_ms < 3000
    assert REGISTRY.get_sample_value("libra_tool_calls_total", timeouts) == before + 1

    boom = await runner.run(_call("boom", {"text": "x"}), BASE)
    assert boom.error == "failed" and "boom failed (RuntimeError)" in boom.result
    assert SECRET not in boom.result  # an exception's text stays out of what the model reads

    refused = await runner.run(_call("refuse", {"text": "Sundays"}), BASE)
    assert refused.error == "failed"
    assert refused.result == "[error: refuse failed: the shop is closed on Sundays]"

    flood = await runner.run(_call("flood", {"n": 100_000}), BASE)
    assert flood.error == "too_large" and flood.chars == 100_000
    assert flood.result.startswith("x" * 1000 + "\n[cut off: flood returned 100,000 characters")
    assert len(flood.result) < 1200

    fine = await runner.run(_call("echo", {"text": "hi"}), BASE)
    assert fine.error == "" and json.loads(fine.result) == {"echo": "hi", "user": "http:ann"}


async def test_arguments_the_model_got_wrong_and_unknown_tools_are_explained(plugin) -> None:
    runner = ToolRunner(installed().tools)
    garbage = await runner.run(_call("echo", "{not json"), BASE)
    assert garbage.error == "bad_arguments" and "invalid arguments for echo" in garbage.result
    wrong = await runner.run(_call("flood", {"n": "many"}), BASE)
    assert wrong.error == "bad_arguments" and "Expected `int`" in wrong.result
    missing = await runner.run(_call("flood", {}), BASE)
    assert missing.error == "bad_arguments" and "`n`" in missing.result
    loaded = await runner.run(_call("dice", {"sides": 1}), BASE)
    assert loaded.error == "bad_arguments" and ">= 2" in loaded.result
    huge = await runner.run(_call("echo", {"text": "y" * 100_000}), BASE)
    assert huge.error == "bad_arguments" and "100,012 characters long" in huge.result
    assert ("echo", "y" * 100_000) not in sys.modules["libra_tool_demo"].CALLS  # never run
    unknown = await runner.run(_call("weather", {}), BASE, {"dice": runner.tools["dice"]})
    assert unknown.error == "unknown"
    assert unknown.result == "[error: there is no tool named 'weather' here (tools: dice)]"


async def test_a_tool_is_handed_only_the_secrets_it_declared(plugin) -> None:
    tools = installed().tools
    secrets = {"DEMO_TOKEN": SECRET, "DISCORD_TOKEN": "discord-token-value"}
    runner = ToolRunner(tools, secrets=secrets)
    assert (await runner.run(_call("peek", {}), BASE)).result == "DEMO_TOKEN"
    assert runner.context(tools["echo"], BASE).secrets == {}
    assert runner.context(tools["dice"], BASE).secrets == {}
    assert runner.context(tools["server_info"], BASE).secrets == {
        "DISCORD_TOKEN": "discord-token-value"
    }


async def test_the_built_in_time_and_dice() -> None:
    runner = ToolRunner(installed().tools)
    seoul = await runner.run(_call("time", {"zone": "Asia/Seoul"}), BASE)
    assert seoul.error == "" and "in Asia/Seoul (KST, UTC+09:00)" in seoul.result
    nowhere = await runner.run(_call("time", {"zone": "Mars/Olympus"}), BASE)
    assert nowhere.error == "failed" and "unknown time zone 'Mars/Olympus'" in nowhere.result
    rolled = await runner.run(_call("dice", {"count": 3, "sides": 6}), BASE)
    found = re.fullmatch(r"rolled 3d6: (\d), (\d), (\d) \(total (\d+)\)", rolled.result)
    assert found is not None
    rolls = [int(found.group(i)) for i in (1, 2, 3)]
    assert all(1 <= r <= 6 for r in rolls) and sum(rolls) == int(found.group(4))


def test_a_tool_is_declared_once_and_checked_when_declared() -> None:
    class Nothing(msgspec.Struct):
        pass

    async def run(_arguments: Nothing, _context: ToolContext) -> str:
        return ""

    with pytest.raises(ValueError, match="tool name 'has space'"):
        Tool(name="has space", description="x", arguments=Nothing, run=run)
    with pytest.raises(ValueError, match="a description"):
        Tool(name="quiet", description=" ", arguments=Nothing, run=run)
    with pytest.raises(TypeError, match=r"msgspec\.Struct"):
        Tool(name="typed", description="x", arguments=dict, run=run)  # type: ignore[arg-type]
    spec = installed().tools["time"].spec()
    assert spec.parameters["type"] == "object" and "zone" in spec.parameters["properties"]
    assert "$ref" not in json.dumps(spec.parameters)


def test_which_tools_a_turn_is_offered() -> None:
    box = ToolBox(installed().tools, default="time,dice,server_info,weather")
    assert list(box.offered(_turn())) == ["time", "dice"]  # server_info: not in a server
    in_server = _turn("discord", guild="9")
    assert list(box.offered(in_server)) == ["time", "dice", "server_info"]
    assert list(box.offered(in_server, "dice")) == ["dice"]  # the server's /tools choice
    assert box.offered(in_server, "none") == {}
    assert enabled_names("none") == () and enabled_names("", "") == ()
    assert ToolBox(installed().tools, default="dice", max_calls=0).offered(_turn()) == {}
