"""Knowledge documents in the log: the files live in the object store bucket ``libra-knowledge``,
events name them (:class:`~libra.contracts.DocumentRef`).

Each document is two objects under its id: the file as it was given (``<id>/source``) and the
text read from it (``<id>/text``), which the knowledge projection chunks; a rebuild reads the
same text whatever parser is installed by then. Unlike audio, documents have no TTL: they stay
until removed, so that the projection can be rebuilt from the log.
"""

from __future__ import annotations

import hashlib

import nats
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from nats.js.object_store import ObjectStore

from libra.contracts import KNOWLEDGE_BUCKET, DocumentRef

from .buckets import ensure_object_store

__all__ = ["DocumentMissing", "DocumentStore", "ensure_documents_bucket"]


class DocumentMissing(LookupError):
    """A document's object is not in the bucket (it was removed)."""


async def ensure_documents_bucket(js: JetStreamContext, *, replicas: int = 1) -> ObjectStore:
    """Opens the documents bucket, creating it first if it is not there; safe to repeat."""
    return await ensure_object_store(
        js,
        nats.js.api.ObjectStoreConfig(
            bucket=KNOWLEDGE_BUCKET,
            description="Documents added to knowledge bases, kept until removed",
            storage=nats.js.api.StorageType.FILE,
            replicas=replicas,
        ),
    )


class DocumentStore:
    """Puts documents into the knowledge bucket, reads them back, removes them."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    @classmethod
    async def open(cls, js: JetStreamContext) -> DocumentStore:
        return cls(await ensure_documents_bucket(js))

    async def put(self, name: str, data: bytes) -> DocumentRef:
        """Stores ``data`` under ``name`` and returns the reference an event carries."""
        await self.store.put(name, data)
        return DocumentRef(
            bucket=KNOWLEDGE_BUCKET,
            name=name,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )

    async def get(self, ref: DocumentRef) -> bytes:
        """Returns an object's bytes; raises :class:`DocumentMissing` once it was removed."""
        try:
            return bytes((await self.store.get(ref.name)).data or b"")
        except NotFoundError:  # ObjectNotFoundError and ObjectDeletedError among them
            raise DocumentMissing(ref.name) from None

    async def delete(self, name: str) -> bool:
        """Removes an object; returns False if there was none."""
        try:
            await self.store.delete(name)
        except NotFoundError:  # ObjectNotFoundError and ObjectDeletedError among them
            return False
        return True
