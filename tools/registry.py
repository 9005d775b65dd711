"""The installed tools (entry point group ``libra.tools``) and which are enabled where.

``TOOLS_ENABLED`` names the tools offered by default (``none``: no tools); a Discord server's
admins choose their own with ``/tools`` (the ``tools`` setting of ``guild:<id>``, the same
syntax). A plugin that fails to load is reported (``libra tools``, the log) and left out: one
broken package must not keep Libra from answering.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points

from .base import Tool

__all__ = [
    "GROUP",
    "TOOLS_KEY",
    "Installed",
    "enabled_names",
    "installed",
    "parse_names",
    "unknown",
]

GROUP = "libra.tools"
TOOLS_KEY = "tools"  # a server's choice: the setting of ``guild:<id>`` that /tools writes
log = logging.getLogger("libra.tools")


@dataclass(frozen=True)
class Installed:
    """The tools found, by name, where each came from, and the plugins that failed to load."""

    tools: Mapping[str, Tool] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict)  # tool name -> distribution
    problems: tuple[str, ...] = ()


def installed() -> Installed:
    """Loads every tool the ``libra.tools`` entry points name (a Tool or an iterable of them)."""
    tools: dict[str, Tool] = {}
    sources: dict[str, str] = {}
    problems: list[str] = []
    for point in sorted(entry_points(group=GROUP), key=lambda p: p.name):
        source = point.dist.name if point.dist is not None else point.value
        try:
            loaded = point.load()
            found = [loaded] if isinstance(loaded, Tool) else list(loaded)
            if not all(isinstance(tool, Tool) for tool in found):
                raise TypeError("it names something that is not a libra.tools.Tool")
        except Exception as exc:
            problems.append(f"{point.name} ({source}): {type(exc).__name__}: {exc}")
            log.error("tool plugin %s (%s) not loaded: %s", point.name, source, exc)
            continue
        for tool in found:
            if tool.name in tools:
                problems.append(
                    f"{tool.name} ({source}): the name is taken by {sources[tool.name]}"
                )
                continue
            tools[tool.name] = tool
            sources[tool.name] = source
    return Installed(tools, sources, tuple(problems))


def parse_names(value: str) -> tuple[str, ...] | None:
    """Reads a list of tool names (``time,dice``); ``none`` is the empty list, blank is None
    (not chosen: the default applies)."""
    if not value.strip():
        return None
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    return () if names == ("none",) else names


def enabled_names(default: str, chosen: str = "") -> tuple[str, ...]:
    """The tools enabled: a server's choice when it made one, else ``TOOLS_ENABLED``."""
    for value in (chosen, default):
        names = parse_names(value)
        if names is not None:
            return names
    return ()


def unknown(names: Iterable[str], tools: Mapping[str, Tool]) -> list[str]:
    """The names among ``names`` that no installed tool has."""
    return [name for name in names if name not in tools]
