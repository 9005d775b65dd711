"""What a message's files become in ``text.received``: none is dropped without a word.

Images keep their URL when the server's model can see (``VISION_MODELS``), so the llm processor
can send them; otherwise they are named. Text files are read in, up to a number of characters.
Anything else (audio, archives, PDFs) is named with its type and size, so the model can say it
cannot open it. A file taken whole (a document for ``/learn``) is refused by its declared size
before a byte is fetched, and again if more bytes come than that (:func:`download`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from pathlib import PurePosixPath

import hikari

from libra.contracts import Attachment

__all__ = ["FileTooLarge", "can_see", "download", "read_attachments"]

log = logging.getLogger("libra.discord.attachments")

_TEXT_TYPES = (
    "application/json",
    "application/xml",
    "application/yaml",
    "application/x-yaml",
    "application/toml",
    "application/javascript",
    "application/sql",
    "application/x-sh",
)
_TEXT_SUFFIXES = frozenset(
    (
        ".txt",
        ".md",
        ".rst",
        ".csv",
        ".tsv",
        ".log",
        ".json",
        ".yaml",
        ".yml",
        ".toml",
        ".ini",
        ".cfg",
        ".conf",
        ".xml",
        ".html",
        ".css",
        ".sql",
        ".py",
        ".js",
        ".ts",
        ".tsx",
        ".jsx",
        ".sh",
        ".rs",
        ".go",
        ".java",
        ".kt",
        ".c",
        ".h",
        ".cpp",
        ".hpp",
        ".cs",
        ".rb",
        ".php",
        ".swift",
        ".lua",
    )
)
_DOWNLOAD_TIMEOUT_S = 10.0
_DOCUMENT_TIMEOUT_S = 30.0
TRUNCATED = "\n[… truncated]"


class FileTooLarge(ValueError):
    """A file whose download went past the size it may have (Discord declared less)."""

    def __init__(self, name: str, limit: int) -> None:
        super().__init__(f"{name!r} is larger than declared, over the limit of {limit:,} bytes")


def can_see(model: str, vision_models: Iterable[str]) -> bool:
    """Whether ``model`` (``provider:model`` or ``model``) starts with one of ``vision_models``."""
    name = model.rpartition(":")[2].strip().lower()
    return bool(name) and any(name.startswith(v.strip().lower()) for v in vision_models if v)


def _kind(attachment: hikari.Attachment) -> str:
    media = (attachment.media_type or "").split(";")[0].strip().lower()
    if media.startswith("image/"):
        return "image"
    if media.startswith("text/") or media in _TEXT_TYPES:
        return "text"
    if PurePosixPath(attachment.filename).suffix.lower() in _TEXT_SUFFIXES:
        return "text"
    return "other"


async def read_attachments(
    attachments: Sequence[hikari.Attachment], *, vision: bool, text_chars: int
) -> tuple[Attachment, ...]:
    """Describes each file of a message; reads text files in, at most ``text_chars`` each."""
    return tuple(
        await asyncio.gather(
            *(_describe(a, vision=vision, text_chars=text_chars) for a in attachments)
        )
    )


async def _describe(attachment: hikari.Attachment, *, vision: bool, text_chars: int) -> Attachment:
    named = {
        "name": attachment.filename,
        "content_type": attachment.media_type or "",
        "size": attachment.size,
    }
    kind = _kind(attachment)
    if kind == "image":
        return Attachment(kind="image", url=attachment.url if vision else "", **named)
    if kind == "text" and text_chars > 0:
        try:
            text = await _read_text(attachment, text_chars)
        except (TimeoutError, hikari.HTTPError, OSError) as exc:
            log.warning("could not read %s: %s", attachment.filename, exc)
        else:
            return Attachment(kind="text", text=text, **named)
    return Attachment(kind="other", **named)


async def download(
    attachment: hikari.Attachment, *, max_bytes: int, timeout_s: float = _DOCUMENT_TIMEOUT_S
) -> bytes:
    """The whole file, no more than ``max_bytes`` of it read (the caller refuses a file whose
    declared size is over, unfetched); raises :class:`FileTooLarge`, ``TimeoutError``,
    ``hikari.HTTPError`` or ``OSError``."""
    data = await _fetch(attachment, max_bytes + 1, timeout_s)
    if len(data) > max_bytes:
        raise FileTooLarge(attachment.filename, max_bytes)
    return data


async def _fetch(attachment: hikari.Attachment, limit: int, timeout_s: float) -> bytes:
    """The first ``limit`` bytes of a file (fewer if it is shorter); no more are read."""
    data = bytearray()
    async with asyncio.timeout(timeout_s), attachment.stream() as reader:
        async for chunk in reader:
            data.extend(chunk)
            if len(data) >= limit:
                break
    return bytes(data[:limit])


async def _read_text(attachment: hikari.Attachment, chars: int) -> str:
    limit = chars * 4  # UTF-8 takes at most four bytes a character
    data = await _fetch(attachment, limit, _DOWNLOAD_TIMEOUT_S)
    text = data.decode("utf-8", errors="replace")
    if len(text) > chars or len(data) < attachment.size:
        return text[:chars] + TRUNCATED
    return text
