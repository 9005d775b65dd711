"""``time``: the date and time now in a time zone."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from libra.tools.base import Tool, ToolContext, ToolError

__all__ = ["time_tool"]


class TimeArguments(msgspec.Struct, frozen=True, kw_only=True):
    zone: Annotated[
        str,
        msgspec.Meta(
            max_length=64,
            description="An IANA time zone such as Asia/Seoul, Europe/Paris or UTC",
        ),
    ] = "UTC"


async def _now(arguments: TimeArguments, _context: ToolContext) -> str:
    try:
        zone = ZoneInfo(arguments.zone.strip() or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        raise ToolError(
            f"unknown time zone {arguments.zone!r}: use an IANA name such as Asia/Seoul"
        ) from None
    now = datetime.now(UTC).astimezone(zone)
    offset = now.strftime("%z")
    return (
        f"{now:%A %Y-%m-%d %H:%M:%S} in {zone.key} ({now.tzname()}, UTC{offset[:3]}:{offset[3:]})"
    )


time_tool = Tool(
    name="time",
    description="The current date, weekday and time in a time zone.",
    arguments=TimeArguments,
    run=_now,
    timeout_s=1.0,
)
