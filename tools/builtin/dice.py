"""``dice``: rolls dice, fairly (the system's random source, not a seeded one)."""

from __future__ import annotations

import random
from typing import Annotated

import msgspec

from libra.tools.base import Tool, ToolContext

__all__ = ["dice_tool"]

_random = random.SystemRandom()


class DiceArguments(msgspec.Struct, frozen=True, kw_only=True):
    count: Annotated[int, msgspec.Meta(ge=1, le=100, description="How many dice")] = 1
    sides: Annotated[int, msgspec.Meta(ge=2, le=1000, description="Sides of each die")] = 6


async def _roll(arguments: DiceArguments, _context: ToolContext) -> str:
    rolls = [_random.randint(1, arguments.sides) for _ in range(arguments.count)]
    shown = ", ".join(map(str, rolls))
    return f"rolled {arguments.count}d{arguments.sides}: {shown} (total {sum(rolls)})"


dice_tool = Tool(
    name="dice",
    description="Rolls dice: count dice of the given number of sides; returns each roll and the"
    " total. Use it whenever the person asks for a roll or a random number.",
    arguments=DiceArguments,
    run=_roll,
    timeout_s=1.0,
)
