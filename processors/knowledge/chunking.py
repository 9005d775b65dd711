"""Chunks of a document: by headings, then paragraphs, a few hundred tokens with overlap.

A section (the text under one heading) is packed paragraph by paragraph into chunks of at most
``tokens``; a paragraph longer than that is cut into windows of words. Each chunk after the
first of a section starts with the last ``overlap`` tokens of the one before it, so that a
sentence cut at a boundary is whole in one of them. A chunk's text starts with its headings
(``Guide > Install``): a chunk read alone, by a search or a model, says what it is about.

Tokens are estimated, not counted with a model's tokenizer (the embedder may be any): a word
costs one token per four UTF-8 bytes, at least one. Chunking is a pure function of the text and
the two sizes, so a projection rebuilt from the log makes the same chunks.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["Chunk", "chunk_text", "word_tokens"]

_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_PARAGRAPHS = re.compile(r"\n\s*\n")


class Chunk(NamedTuple):
    index: int
    heading: str  # the headings above it, "A > B"; "" before the first
    text: str  # the heading line and the chunk's words


def word_tokens(word: str) -> int:
    """The estimated tokens of one word."""
    return max(1, len(word.encode("utf-8")) // 4)


def _sections(text: str) -> list[tuple[str, list[str]]]:
    """The text split at Markdown headings: (heading path, paragraphs) in order."""
    path: list[tuple[int, str]] = []
    sections: list[tuple[str, list[str]]] = [("", [])]
    for block in _PARAGRAPHS.split(text):
        lines = block.strip().split("\n")
        body: list[str] = []
        for line in lines:
            match = _HEADING.match(line.strip())
            if match is None:
                body.append(line)
                continue
            if body:
                sections[-1][1].append("\n".join(body))
                body = []
            level = len(match.group(1))
            path = [(lv, title) for lv, title in path if lv < level] + [(level, match.group(2))]
            sections.append((" > ".join(title for _, title in path), []))
        if body and "\n".join(body).strip():
            sections[-1][1].append("\n".join(body).strip())
    return [(heading, paragraphs) for heading, paragraphs in sections if paragraphs]


def _words(paragraph: str, limit: int) -> list[str]:
    """The paragraph's words; a "word" longer than a chunk (text without spaces) is cut."""
    out: list[str] = []
    for word in paragraph.split():
        while word_tokens(word) > limit:
            cut = limit * 4
            while len(word[:cut].encode("utf-8")) > limit * 4:
                cut -= 1
            out.append(word[: max(cut, 1)])
            word = word[max(cut, 1) :]
        if word:
            out.append(word)
    return out


def _pack(paragraphs: list[str], tokens: int, overlap: int) -> list[str]:
    """One section's chunks; paragraphs stay whole where they fit."""
    chunks: list[str] = []
    current: list[list[str]] = []  # paragraphs, as words, of the chunk being filled
    used = 0
    fresh = False  # whether it holds more than the overlap it started with

    def close() -> None:
        nonlocal current, used, fresh
        chunks.append("\n\n".join(" ".join(p) for p in current if p))
        tail: list[str] = []
        spent = 0
        for word in reversed([w for p in current for w in p]):
            spent += word_tokens(word)
            if spent > overlap:
                break
            tail.insert(0, word)
        current, fresh = ([tail] if tail else []), False
        used = sum(word_tokens(w) for w in tail)

    for paragraph in paragraphs:
        words = _words(paragraph, max(1, tokens - overlap))
        cost = sum(word_tokens(w) for w in words)
        if used + cost > tokens and fresh and cost <= tokens - overlap:
            close()  # the paragraph fits whole in the next chunk
        if used + cost <= tokens:
            current.append(words)
            used, fresh = used + cost, True
            continue
        piece: list[str] = []  # longer than the room left: word by word, over chunks
        current.append(piece)
        for word in words:
            if used + word_tokens(word) > tokens and fresh:
                close()
                piece = []
                current.append(piece)
            piece.append(word)
            used, fresh = used + word_tokens(word), True
    if fresh:
        chunks.append("\n\n".join(" ".join(p) for p in current if p))
    return chunks


def chunk_text(text: str, *, tokens: int, overlap: int = 0) -> list[Chunk]:
    """Returns the document's chunks in order."""
    if tokens <= 0 or not 0 <= overlap < tokens:
        raise ValueError("chunks need a positive size and an overlap smaller than it")
    out: list[Chunk] = []
    for heading, paragraphs in _sections(text):
        for body in _pack(paragraphs, tokens, overlap):
            content = f"{heading}\n\n{body}" if heading else body
            out.append(Chunk(len(out), heading, content))
    return out
