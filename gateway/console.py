"""`libra chat`: talk with the running stack in a terminal, the reply streamed as it comes."""

from __future__ import annotations

import asyncio
import sys
from typing import TextIO

from libra.contracts import LlmDelta, LlmFailed, TurnRejected
from libra.runtime.eventlog import EventLog
from libra.runtime.follow import ReplyTimeout

from .chat import converse

__all__ = ["chat_loop"]


async def _read_line(prompt: str) -> str | None:
    try:
        return await asyncio.to_thread(input, prompt)
    except EOFError:
        return None


async def chat_loop(log: EventLog, *, user: str, out: TextIO = sys.stdout) -> None:
    """Reads lines until EOF or /quit; each is a turn whose reply is printed as it streams."""
    out.write(f"Talking to Libra as {user!r}. Ctrl-D or /quit to leave.\n")
    while (line := await _read_line("you> ")) is not None:
        if line.strip() in ("/quit", "/exit"):
            break
        if not line.strip():
            continue
        out.write("libra> ")
        again = ""  # written before a delta at index 0 that starts the reply over
        try:
            async for event in converse(log, platform="console", user=user, text=line):
                match event:
                    case LlmDelta(text=text, index=index):
                        if index == 0:  # a second time: the llm restarted mid-reply
                            out.write(again)
                            again = "\nlibra> "
                        out.write(text)
                    case TurnRejected(message=message) | LlmFailed(message=message):
                        out.write(f"[{message}]")
                out.flush()
        except ReplyTimeout as exc:
            out.write(f"[no reply: {exc}]")
        out.write("\n")
        out.flush()
