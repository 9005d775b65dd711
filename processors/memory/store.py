"""The memory store: remember an exchange, recall the closest ones, forget on request."""

from __future__ import annotations

from datetime import datetime

import asyncpg
import numpy as np

from .embedders import Embedder

__all__ = ["MemoryStore"]


class MemoryStore:
    """Memories of one embedder in the ``memories`` table."""

    def __init__(self, pool: asyncpg.Pool, embedder: Embedder) -> None:
        self.pool, self.embedder = pool, embedder

    async def remember(
        self, *, event_id: str, user: str, conversation: str, turn: str, content: str, at: datetime
    ) -> bool:
        """Stores one exchange unless a later reset forgot it; returns whether it is stored."""
        [vector] = await self.embedder.embed([content])
        async with self.pool.acquire() as conn:
            status = await conn.execute(
                "INSERT INTO memories (event_id, user_id, conversation, turn, content, embedder,"
                " embedding, at) SELECT $1, $2, $3, $4, $5, $6, $7, $8"
                " WHERE NOT EXISTS (SELECT 1 FROM memory_resets r WHERE r.user_id = $2"
                " AND (r.conversation IS NULL OR r.conversation = $3) AND r.at >= $8)"
                " ON CONFLICT (event_id) DO NOTHING",
                event_id,
                user,
                conversation,
                turn,
                content.replace("\x00", ""),
                self.embedder.name,
                vector,
                at,
            )
        return status.endswith(" 1")

    async def forget(
        self, *, event_id: str, user: str, conversation: str | None, at: datetime
    ) -> None:
        """Forgets the user's memories up to ``at`` (of one conversation, or all of them)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO memory_resets (event_id, user_id, conversation, at)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT (event_id) DO NOTHING",
                event_id,
                user,
                conversation,
                at,
            )
            await conn.execute(
                "DELETE FROM memories WHERE user_id = $1"
                " AND ($2::text IS NULL OR conversation = $2)"
                " AND at <= $3",
                user,
                conversation,
                at,
            )

    async def recall(
        self, *, user: str, conversation: str, text: str, k: int, before: datetime | None = None
    ) -> list[str]:
        """Returns the contents of the ``k`` memories closest to ``text``, closest first.

        ``before``: only what was remembered before then, so that a turn replayed later sees
        the memories it saw when it happened.
        """
        if k <= 0:
            return []
        # Most people have no memories yet: an API's embedding is asked only for those who do.
        # A local one costs less than the round trip that would ask (a recall is on the clock).
        if self.embedder.costly and not await self._has_any(user, conversation, before):
            return []
        [vector] = await self.embedder.embed([text])
        return await self.recall_vector(
            user=user, conversation=conversation, vector=vector, k=k, before=before
        )

    async def _has_any(self, user: str, conversation: str, before: datetime | None) -> bool:
        return await self.pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM memories WHERE user_id = $1 AND conversation = $2"
            " AND embedder = $3 AND ($4::timestamptz IS NULL OR at < $4))",
            user,
            conversation,
            self.embedder.name,
            before,
        )

    async def recall_vector(
        self,
        *,
        user: str,
        conversation: str,
        vector: np.ndarray,
        k: int,
        before: datetime | None = None,
    ) -> list[str]:
        # One round trip (the pool's connections search HNSW wide already, see
        # runtime/database.py): a recall is read while admission decides, against the clock.
        rows = await self.pool.fetch(
            "SELECT content FROM memories WHERE user_id = $1 AND conversation = $2"
            " AND embedder = $3 AND ($6::timestamptz IS NULL OR at < $6)"
            " ORDER BY embedding <=> $4 LIMIT $5",
            user,
            conversation,
            self.embedder.name,
            vector,
            k,
            before,
        )
        return [r["content"] for r in rows]
