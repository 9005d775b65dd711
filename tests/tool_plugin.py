"""A tool plugin as a third party would ship one: a package with a ``libra.tools`` entry point,
written into a folder that a test puts on ``sys.path`` (or PYTHONPATH for a subprocess)."""

from __future__ import annotations

import textwrap
from pathlib import Path

PLUGIN = textwrap.dedent(
    '''
    """A test plugin: tools that behave well and badly."""

    import asyncio
    import os

    import msgspec

    from libra.tools import Tool, ToolError

    CALLS = []  # (tool, arguments) of every call, for tests in this process


    class Text(msgspec.Struct, frozen=True):
        text: str = ""


    class Count(msgspec.Struct, frozen=True):
        n: int


    async def _echo(arguments, context):
        CALLS.append(("echo", arguments.text))
        return {"echo": arguments.text, "user": context.user}


    async def _hang(arguments, context):
        CALLS.append(("hang", arguments.text))
        await asyncio.sleep(3600)


    async def _boom(arguments, context):
        CALLS.append(("boom", arguments.text))
        raise RuntimeError("exploded with " + os.environ.get("DEMO_TOKEN", ""))


    async def _refuse(arguments, context):
        raise ToolError("the shop is closed on " + arguments.text)


    async def _flood(arguments, context):
        return "x" * arguments.n


    async def _peek(arguments, context):
        CALLS.append(("peek", arguments.text))
        return ",".join(sorted(context.secrets)) or "no secrets"


    TOOLS = [
        Tool(name="echo", description="Echoes its text.", arguments=Text, run=_echo),
        Tool(name="hang", description="Never answers.", arguments=Text, run=_hang, timeout_s=0.3),
        Tool(name="boom", description="Raises.", arguments=Text, run=_boom),
        Tool(name="refuse", description="Refuses.", arguments=Text, run=_refuse),
        Tool(name="flood", description="Too much.", arguments=Count, run=_flood),
        Tool(
            name="peek",
            description="Says which secrets it was given.",
            arguments=Text,
            run=_peek,
            secrets=("DEMO_TOKEN",),
        ),
    ]
    '''
)


def write_plugin(folder: Path, *, broken: bool = False) -> Path:
    """Writes the plugin package and its distribution's metadata into ``folder``."""
    package = folder / "libra_tool_demo"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(PLUGIN)
    info = folder / "libra_tool_demo-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: libra-tool-demo\nVersion: 0.1\n")
    points = "[libra.tools]\ndemo = libra_tool_demo:TOOLS\n"
    if broken:
        points += "missing = libra_tool_demo:NOT_THERE\n"
    (info / "entry_points.txt").write_text(points)
    return folder
