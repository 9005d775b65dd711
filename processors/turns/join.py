"""Where the parts of a speculative voice turn meet: transcript, ``voice.ended``, ``voice.resumed``.

Whichever part comes, in whatever order, one Lua script in Redis decides the turn's course once,
for every instance of the turns processor. While Redis is down the parts meet in this process
instead, by the same rules (:func:`decide`): right when one instance gets all of a turn's
parts, as with one instance or parts that come together; a turn whose transcript reached Redis
before it went down and whose end comes during the outage is not answered.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import redis.asyncio as aioredis

from libra.runtime.outage import Breaker, Unavailable

__all__ = ["Join", "Met", "decide"]

# KEYS[1] the turn's join hash; ARGV: field (transcript|ended|resumed), value, ttl (s) and, for
# a transcript, whether it may be answered before the end of the turn (1|0). Returns what to do
# with the transcript (start, admit, confirm, abandon) and the transcript, or nothing.
_JOIN = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
local transcript, ended, resumed, started = unpack(
  redis.call('HMGET', KEYS[1], 'transcript', 'ended', 'resumed', 'started'))
if ARGV[1] == 'transcript' then
  if started then return {'start', transcript} end
  if ended then return {'admit', transcript} end
  if not resumed and ARGV[4] == '1' then
    redis.call('HSET', KEYS[1], 'started', '1')
    return {'start', transcript}
  end
elseif ARGV[1] == 'ended' and transcript then
  if started then return {'confirm', transcript} end
  return {'admit', transcript}
elseif ARGV[1] == 'resumed' and started then
  return {'abandon', transcript}
end
return false
"""
_TTL_S = 300


class Met(NamedTuple):
    """What the parts so far decide (start, admit, confirm, abandon) and the transcript."""

    action: str
    transcript: bytes
    degraded: tuple[str, ...] = ()


def decide(parts: dict[str, bytes], field: str, value: bytes, early: bool) -> Met | None:
    """The Lua script's rules on a dict of the turn's parts (which it updates)."""
    parts[field] = value
    transcript, ended = parts.get("transcript"), parts.get("ended")
    started = "started" in parts
    if field == "transcript":
        if started:
            return Met("start", value)
        if ended:
            return Met("admit", value)
        if "resumed" not in parts and early:
            parts["started"] = b"1"
            return Met("start", value)
    elif field == "ended" and transcript:
        return Met("confirm" if started else "admit", transcript)
    elif field == "resumed" and started and transcript:
        return Met("abandon", transcript)
    return None


class Join:
    """The parts of each turn, in Redis, or in this process while Redis is down."""

    def __init__(self, redis: aioredis.Redis, breaker: Breaker) -> None:
        self.breaker = breaker
        self._script = redis.register_script(_JOIN)
        self._local: dict[str, tuple[float, dict[str, bytes]]] = {}  # turn -> (since, parts)

    async def meet(self, turn: str, field: str, value: bytes, early: bool) -> Met | None:
        """Notes one part of ``turn``; returns what the parts so far decide, if anything."""
        try:
            decided = await self.breaker.call(
                lambda: self._script(
                    keys=[f"libra:turn-join:{turn}"], args=[field, value, _TTL_S, int(early)]
                )
            )
        except Unavailable:
            return self._meet_here(turn, field, value, early)
        return Met(decided[0].decode(), decided[1]) if decided else None

    def _meet_here(self, turn: str, field: str, value: bytes, early: bool) -> Met | None:
        now = time.monotonic()
        while self._local:  # oldest first: drop the turns past the TTL, as Redis expires them
            oldest = next(iter(self._local))
            if self._local[oldest][0] > now - _TTL_S:
                break
            del self._local[oldest]
        _, parts = self._local.setdefault(turn, (now, {}))
        met = decide(parts, field, value, early)
        return met._replace(degraded=("redis",)) if met else None
