"""Which of two gateway processes acts, where the log cannot say: the first to claim in Redis.

Two gateway processes on the same shard both receive every message and interaction. A message is
claimed in the log itself (its ``text.received`` is published once, see :mod:`.gateway`); Redis
decides what has no event of its own: which process answers a voice command's interaction, and
which tells the person that the log is down. Each tries ``SET NX`` on the key; the one that sets
it acts. The key expires long after any answer could still be under way.
"""

from __future__ import annotations

import contextlib

import redis.asyncio as aioredis
from redis.exceptions import RedisError

__all__ = ["TurnClaims"]


class TurnClaims:
    """Claims for one gateway instance."""

    def __init__(self, redis: aioredis.Redis, *, owner: str, ttl_s: int = 3600) -> None:
        self.redis = redis
        self.owner = owner
        self.ttl_s = ttl_s

    async def claim(self, key: str) -> bool:
        """Returns True if this instance is the one to act on ``key``."""
        return bool(
            await self.redis.set(f"libra:discord:claim:{key}", self.owner, nx=True, ex=self.ttl_s)
        )

    async def release(self, key: str) -> None:
        """Gives up ``key`` (its action failed), so that a retry may claim it; quietly."""
        with contextlib.suppress(RedisError, OSError):
            await self.redis.delete(f"libra:discord:claim:{key}")
