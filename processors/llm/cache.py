"""The response cache: an identical prompt to the same models within the TTL gets the same reply.

It fails open: while Redis is down every lookup misses and nothing is stored, at once (the
breaker), so an outage costs the cache's savings, never a reply.
"""

from __future__ import annotations

import contextlib
import hashlib

import msgspec
import redis.asyncio as aioredis

from libra.runtime.outage import Breaker, Unavailable

from .providers.base import ChatMessage

__all__ = ["CachedReply", "ResponseCache"]


class CachedReply(msgspec.Struct, frozen=True):
    text: str
    provider: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ResponseCache:
    """Replies in Redis under a hash of everything that shapes them."""

    def __init__(
        self, redis: aioredis.Redis, *, ttl_s: float, breaker: Breaker | None = None
    ) -> None:
        self.redis, self.ttl_ms = redis, int(ttl_s * 1000)
        self.breaker = breaker or Breaker("redis")

    @staticmethod
    def key(
        messages: tuple[ChatMessage, ...],
        *,
        models: str,
        max_tokens: int,
        temperature: float,
        tools: tuple[str, ...] = (),
    ) -> str:
        """The reply's key; ``tools``: the names of the tools the model is offered."""
        fields: list[object] = [models, max_tokens, temperature, messages]
        if tools:  # a turn offered no tools keeps the key it had before tools existed
            fields.append(tools)
        shape = msgspec.json.encode(fields)
        return "libra:llm-cache:" + hashlib.sha256(shape).hexdigest()

    async def get(self, key: str) -> CachedReply | None:
        try:
            raw = await self.breaker.call(lambda: self.redis.get(key))
        except Unavailable:
            return None
        if raw is None:
            return None
        try:
            return msgspec.json.decode(raw, type=CachedReply)
        except msgspec.DecodeError:
            return None

    async def put(self, key: str, reply: CachedReply) -> None:
        data = msgspec.json.encode(reply)
        with contextlib.suppress(Unavailable):
            await self.breaker.call(lambda: self.redis.set(key, data, px=self.ttl_ms))
