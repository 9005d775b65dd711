"""Knowledge bases over HTTP: add, list and remove documents.

- ``POST /api/knowledge``: multipart form data, one or more ``file`` parts (txt, md, html,
  pdf) and an optional ``scope`` (``global``, ``guild:<id>``, ``user:<platform:id>``); answers
  201 ``{"documents": [{"document", "title", "scope", "mediaType", "size"}]}``. Every file is
  read before any is added: one that cannot be read refuses the request (400, or 413 when too
  large) and nothing is added.
- ``GET /api/knowledge?scope=...``: ``{"documents": [...]}`` as the knowledge projection lists
  them (with ``chunks``, or ``error`` for a document that could not be read), oldest first.
- ``DELETE /api/knowledge/{document}``: 200 ``{"document", "removed": true}``, or 404.

A service key may use any scope (with no ``scope``: global when adding, every scope when
listing); a person's token only their own, ``user:http:<sub>``, which is also its default. A
document is listed once the knowledge projection has read it, a moment after it was added.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from libra.contracts import user_id
from libra.processors.knowledge.documents import (
    DocumentRow,
    Limits,
    add_document,
    find_document,
    list_documents,
    remove_document,
)
from libra.processors.knowledge.parsing import DocumentRejected, read
from libra.processors.knowledge.scopes import GLOBAL, ScopeError, parse_scope
from libra.runtime.documents import DocumentStore
from libra.runtime.eventlog import EventLog
from libra.runtime.outage import Breaker, Unavailable

from .app import _error, _unavailable, log_down
from .auth import Authenticator, Principal

__all__ = ["MAX_FILES", "install_knowledge"]

MAX_FILES = 16
_FORM_ROOM = 64 * 1024  # the multipart framing and the scope field, past the files themselves
PATH = "/api/knowledge"


def _own_scope(principal: Principal) -> str:
    return f"user:{user_id('http', principal.user)}"


def _row_json(row: DocumentRow) -> dict[str, Any]:
    out = {
        "document": row.document,
        "title": row.title,
        "scope": row.scope,
        "mediaType": row.media_type,
        "size": row.size,
        "chunks": row.chunks,
        "addedBy": row.added_by,
        "addedAt": row.added_at.isoformat(),
    }
    if row.error:
        out["error"] = row.error
    return out


class _Refused(Exception):
    def __init__(self, answer: JSONResponse) -> None:
        self.answer = answer


def _scope_for(principal: Principal, asked: str | None, *, default: str | None) -> str | None:
    """The scope a request may use: a person only their own; raises :class:`_Refused`."""
    if principal.user is not None:
        own = _own_scope(principal)
        if asked not in (None, "", own):
            raise _Refused(_error(403, "forbidden", f"a person's token may use only {own}"))
        return own
    if not asked:
        return default
    try:
        return parse_scope(asked)
    except ScopeError as exc:
        raise _Refused(_error(400, "invalid_request", str(exc))) from None


def install_knowledge(
    app: FastAPI,
    log: EventLog,
    *,
    auth: Authenticator,
    pool: Callable[[], Awaitable[asyncpg.Pool]],
    database: Breaker | None = None,
    limits: Limits,
) -> dict[str, int]:
    """Adds the knowledge routes to ``app``; returns the body limit its upload route needs
    (for ``BodyLimit``'s ``routes``)."""
    routes = _KnowledgeRoutes(log, auth, pool, database or Breaker("postgres", timeout_s=2.0))

    @app.post(PATH, summary="Add documents to a knowledge base (multipart: file, scope)")
    async def add(request: Request) -> JSONResponse:
        try:
            return await routes.add(request, limits)
        except _Refused as refused:
            return refused.answer

    @app.get(PATH, summary="The documents of a knowledge base")
    async def listed(request: Request, scope: str | None = None) -> JSONResponse:
        try:
            chosen = _scope_for(auth(request), scope, default=None)
            found = await routes.rows(lambda p: list_documents(p, chosen))
        except _Refused as refused:
            return refused.answer
        return JSONResponse({"documents": [_row_json(r) for r in found]})

    @app.delete(PATH + "/{document}", summary="Remove a document from its knowledge base")
    async def remove(document: str, request: Request) -> JSONResponse:
        try:
            return await routes.remove(request, document)
        except _Refused as refused:
            return refused.answer

    return {PATH: limits.max_bytes * MAX_FILES + _FORM_ROOM}


def _who(principal: Principal) -> str:
    return user_id("http", principal.user) if principal.user else "http:service"


class _KnowledgeRoutes:
    """What the routes do; each raises :class:`_Refused` with the answer to a refusal."""

    def __init__(
        self,
        log: EventLog,
        auth: Authenticator,
        pool: Callable[[], Awaitable[asyncpg.Pool]],
        database: Breaker,
    ) -> None:
        self.log, self.auth, self.pool, self.database = log, auth, pool, database
        self._store: DocumentStore | None = None

    async def store(self) -> DocumentStore:
        if self._store is None:
            self._store = await DocumentStore.open(self.log.js)
        return self._store

    def log_up(self) -> None:
        if (down := log_down(self.log)) is not None:
            raise _Refused(down)

    async def rows(self, read_rows: Callable[[asyncpg.Pool], Awaitable[Any]]) -> Any:
        try:
            return await self.database.call(lambda: _with_pool(self.pool, read_rows))
        except Unavailable:
            raise _Refused(
                _unavailable("Libra's database is unreachable; try again in a few seconds")
            ) from None

    async def add(self, request: Request, limits: Limits) -> JSONResponse:
        principal = self.auth(request)
        self.log_up()
        files, scope = await _upload(request, principal, limits)
        store = await self.store()
        added = [
            await add_document(
                self.log,
                store,
                name=name,
                data=data,
                scope=scope,
                added_by=_who(principal),
                limits=limits,
                content_type=content_type,
            )
            for name, data, content_type in files
        ]
        body = [
            {
                "document": e.document,
                "title": e.title,
                "scope": e.scope,
                "mediaType": e.media_type,
                "size": e.source.size,
            }
            for e in added
        ]
        return JSONResponse({"documents": body}, status_code=201)

    async def remove(self, request: Request, document: str) -> JSONResponse:
        principal = self.auth(request)
        self.log_up()
        row = await self.rows(lambda p: find_document(p, document))
        if row is None or (principal.user is not None and row.scope != _own_scope(principal)):
            return _error(404, "not_found", f"no document {document!r} in your knowledge bases")
        await remove_document(self.log, await self.store(), row, removed_by=_who(principal))
        return JSONResponse({"document": document, "removed": True})


async def _with_pool(
    pool: Callable[[], Awaitable[asyncpg.Pool]], read_rows: Callable[[asyncpg.Pool], Awaitable[Any]]
) -> Any:
    return await read_rows(await pool())


async def _upload(
    request: Request, principal: Principal, limits: Limits
) -> tuple[list[tuple[str, bytes, str]], str]:
    """The request's files, each read to check it, and its scope; raises :class:`_Refused`."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise _Refused(_error(400, "invalid_request", "send the documents as multipart/form-data"))
    form = await request.form(max_files=MAX_FILES, max_fields=4)
    asked = form.get("scope")
    scope = _scope_for(principal, asked if isinstance(asked, str) else None, default=GLOBAL)
    uploads = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
    if not uploads:
        raise _Refused(_error(400, "invalid_request", "no file: send the documents as 'file'"))
    files = []
    for upload in uploads:
        data = await upload.read()
        name = upload.filename or "document"
        content_type = upload.content_type or ""
        if len(data) > limits.max_bytes:
            raise _Refused(
                _error(
                    413,
                    "too_large",
                    f"{name!r} is over {limits.max_bytes:,} bytes; nothing was added",
                )
            )
        try:
            read(name, data, max_bytes=limits.max_bytes, content_type=content_type)
        except DocumentRejected as exc:
            raise _Refused(_error(400, "invalid_document", f"{exc}; nothing was added")) from None
        files.append((name, data, content_type))
    return files, scope
