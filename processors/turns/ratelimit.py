"""The per-user rate limit: a sliding window in Redis, decided atomically by one Lua script.

Each admitted turn is a member of the user's sorted set, scored by the time it was received.
Deciding and recording happen in one script, so any number of turns instances agree; a turn id
already in the set is admitted again (a redelivered input gets the same answer). Times come
from the events, not the clock, so replaying ``turn.accepted`` rebuilds the same sets; turns
handled out of order still count each other (later ones are in the window too).
"""

from __future__ import annotations

from typing import NamedTuple

import redis.asyncio as aioredis

__all__ = ["Decision", "RateLimiter", "key_for"]

# KEYS[1] the user's set; ARGV: turn id, time (ms), window (ms), limit
_ADMIT = """
local key, member = KEYS[1], ARGV[1]
local now, window, limit = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('ZSCORE', key, member) then
  return {1, 0}
end
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window * 10)
local recent = redis.call('ZRANGEBYSCORE', key, '(' .. (now - window), '+inf',
                          'WITHSCORES', 'LIMIT', 0, limit)
if #recent / 2 < limit then
  redis.call('ZADD', key, now, member)
  redis.call('PEXPIRE', key, window * 10)
  return {1, 0}
end
return {0, tonumber(recent[2]) + window - now}
"""

# KEYS[1] the user's set; ARGV: turn id, time (ms), window (ms)
_RECORD = """
redis.call('ZADD', KEYS[1], tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 10)
return 1
"""


class Decision(NamedTuple):
    admitted: bool
    retry_after_s: float


def key_for(user: str) -> str:
    return f"libra:ratelimit:{user}"


class RateLimiter:
    """At most ``limit`` turns per user in any ``window_s`` seconds."""

    def __init__(self, redis: aioredis.Redis, *, limit: int, window_s: float) -> None:
        self.redis = redis
        self.limit, self.window_ms = limit, int(window_s * 1000)
        self._admit = redis.register_script(_ADMIT)
        self._record = redis.register_script(_RECORD)

    async def admit(self, user: str, turn: str, at_ms: int) -> Decision:
        """Admits the turn if the user has room; says how long to wait if not."""
        admitted, wait_ms = await self._admit(
            keys=[key_for(user)], args=[turn, at_ms, self.window_ms, self.limit]
        )
        return Decision(bool(admitted), max(0, int(wait_ms)) / 1000)

    async def record(self, user: str, turn: str, at_ms: int) -> None:
        """Records an admitted turn without deciding (rebuilding the view from the log)."""
        await self._record(keys=[key_for(user)], args=[turn, at_ms, self.window_ms])
