"""Libra's page for people (issue 16): ``GET /`` and its files under ``GET /static/{name}``.

The page talks to Libra over ``/ws``. Its files are in ``static/`` next to this module; only a
plain file name there is served (no folders, no dot files), so no path leaves the folder.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse

__all__ = ["STATIC", "install_page", "serve_file"]

STATIC = Path(__file__).with_name("static")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9]+)+")
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
}
_HEADERS = {
    # revalidated each time (ETag): a new Libra's page is never mixed with an old script
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    # its own files only: no inline script, no other origin (the socket is this server's)
    "Content-Security-Policy": "default-src 'self'; connect-src 'self' ws: wss:;"
    " img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "Referrer-Policy": "no-referrer",  # the page's address may carry ?token=
}


def serve_file(name: str) -> FileResponse:
    """One of the files in ``static/``, with its type and the pages' headers; else 404."""
    path = STATIC / name
    kind = _TYPES.get(path.suffix)
    if not _NAME.fullmatch(name) or kind is None or not path.is_file():
        raise HTTPException(404)
    return FileResponse(path, media_type=kind, headers=_HEADERS)


def install_page(app: FastAPI) -> None:
    """Adds ``GET /`` (the page) and ``GET /static/{name}`` (its scripts and styles)."""

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return serve_file("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> FileResponse:
        return serve_file(name)
