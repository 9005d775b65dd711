"""Adding, removing and listing knowledge documents: what the CLI and the HTTP API both do.

Adding reads the document first (a refused one leaves nothing behind), stores the file and its
text in the knowledge bucket, then publishes ``knowledge.added``; if the publish fails the two
objects are removed again. Removing publishes ``knowledge.removed`` and then deletes the objects.
The list is the knowledge projection's.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg
import msgspec

from libra.contracts import KnowledgeAdded, KnowledgeRemoved, make, new_id
from libra.runtime.config import Settings
from libra.runtime.documents import DocumentStore
from libra.runtime.eventlog import EventLog

from .parsing import read
from .scopes import parse_scope, scope_conversation

__all__ = [
    "DocumentRow",
    "Limits",
    "add_document",
    "find_document",
    "list_documents",
    "remove_document",
]


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """How documents are taken in: their largest size, and how their chunks are cut."""

    max_bytes: int
    chunk_tokens: int
    chunk_overlap: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """KNOWLEDGE_MAX_DOCUMENT_BYTES, KNOWLEDGE_CHUNK_TOKENS and KNOWLEDGE_CHUNK_OVERLAP."""
        return cls(
            max_bytes=settings.knowledge_max_document_bytes,
            chunk_tokens=settings.knowledge_chunk_tokens,
            chunk_overlap=settings.knowledge_chunk_overlap,
        )


class DocumentRow(msgspec.Struct, frozen=True, kw_only=True):
    """A document as the knowledge projection lists it."""

    document: str
    scope: str
    title: str
    media_type: str
    size: int
    added_by: str
    added_at: datetime
    chunks: int
    error: str = ""


async def add_document(
    log: EventLog,
    store: DocumentStore,
    *,
    name: str,
    data: bytes,
    scope: str,
    added_by: str,
    limits: Limits,
    content_type: str = "",
    title: str = "",
) -> KnowledgeAdded:
    """Reads, stores and announces a document; raises ``DocumentRejected`` or ``ScopeError``.

    ``title`` is what its sources are shown as; by default the file's name."""
    scope = parse_scope(scope)
    document = read(name, data, max_bytes=limits.max_bytes, content_type=content_type)
    document_id = new_id()
    source = await store.put(f"{document_id}/source", data)
    try:
        text = await store.put(f"{document_id}/text", document.text.encode("utf-8"))
        event = make(
            KnowledgeAdded,
            id=document_id,
            conversation=scope_conversation(scope),
            user=added_by,
            document=document_id,
            scope=scope,
            title=(" ".join(title.split()) or name.replace("\\", "/").rsplit("/", 1)[-1])[:200],
            media_type=document.media_type,
            source=source,
            text=text,
            chunk_tokens=limits.chunk_tokens,
            chunk_overlap=limits.chunk_overlap,
        )
        await log.publish(event)
    except BaseException:
        for suffix in ("source", "text"):
            await store.delete(f"{document_id}/{suffix}")
        raise
    return event


async def remove_document(
    log: EventLog, store: DocumentStore, row: DocumentRow, *, removed_by: str
) -> KnowledgeRemoved:
    """Announces a document's removal, then deletes its objects."""
    event = make(
        KnowledgeRemoved,
        conversation=scope_conversation(row.scope),
        user=removed_by,
        document=row.document,
        scope=row.scope,
    )
    await log.publish(event)
    for suffix in ("source", "text"):
        await store.delete(f"{row.document}/{suffix}")
    return event


_COLUMNS = "document, scope, title, media_type, size, added_by, added_at, chunks, error"


async def list_documents(pool: asyncpg.Pool, scope: str | None = None) -> list[DocumentRow]:
    """The documents of ``scope`` (every scope's with None), oldest first."""
    rows = await pool.fetch(
        f"SELECT {_COLUMNS} FROM knowledge_documents WHERE $1::text IS NULL OR scope = $1"
        " ORDER BY added_at, document",
        scope,
    )
    return [DocumentRow(**dict(r)) for r in rows]


async def find_document(pool: asyncpg.Pool, document: str) -> DocumentRow | None:
    """One document by its id, or None."""
    row = await pool.fetchrow(
        f"SELECT {_COLUMNS} FROM knowledge_documents WHERE document = $1", document
    )
    return DocumentRow(**dict(row)) if row else None
