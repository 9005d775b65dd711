"""/tools: which tools Libra may call in a server, chosen by its admins (Manage Server).

The choice is the ``tools`` setting of ``guild:<id>`` (a ``session.settings`` event), read by the
llm processor: a comma-separated list of tool names, ``none`` for no tools, empty for the
operator's default (``TOOLS_ENABLED``). /tools list shows every installed tool and whether it is
on here; enable and disable publish the new list; default clears the choice. Answers are
ephemeral.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import hikari
import lightbulb

from libra.contracts import SessionSettings
from libra.tools import Tool
from libra.tools.registry import TOOLS_KEY, enabled_names, parse_names, unknown

from .commands import SlashCommands
from .split import MESSAGE_LIMIT
from .strings import say

__all__ = ["TOOL_COMMANDS", "ToolCommands", "register_tool_commands"]

INJECTED = lightbulb.di.INJECTED
_DESCRIPTION_CHARS = 120


class ToolCommands:
    """What /tools does: show the tools, and publish a server's choice of them."""

    def __init__(self, slash: SlashCommands, tools: Mapping[str, Tool], *, default: str) -> None:
        self.slash = slash  # its checks (may talk here, a server, an admin) are the same
        self.tools = tools  # the installed tools, by name
        self.default = default  # TOOLS_ENABLED

    def enabled(self, scope: str) -> tuple[tuple[str, ...], bool]:
        """The tools on in a server, and whether the server chose them (else the default)."""
        chosen = self.slash.view.setting(scope, TOOLS_KEY)
        return enabled_names(self.default, chosen), parse_names(chosen) is not None

    async def listed(self, ctx: lightbulb.Context) -> None:
        if (scope := await self.slash.server_scope(ctx, admin=True)) is None:
            return
        locale = str(ctx.interaction.locale)
        if not self.tools:
            await ctx.respond(say("tools.none_installed", locale), ephemeral=True)
            return
        enabled, chosen = self.enabled(scope)
        lines = [self._line(tool, tool.name in enabled, locale) for tool in self.tools.values()]
        if missing := unknown(enabled, self.tools):
            lines.append(say("tools.missing", locale, names=_names(missing, locale)))
        source = say("tools.chosen" if chosen else "tools.default_source", locale)
        text = say("tools.listed", locale, source=source, lines="\n".join(lines))
        if len(text) > MESSAGE_LIMIT:  # many plugins: as many whole lines as fit
            text = text[: MESSAGE_LIMIT - 1].rsplit("\n", 1)[0] + "\n…"
        await ctx.respond(text, ephemeral=True)

    async def enable(self, ctx: lightbulb.Context, *, name: str) -> None:
        await self._switch(ctx, name.strip(), on=True)

    async def disable(self, ctx: lightbulb.Context, *, name: str) -> None:
        await self._switch(ctx, name.strip(), on=False)

    async def reset(self, ctx: lightbulb.Context) -> None:
        """Clears the server's choice: the default applies again."""
        if (scope := await self.slash.server_scope(ctx, admin=True)) is None:
            return
        await self.slash.publish(ctx, SessionSettings, scope=scope, key=TOOLS_KEY, value="")
        locale = str(ctx.interaction.locale)
        enabled = _names(self.enabled(scope)[0], locale)
        await ctx.respond(say("tools.reset", locale, enabled=enabled), ephemeral=True)

    async def suggest(self, ctx: lightbulb.AutocompleteContext[str], *, on: bool) -> None:
        """The installed tools that enabling (``on``) or disabling would change, as typed."""
        typed = str(ctx.focused.value or "").strip().lower()
        guild = ctx.interaction.guild_id
        enabled = self.enabled(f"guild:{guild}")[0] if guild else ()
        names = [n for n in self.tools if (n in enabled) != on and typed in n.lower()]
        await ctx.respond(names[:25])

    async def _switch(self, ctx: lightbulb.Context, name: str, *, on: bool) -> None:
        if (scope := await self.slash.server_scope(ctx, admin=True)) is None:
            return
        locale = str(ctx.interaction.locale)
        enabled, _ = self.enabled(scope)
        if name not in self.tools and not (name in enabled and not on):
            known = _names(list(self.tools), locale)
            shown = name.replace("`", "")[:64]
            await ctx.respond(say("tools.unknown", locale, name=shown, known=known), ephemeral=True)
            return
        if (name in enabled) == on:
            key = "tools.already_on" if on else "tools.already_off"
            text = say(key, locale, name=name, enabled=_names(enabled, locale))
            await ctx.respond(text, ephemeral=True)
            return
        if on:  # in the order they are installed in; names no longer installed stay at the end
            chosen = [n for n in self.tools if n in enabled or n == name]
            chosen += unknown(enabled, self.tools)
        else:
            chosen = [n for n in enabled if n != name]
        value = ",".join(chosen) or "none"
        await self.slash.publish(ctx, SessionSettings, scope=scope, key=TOOLS_KEY, value=value)
        key = "tools.enabled" if on else "tools.disabled"
        text = say(key, locale, name=name, enabled=_names(chosen, locale))
        await ctx.respond(text, ephemeral=True)

    @staticmethod
    def _line(tool: Tool, on: bool, locale: str) -> str:
        description = " ".join(tool.description.split())
        if len(description) > _DESCRIPTION_CHARS:
            description = description[: _DESCRIPTION_CHARS - 1].rstrip() + "…"
        state = say("tools.on" if on else "tools.off", locale)
        line = f"{'✅' if on else '⬜'} `{tool.name}` · {state} — {description}"
        if tool.access == "servers":
            line += f" ({say('tools.servers_only', locale)})"
        return line


