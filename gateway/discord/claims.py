"""Which gateway answers a message: the first to claim its turn in Redis.

Two gateway processes on the same shard both receive every message. Both make the same event id
from the Discord message (so the log keeps one input), and each tries ``SET NX`` on the turn's
key; the one that sets it follows the turn and replies, the other leaves it. The key expires
long after any reply could still be under way.
"""

from __future__ import annotations

import redis.asyncio as aioredis

__all__ = ["TurnClaims"]


class TurnClaims:
    """Claims turns for one gateway instance."""

    def __init__(self, redis: aioredis.Redis, *, owner: str, ttl_s: int = 3600) -> None:
        self.redis = redis
        self.owner = owner
        self.ttl_s = ttl_s

    async def claim(self, turn: str) -> bool:
        """Returns True if this instance is the one to answer ``turn``."""
        return bool(
            await self.redis.set(f"libra:discord:claim:{turn}", self.owner, nx=True, ex=self.ttl_s)
        )
