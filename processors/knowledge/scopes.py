"""Knowledge scopes: whose documents a turn may read.

A scope is ``global`` (every conversation), ``guild:<id>`` (a Discord server's) or
``user:<platform:id>`` (one person's). A turn reads the global documents, its person's and, from
a Discord server, that server's.
"""

from __future__ import annotations

from libra.contracts import PLATFORMS, TurnAccepted, conversation_id, platform_of

__all__ = ["GLOBAL", "ScopeError", "parse_scope", "scope_conversation", "turn_scopes"]

GLOBAL = "global"


class ScopeError(ValueError):
    """A scope that is not ``global``, ``guild:<id>`` or ``user:<platform:id>``."""


def parse_scope(value: str) -> str:
    """Returns ``value`` as a scope, or raises :class:`ScopeError` saying what is wrong."""
    kind, _, rest = value.partition(":")
    if value == GLOBAL:
        return value
    if kind == "guild" and rest.isdigit():
        return value
    if kind == "user" and platform_of(rest) in PLATFORMS and rest.split(":", 1)[1]:
        return value
    raise ScopeError(
        f"{value!r} is not a knowledge scope: use global, guild:<server id> or"
        f" user:<platform>:<id> (platforms: {', '.join(sorted(PLATFORMS))})"
    )


def scope_conversation(scope: str) -> str:
    """The conversation token of a scope's knowledge events: ``global``, ``guild-1``, ..."""
    kind, _, rest = scope.partition(":")
    return GLOBAL if scope == GLOBAL else conversation_id(kind, rest)


def turn_scopes(turn: TurnAccepted) -> list[str]:
    """The scopes a turn reads from: global, its person's and its Discord server's."""
    scopes = [GLOBAL]
    if turn.user:
        scopes.append(f"user:{turn.user}")
    if turn.origin.platform == "discord" and turn.origin.guild:
        scopes.append(f"guild:{turn.origin.guild}")
    return scopes
