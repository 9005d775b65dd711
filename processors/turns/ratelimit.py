"""The per-user rate limit: a sliding window in Redis, decided atomically by one Lua script.

Each admitted turn is a member of the user's sorted set, scored by the time it was received.
Deciding and recording happen in one script, so any number of turns instances agree; a turn id
already in the set is admitted again (a redelivered input gets the same answer). Times come
from the events, not the clock, so replaying ``turn.accepted`` rebuilds the same sets; turns
handled out of order still count each other (later ones are in the window too).

:class:`LocalRateLimiter` counts the same window in the admitting process, from the decisions it
hears (``heard``). A person far below the limit is admitted from it, without a call to Redis on
the turn's clock; nearer the limit the script decides, told the turns this process counted that
Redis may not hold yet. While Redis is down it decides alone (see ``admission``). The llm's
prefetch keeps one too, counting every message it hears, to skip reading a prompt's context for
a person admission is about to refuse.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import redis.asyncio as aioredis

__all__ = ["Decision", "LocalRateLimiter", "RateLimiter", "key_for"]

# KEYS[1] the user's set; ARGV: turn id, time (ms), window (ms), limit, then pairs of turn id
# and time (ms) that the caller counted and Redis may not hold yet (written first)
_ADMIT = """
local key, member = KEYS[1], ARGV[1]
local now, window, limit = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('ZSCORE', key, member) then
  return {1, 0}
end
for i = 5, #ARGV, 2 do
  redis.call('ZADD', key, tonumber(ARGV[i + 1]), ARGV[i])
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

    async def admit(
        self, user: str, turn: str, at_ms: int, known: Iterable[tuple[str, int]] = ()
    ) -> Decision:
        """Admits the turn if the user has room; says how long to wait if not. ``known``: the
        user's turns (id, time in ms) counted elsewhere that Redis may not hold yet."""
        args: list[str | int] = [turn, at_ms, self.window_ms, self.limit]
        for pair in known:
            args.extend(pair)
        admitted, wait_ms = await self._admit(keys=[key_for(user)], args=args)
        return Decision(bool(admitted), max(0, int(wait_ms)) / 1000)

    async def record(self, user: str, turn: str, at_ms: int) -> None:
        """Records an admitted turn without deciding (rebuilding the view from the log)."""
        await self._record(keys=[key_for(user)], args=[turn, at_ms, self.window_ms])


class LocalRateLimiter:
    """The same window counted in this process.

    It notes every turn this process admits, through Redis too, and (with ``heard``) every turn
    any instance admits, as the log tells it. Without the latter, turns that other instances
    admitted are not counted, so with several instances a person may get more than ``limit`` in
    a window while Redis is down.
    """

    def __init__(self, *, limit: int, window_s: float, max_users: int = 10_000) -> None:
        self.limit, self.window_ms = limit, int(window_s * 1000)
        self.max_users = max_users
        self._turns: dict[str, dict[str, int]] = {}  # user -> turn -> time (ms)
        # when people with turns in the window were last dropped (for room): their count is
        # short until a window has passed
        self.forgot_ms = 0

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

    def recent(self, user: str, at_ms: int) -> list[tuple[str, int]]:
        """The user's turns counted here that are in the window ending at ``at_ms``."""
        turns = self._turns.get(user)
        if not turns:
            return []
        since = at_ms - self.window_ms
        return [(turn, ms) for turn, ms in turns.items() if ms > since]

    def complete(self, at_ms: int) -> bool:
        """Whether nobody's turns in the window ending at ``at_ms`` were dropped for room."""
        return self.forgot_ms <= at_ms - self.window_ms

    def note(self, user: str, turn: str, at_ms: int) -> None:
        """Counts a turn admitted elsewhere (by Redis) in the user's window here."""
        turns = self._turns.setdefault(user, {})
        if turns.get(turn) == at_ms:
            return  # counted already (its own decision, heard back from the log)
        turns[turn] = at_ms
        for old in [t for t, ms in turns.items() if ms <= at_ms - self.window_ms * 10]:
            del turns[old]  # long out of every window, as the Lua script drops them
        if len(self._turns) > self.max_users:
            self._forget_idle(at_ms)

    def _forget_idle(self, now_ms: int) -> None:
        """Drops the people with no turn in the window (the oldest first, if all have one)."""
        idle = [u for u, t in self._turns.items() if max(t.values()) <= now_ms - self.window_ms]
        if not idle:
            self.forgot_ms = now_ms
        for user in idle or list(self._turns)[: len(self._turns) // 2]:
            del self._turns[user]
