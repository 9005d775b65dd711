"""The per-user rate limit: a sliding window in Redis, decided atomically by one Lua script.

Each admitted turn is a member of the user's sorted set, scored by the time it was received.
Deciding and recording happen in one script, so any number of turns instances agree; a turn id
already in the set is admitted again (a redelivered input gets the same answer). Times come
from the events, not the clock, so replaying ``turn.accepted`` rebuilds the same sets; turns
handled out of order still count each other (later ones are in the window too).

While Redis is down, :class:`LocalRateLimiter` decides with the same window, counted in the
admitting process (see ``admission``). The llm's prefetch keeps one too, counting every message
it hears, to skip reading a prompt's context for a person admission is about to refuse.
"""

from __future__ import annotations

from typing import NamedTuple

import redis.asyncio as aioredis

__all__ = ["Decision", "LocalRateLimiter", "RateLimiter", "key_for"]

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


class LocalRateLimiter:
    """The same window counted in this process: the stand-in while Redis is down.

    It notes every turn this process admits, through Redis too, so that an outage starts from
    the person's recent turns rather than from none; turns that other instances admitted are
    not counted, so with several instances a person may get more than ``limit`` in a window.
    """

    def __init__(self, *, limit: int, window_s: float, max_users: int = 10_000) -> None:
        self.limit, self.window_ms = limit, int(window_s * 1000)
        self.max_users = max_users
        self._turns: dict[str, dict[str, int]] = {}  # user -> turn -> time (ms)

    def admit(self, user: str, turn: str, at_ms: int) -> Decision:
        """Admits the turn if the user has room here; says how long to wait if not."""
        turns = self._turns.get(user, {})
        if turn in turns:
            return Decision(True, 0)
        recent = sorted(t for t in turns.values() if t > at_ms - self.window_ms)
        if len(recent) >= self.limit:
            return Decision(False, max(0, recent[0] + self.window_ms - at_ms) / 1000)
        self.note(user, turn, at_ms)
        return Decision(True, 0)

    def note(self, user: str, turn: str, at_ms: int) -> None:
        """Counts a turn admitted elsewhere (by Redis) in the user's window here."""
        turns = self._turns.setdefault(user, {})
        turns[turn] = at_ms
        for old in [t for t, ms in turns.items() if ms <= at_ms - self.window_ms * 10]:
            del turns[old]  # long out of every window, as the Lua script drops them
        if len(self._turns) > self.max_users:
            self._forget_idle(at_ms)

    def _forget_idle(self, now_ms: int) -> None:
        """Drops the people with no turn in the window (the oldest first, if all have one)."""
        idle = [u for u, t in self._turns.items() if max(t.values()) <= now_ms - self.window_ms]
        for user in idle or list(self._turns)[: len(self._turns) // 2]:
            del self._turns[user]
