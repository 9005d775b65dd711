"""The knowledge projection: each added document chunked, embedded and kept for search.

``knowledge.added`` reads the document's text from the knowledge bucket, cuts it into chunks
with the sizes the event names, embeds them with the configured embedder and writes the
document and its chunks; ``knowledge.removed`` deletes them, and is remembered so that a removal
wins whatever order the two are folded in. Chunk ids are ``<document>:<index>``, and chunking is
a pure function of the stored text, so a rebuild from the log makes the same chunks.

A document whose text is gone from the bucket (it was removed, and this is a rebuild) is listed
with no chunks and the reason; its removal, later in the log, deletes the row.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from libra.contracts import CONSUMERS, KnowledgeAdded, KnowledgeRemoved
from libra.processors.knowledge.chunking import chunk_text
from libra.processors.memory.embedders import Embedder, build_embedder
from libra.runtime.config import Settings
from libra.runtime.documents import DocumentMissing, DocumentStore
from libra.runtime.eventlog import EventLog
from libra.runtime.projection import Recorded

__all__ = ["EMBED_BATCH", "EmbedderUnavailable", "KnowledgeProjection", "knowledge_projection"]

EMBED_BATCH = 64  # chunks per embedding request


class EmbedderUnavailable(ConnectionError):
    """The embedder did not answer: the projection runtime waits and retries, as for a
    database that is down (an ``OSError``), rather than losing the document."""


class KnowledgeProjection:
    """Folds ``knowledge.*`` into ``knowledge_documents`` and ``knowledge_chunks``."""

    spec = CONSUMERS["knowledge"]
    tables = ("knowledge_chunks", "knowledge_documents", "knowledge_removals")

    def __init__(self, documents: DocumentStore, embedder: Embedder) -> None:
        self.documents, self.embedder = documents, embedder

    async def apply(self, conn: asyncpg.Connection, batch: Sequence[Recorded]) -> None:
        for _, event in batch:
            match event:
                case KnowledgeAdded():
                    await self._added(conn, event)
                case KnowledgeRemoved():
                    await self._removed(conn, event)

    async def _added(self, conn: asyncpg.Connection, event: KnowledgeAdded) -> None:
        known = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM knowledge_documents WHERE document = $1)"
            " OR EXISTS (SELECT 1 FROM knowledge_removals WHERE document = $1)",
            event.document,
        )
        if known:
            return  # folded already, or removed
        chunks, error = [], ""
        try:
            text = (await self.documents.get(event.text)).decode("utf-8")
            chunks = chunk_text(text, tokens=event.chunk_tokens, overlap=event.chunk_overlap)
        except DocumentMissing:
            error = "its text is no longer in the knowledge bucket"
        vectors = await self._embed([c.text for c in chunks])
        await conn.execute(
            "INSERT INTO knowledge_documents (document, scope, title, media_type, size, sha256,"
            " added_by, added_at, chunks, embedder, error)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            event.document,
            event.scope,
            event.title,
            event.media_type,
            event.source.size,
            event.source.sha256,
            event.user,
            event.at,
            len(chunks),
            self.embedder.name,
            error,
        )
        await conn.executemany(
            "INSERT INTO knowledge_chunks (id, document, scope, index, heading, content,"
            " embedder, embedding) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            [
                (
                    f"{event.document}:{c.index}",
                    event.document,
                    event.scope,
                    c.index,
                    c.heading,
                    c.text,
                    self.embedder.name,
                    vector,
                )
                for c, vector in zip(chunks, vectors, strict=True)
            ],
        )

    async def _embed(self, texts: list[str]) -> list:
        out: list = []
        for at in range(0, len(texts), EMBED_BATCH):
            try:
                out += await self.embedder.embed(texts[at : at + EMBED_BATCH])
            except Exception as exc:  # an SDK's own errors, a timeout: the embedder is down
                raise EmbedderUnavailable(f"embedding chunks failed: {exc!r}") from exc
        return out

    async def _removed(self, conn: asyncpg.Connection, event: KnowledgeRemoved) -> None:
        await conn.execute(
            "INSERT INTO knowledge_removals (document, event_id, at) VALUES ($1, $2, $3)"
            " ON CONFLICT (document) DO NOTHING",
            event.document,
            event.id,
            event.at,
        )
        await conn.execute("DELETE FROM knowledge_chunks WHERE document = $1", event.document)
        await conn.execute("DELETE FROM knowledge_documents WHERE document = $1", event.document)


async def knowledge_projection(settings: Settings, log_: EventLog) -> KnowledgeProjection:
    """The projection as the settings configure it (its embedder), on ``log_``'s bucket."""
    return KnowledgeProjection(await DocumentStore.open(log_.js), build_embedder(settings))
