"""`libra tail`: live events as readable lines, from both streams (a core subscription)."""

from __future__ import annotations

import asyncio
from datetime import datetime

from libra.contracts import AnyEvent, EventDecodeError, ToolCalled, ToolReturned, decode_event
from libra.runtime.eventlog import connect_nats

__all__ = ["format_event", "normalise_filter", "tail"]

_SUMMARY_FIELDS = ("text", "message", "reason", "error", "state", "key", "enabled", "consumer")


def normalise_filter(subject_filter: str) -> str:
    """``llm.>`` or ``llm`` mean ``libra.llm.>``; a full subject stays as it is."""
    if subject_filter.startswith("libra.") or subject_filter == "libra.>":
        return subject_filter
    if "." not in subject_filter and subject_filter not in (">", "*"):
        return f"libra.{subject_filter}.>"
    return f"libra.{subject_filter}"


def summary(event: AnyEvent, width: int = 80) -> str:
    if isinstance(event, ToolCalled):
        return _short(f"{event.name}({event.arguments})", width)
    if isinstance(event, ToolReturned):
        failed = f"{event.error}: " if event.error else ""
        return _short(f"{event.name} → {failed}{event.result}", width)
    for name in _SUMMARY_FIELDS:
        value = getattr(event, name, None)
        if value is not None and value != "":
            return _short(str(value), width)
    return ""


def _short(text: str, width: int) -> str:
    text = text.replace("\n", "⏎ ")
    return text if len(text) <= width else text[: width - 1] + "…"


def format_event(event: AnyEvent, *, now: datetime | None = None) -> str:
    """One readable line: time, type, conversation, user, turn and a short payload."""
    at = (now or event.at).strftime("%H:%M:%S.%f")[:-3]
    tag = type(event).__struct_config__.tag
    who = event.user or "-"
    return (
        f"{at}  {tag:<20} {event.conversation:<28} {who:<27} {event.turn[-8:]:<8}  {summary(event)}"
    )


async def tail(url: str, subject_filter: str, *, limit: int = 0, raw: bool = False) -> None:
    """Prints events on ``subject_filter`` as they are published, until interrupted."""
    nc = await connect_nats(url, name="libra-tail")
    done = asyncio.Event()
    seen = 0

    async def on_msg(msg) -> None:
        nonlocal seen
        if raw:
            print(f"{msg.subject} {msg.data.decode('utf-8', 'replace')}", flush=True)
        else:
            try:
                print(format_event(decode_event(msg.data)), flush=True)
            except EventDecodeError as exc:
                print(f"{'?':<12}  {msg.subject}  undecodable: {exc}", flush=True)
        seen += 1
        if limit and seen >= limit:
            done.set()

    await nc.subscribe(normalise_filter(subject_filter), cb=on_msg)
    try:
        await done.wait()
    finally:
        await nc.drain()
