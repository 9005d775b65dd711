"""What a tool is: declared once (name, description, arguments, timeout, who may use it), and
offered to every provider in that provider's own function-calling format.

The arguments are a msgspec struct: its JSON Schema is what the model is shown, and the JSON the
model writes is decoded into it (a wrong type or a missing field is an error the model reads,
not an exception in Libra). A tool is an ``async`` function of its arguments and a
:class:`ToolContext`; what it returns (text, or anything msgspec encodes as JSON) is the result.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import msgspec

if TYPE_CHECKING:  # the providers' package imports every vendor's SDK: not for the gateway
    from libra.processors.llm.providers.base import ToolSpec

__all__ = ["Access", "Tool", "ToolContext", "ToolError"]

A = TypeVar("A", bound=msgspec.Struct)
# Who may have a tool: in any conversation, or only in a Discord server's (it reads the server).
Access = Literal["everyone", "servers"]
# The names every vendor accepts (OpenAI's rule is the strictest).
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


class ToolError(Exception):
    """A failure whose message is meant for the model and the person (``unknown time zone``);
    any other exception is reported by its class alone."""


@dataclass(frozen=True, kw_only=True)
class ToolContext:
    """What a call may know of its turn, and the services and secrets it was given.

    ``secrets`` holds only the settings the tool declared (``Tool.secrets``); ``services`` the
    process's shared clients by name (``knowledge``: the knowledge search, ``discord_rest_url``).
    """

    user: str
    conversation: str
    platform: str
    guild: str = ""
    channel: str = ""
    language: str = "en"
    scopes: tuple[str, ...] = ()  # the knowledge bases the turn may read
    secrets: Mapping[str, str] = field(default_factory=dict)
    services: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Tool(Generic[A]):
    """A tool the model may call.

    ``timeout_s`` bounds a call (``TOOLS_TIMEOUT_SEC`` bounds every tool's); ``access`` says
    where it may be offered; ``secrets`` names the settings (``DISCORD_TOKEN``) the tool is
    handed in its context: it never sees any other.
    """

    name: str
    description: str
    arguments: type[A]
    run: Callable[[A, ToolContext], Awaitable[Any]]
    timeout_s: float = 5.0
    access: Access = "everyone"
    secrets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"tool name {self.name!r}: use 1 to 64 of a-z, A-Z, 0-9, _ and -")
        if not self.description.strip():
            raise ValueError(f"tool {self.name}: a description tells the model when to call it")
        if not (isinstance(self.arguments, type) and issubclass(self.arguments, msgspec.Struct)):
            raise TypeError(f"tool {self.name}: arguments must be a msgspec.Struct class")
        if self.timeout_s <= 0:
            raise ValueError(f"tool {self.name}: the timeout must be positive")

    def spec(self) -> ToolSpec:
        """The tool as a model is offered it, its arguments' JSON Schema inlined."""
        from libra.processors.llm.providers.base import ToolSpec

        return ToolSpec(
            name=self.name, description=self.description, parameters=schema(self.arguments)
        )

    def decode(self, arguments: str) -> A:
        """Reads the model's arguments; raises ToolError saying what is wrong with them."""
        try:
            return msgspec.json.decode(arguments or "{}", type=self.arguments)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise ToolError(f"invalid arguments for {self.name}: {exc}") from None


def schema(struct: type[msgspec.Struct]) -> dict[str, Any]:
    """The JSON Schema of ``struct`` as an object schema, not msgspec's ``$ref`` to it: vendors
    want ``{"type": "object", ...}`` at the top."""
    full = msgspec.json.schema(struct)
    defs = dict(full.get("$defs", {}))
    name = full.get("$ref", "").rsplit("/", 1)[-1]
    top = dict(defs.pop(name, full))
    top.pop("title", None)
    top.setdefault("properties", {})
    if defs:
        top["$defs"] = defs
    return top
