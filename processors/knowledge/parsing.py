"""Reading a document's text: plain text and Markdown as they are, HTML without its markup,
scripts and styles, PDF with pypdf.

A document that cannot be read is refused with a :class:`DocumentRejected` that says why
(empty, too large, an unknown type, text that is not UTF-8, a PDF that does not parse), before
anything is stored or published: a refused document leaves nothing behind.
"""

from __future__ import annotations

import io
import re
from html.parser import HTMLParser
from pathlib import PurePath
from typing import Literal, NamedTuple

__all__ = ["MEDIA_TYPES", "DocumentRejected", "MediaType", "ReadDocument", "media_type", "read"]

MediaType = Literal["text/plain", "text/markdown", "text/html", "application/pdf"]
MEDIA_TYPES: dict[str, MediaType] = {
    ".txt": "text/plain",
    ".text": "text/plain",
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".html": "text/html",
    ".htm": "text/html",
    ".pdf": "application/pdf",
}
_BY_CONTENT_TYPE: dict[str, MediaType] = {t: t for t in set(MEDIA_TYPES.values())}
_BLANK_RUNS = re.compile(r"\n[ \t]*(?:\n[ \t]*)+")
_SPACES = re.compile(r"[ \t\r\f\v\xa0]+")  # no-break spaces too (&nbsp;)


class DocumentRejected(ValueError):
    """A document that cannot be added; the message says why, for the person who sent it."""


class ReadDocument(NamedTuple):
    media_type: MediaType
    text: str


def media_type(name: str, content_type: str = "") -> MediaType:
    """The document's type from its file name, else from its declared content type."""
    suffix = PurePath(name).suffix.lower()
    if suffix in MEDIA_TYPES:
        return MEDIA_TYPES[suffix]
    declared = content_type.split(";", 1)[0].strip().lower()
    if declared in _BY_CONTENT_TYPE:
        return _BY_CONTENT_TYPE[declared]
    known = ", ".join(sorted(MEDIA_TYPES))
    raise DocumentRejected(f"{name!r} is not a type Libra reads (it reads {known})")


def read(name: str, data: bytes, *, max_bytes: int, content_type: str = "") -> ReadDocument:
    """Returns the type and the text of a document, or raises :class:`DocumentRejected`."""
    kind = media_type(name, content_type)
    if not data:
        raise DocumentRejected(f"{name!r} is empty")
    if max_bytes and len(data) > max_bytes:
        raise DocumentRejected(
            f"{name!r} is {len(data):,} bytes, over the limit of {max_bytes:,}"
            " (KNOWLEDGE_MAX_DOCUMENT_BYTES)"
        )
    if kind == "application/pdf":
        text = _pdf_text(name, data)
    else:
        text = _utf8(name, data)
        if kind == "text/html":
            text = html_text(text)
    text = _tidy(text)
    if not text:
        raise DocumentRejected(f"{name!r} holds no text")
    return ReadDocument(kind, text)


def _utf8(name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DocumentRejected(
            f"{name!r} is not UTF-8 text (byte {exc.start} is not valid UTF-8)"
        ) from None


def _tidy(text: str) -> str:
    """Normalises line ends and spaces; paragraphs stay apart by one blank line."""
    text = text.replace("\r\n", "\n").replace("\x00", "")
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip()


def _pdf_text(name: str, data: bytes) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise DocumentRejected(f"{name!r} is an encrypted PDF; send it without a password")
        pages = [page.extract_text() or "" for page in reader.pages]
    except DocumentRejected:
        raise
    # pypdf raises its own errors for most damage, and plain ones (ValueError, KeyError ...)
    # for the rest: any of them means the same to the sender.
    except (PyPdfError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise DocumentRejected(f"{name!r} is not a PDF that can be read ({exc})") from None
    return "\n\n".join(pages)


_SKIPPED = frozenset({"script", "style", "noscript", "template", "head", "svg"})
_BLOCKS = frozenset(
    {
        "p", "div", "br", "li", "tr", "table", "section", "article", "header", "footer",
        "blockquote", "pre", "ul", "ol", "dl", "dt", "dd", "hr", "main", "nav", "aside",
    }
)  # fmt: skip
_HEADINGS = {f"h{n}": n for n in range(1, 7)}


class _TextOfHtml(HTMLParser):
    """Collects the visible text; headings become Markdown headings for the chunker."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIPPED:
            self.skipping += 1
        elif tag in _HEADINGS:
            self.out.append("\n\n" + "#" * _HEADINGS[tag] + " ")
        elif tag in _BLOCKS:
            self.out.append("\n\n" if tag == "p" else "\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED:
            self.skipping = max(0, self.skipping - 1)
        elif tag in _HEADINGS or tag in _BLOCKS:
            self.out.append("\n\n" if tag in _HEADINGS or tag == "p" else "\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.out.append(data.replace("\n", " "))


def html_text(html: str) -> str:
    """Returns the visible text of an HTML page (no scripts, styles or markup)."""
    parser = _TextOfHtml()
    parser.feed(html)
    parser.close()
    return "".join(parser.out)