def _names(names: Sequence[str], locale: str) -> str:
    return ", ".join(f"`{n}`" for n in names) or say("tools.none", locale)


# --- the commands as Discord sees them ------------------------------------------------------

tools = lightbulb.Group(
    "tools", "tools.desc", localize=True, default_member_permissions=hikari.Permissions.MANAGE_GUILD
)


@tools.register
class ToolsList(
    lightbulb.SlashCommand, name="tools.list", description="tools.list.desc", localize=True
):
    @lightbulb.invoke
    async def invoke(self, ctx: lightbulb.Context, run: ToolCommands = INJECTED) -> None:
        await run.listed(ctx)


async def _to_enable(ctx: lightbulb.AutocompleteContext[str], run: ToolCommands = INJECTED) -> None:
    await run.suggest(ctx, on=True)


async def _to_disable(
    ctx: lightbulb.AutocompleteContext[str], run: ToolCommands = INJECTED
) -> None:
    await run.suggest(ctx, on=False)


@tools.register
class ToolsEnable(
    lightbulb.SlashCommand, name="tools.enable", description="tools.enable.desc", localize=True
):
    name_ = lightbulb.string(
        "tools.name", "tools.name.desc", max_length=64, autocomplete=_to_enable, localize=True
    )

    @lightbulb.invoke
    async def invoke(self, ctx: lightbulb.Context, run: ToolCommands = INJECTED) -> None:
        await run.enable(ctx, name=self.name_)


@tools.register
class ToolsDisable(
    lightbulb.SlashCommand, name="tools.disable", description="tools.disable.desc", localize=True
):
    name_ = lightbulb.string(
        "tools.name", "tools.name.desc", max_length=64, autocomplete=_to_disable, localize=True
    )

    @lightbulb.invoke
    async def invoke(self, ctx: lightbulb.Context, run: ToolCommands = INJECTED) -> None:
        await run.disable(ctx, name=self.name_)


@tools.register
class ToolsDefault(
    lightbulb.SlashCommand, name="tools.default", description="tools.default.desc", localize=True
):
    @lightbulb.invoke
    async def invoke(self, ctx: lightbulb.Context, run: ToolCommands = INJECTED) -> None:
        await run.reset(ctx)


TOOL_COMMANDS = (tools,)


def register_tool_commands(client: lightbulb.Client, commands: ToolCommands) -> None:
    """Registers /tools on a lightbulb client, with ``commands`` doing its work."""
    client.di.registry_for(lightbulb.di.Contexts.DEFAULT).register_value(ToolCommands, commands)
    for command in TOOL_COMMANDS:
        client.register(command)
