"""Hybrid search of knowledge chunks: pgvector cosine similarity and PostgreSQL full-text search,
fused by reciprocal rank, within the scopes a turn may read.

Each method ranks its best ``candidates`` chunks; a chunk's score is the sum over the methods
that found it of ``1 / (RRF_K + rank)`` (Cormack et al., 2009), so that a chunk both find comes
first, and neither method's raw scores (a distance, a ``ts_rank``) need to be comparable. The
text query is the question's words joined by OR: a question rarely shares all its words with
the passage that answers it. One round trip does both searches and the fusion.
"""

from __future__ import annotations

import re
from typing import Literal

import asyncpg
import numpy as np

from libra.contracts import RetrievedChunk
from libra.processors.memory.embedders import DIMENSIONS, Embedder

__all__ = ["RRF_K", "KnowledgeSearch", "Mode", "text_query"]

RRF_K = 60
Mode = Literal["hybrid", "vector", "text"]
_WORD = re.compile(r"\w+", re.UNICODE)
_MAX_QUERY_WORDS = 64
_NO_VECTOR = np.zeros(DIMENSIONS, dtype=np.float32)  # a placeholder when only text searches


def text_query(text: str) -> str:
    """The question as a ``to_tsquery`` of its words joined by OR; "" with no words."""
    words = dict.fromkeys(w.lower() for w in _WORD.findall(text) if not w.startswith("_"))
    return " | ".join(list(words)[:_MAX_QUERY_WORDS])


# $1 vector, $2 scopes, $3 embedder, $4 candidates per method, $5 tsquery text, $6 k,
# $7 whether to search by vector, $8 by text
_HYBRID = """
WITH by_vector AS (
    SELECT id, row_number() OVER (ORDER BY distance) AS rank FROM (
        SELECT id, embedding <=> $1 AS distance FROM knowledge_chunks
        WHERE $7 AND scope = ANY($2::text[]) AND embedder = $3
        ORDER BY embedding <=> $1 LIMIT $4
    ) nearest
), by_text AS (
    SELECT id, row_number() OVER (ORDER BY score DESC, id) AS rank FROM (
        SELECT id, ts_rank_cd(search, query) AS score
        FROM knowledge_chunks, to_tsquery('english', $5) AS query
        WHERE $8 AND scope = ANY($2::text[]) AND search @@ query
        ORDER BY score DESC, id LIMIT $4
    ) matching
), fused AS (
    SELECT id, COALESCE(1.0 / ($9 + v.rank), 0) + COALESCE(1.0 / ($9 + t.rank), 0) AS score
    FROM by_vector v FULL JOIN by_text t USING (id)
)
SELECT c.id, c.document, c.scope, c.content, d.title, f.score
FROM fused f JOIN knowledge_chunks c USING (id) JOIN knowledge_documents d USING (document)
ORDER BY f.score DESC, c.id LIMIT $6
"""


class KnowledgeSearch:
    """Searches the chunks of one embedder's rows (the configured one's)."""

    def __init__(self, pool: asyncpg.Pool, embedder: Embedder, *, candidates: int = 40) -> None:
        self.pool, self.embedder, self.candidates = pool, embedder, candidates

    async def has_any(self, scopes: list[str]) -> bool:
        """Whether any chunk is in these scopes: most conversations have no knowledge base,
        and they pay no embedding call."""
        return await self.pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM knowledge_chunks WHERE scope = ANY($1::text[]))", scopes
        )

    async def search(
        self, text: str, scopes: list[str], *, k: int, mode: Mode = "hybrid"
    ) -> list[RetrievedChunk]:
        """The ``k`` best chunks for ``text`` in ``scopes``, best first."""
        if k <= 0 or not scopes:
            return []
        query = text_query(text) if mode != "vector" else ""
        use_vector = mode != "text" and bool(text.strip())
        use_text = mode != "vector" and bool(query)
        if not (use_vector or use_text):
            return []
        vector = (await self.embedder.embed([text]))[0] if use_vector else _NO_VECTOR
        rows = await self.pool.fetch(
            _HYBRID,
            vector,
            scopes,
            self.embedder.name,
            self.candidates,
            query or "_",
            k,
            use_vector,
            use_text,
            RRF_K,
        )
        return [
            RetrievedChunk(
                chunk=r["id"],
                document=r["document"],
                title=r["title"],
                scope=r["scope"],
                text=r["content"],
                score=round(float(r["score"]), 6),
            )
            for r in rows
        ]
