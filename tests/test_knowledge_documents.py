"""Knowledge documents read and chunked: every type, every refusal, chunk sizes and overlap."""

from __future__ import annotations

import itertools

import pytest

from libra.processors.knowledge.chunking import chunk_text, word_tokens
from libra.processors.knowledge.parsing import DocumentRejected, read
from libra.processors.knowledge.scopes import ScopeError, parse_scope, scope_conversation

from .knowledge_docs import GUIDE_MD, PAGE_HTML, pdf_with_text

LIMIT = 1_000_000


def test_text_and_markdown_are_read_as_they_are() -> None:
    assert read("notes.txt", "\ufeffline one\r\n\r\n\r\nline  two".encode(), max_bytes=LIMIT) == (
        "text/plain",
        "line one\n\nline two",
    )
    kind, text = read("guide.md", GUIDE_MD.encode(), max_bytes=LIMIT)
    assert kind == "text/markdown" and text.startswith("# Libra guide")


def test_html_loses_markup_scripts_and_styles() -> None:
    kind, text = read("hours.html", PAGE_HTML.encode(), max_bytes=LIMIT)
    assert kind == "text/html"
    assert "# Opening hours" in text and "opens at seven" in text and "closes at six" in text
    assert "secret" not in text and "color" not in text and "Ignored title" not in text


def test_pdf_text_is_extracted() -> None:
    kind, text = read("menu.pdf", pdf_with_text("Soup of the day is lentil"), max_bytes=LIMIT)
    assert kind == "application/pdf" and "Soup of the day is lentil" in text


@pytest.mark.parametrize(
    ("name", "data", "why"),
    [
        ("empty.txt", b"", "is empty"),
        ("blank.md", b"  \n\n \t", "holds no text"),
        ("big.txt", b"x" * (LIMIT + 1), "over the limit"),
        ("photo.png", b"\x89PNG", "not a type Libra reads"),
        ("latin1.txt", "caf\xe9".encode("latin-1"), "not UTF-8"),
        ("broken.pdf", b"%PDF-1.4 this is not a pdf at all", "not a PDF that can be read"),
        ("scripts.html", b"<script>only code</script>", "holds no text"),
    ],
)
def test_bad_documents_are_refused_with_the_reason(name: str, data: bytes, why: str) -> None:
    with pytest.raises(DocumentRejected, match=why):
        read(name, data, max_bytes=LIMIT)


def test_a_declared_content_type_names_a_file_without_a_suffix() -> None:
    assert read("README", b"# Hi\n\nthere", max_bytes=LIMIT, content_type="text/markdown")[0] == (
        "text/markdown"
    )


def test_chunks_follow_headings_and_stay_within_size() -> None:
    body = " ".join(f"word{i}" for i in range(400))
    text = f"# Guide\n\nIntro.\n\n## Install\n\n{body}\n\nLast words.\n\n# Other\n\nElse."
    chunks = chunk_text(text, tokens=60, overlap=10)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert chunks[0].heading == "Guide" and chunks[0].text == "Guide\n\nIntro."
    assert chunks[-1].heading == "Other" and chunks[-1].text.endswith("Else.")
    install = [c for c in chunks if c.heading == "Guide > Install"]
    assert len(install) >= 7
    for chunk in install:
        words = chunk.text.removeprefix("Guide > Install\n\n").split()
        assert sum(word_tokens(w) for w in words) <= 60
    for before, after in itertools.pairwise(install):  # each repeats the tail
        assert before.text.split()[-1] in after.text.split()[3:14]
    everything = " ".join(c.text for c in install)
    assert all(f"word{i}" in everything.split() for i in range(400))
    assert "Last words." in install[-1].text


def test_chunking_is_deterministic_and_checks_its_sizes() -> None:
    assert chunk_text(GUIDE_MD, tokens=50, overlap=5) == chunk_text(GUIDE_MD, tokens=50, overlap=5)
    with pytest.raises(ValueError):
        chunk_text(GUIDE_MD, tokens=10, overlap=10)


def test_text_without_spaces_is_still_cut() -> None:
    chunks = chunk_text("가" * 3000, tokens=100, overlap=0)
    assert len(chunks) > 1 and "".join(c.text for c in chunks) == "가" * 3000


def test_scopes() -> None:
    assert parse_scope("global") == "global"
    assert parse_scope("guild:123") == "guild:123"
    assert parse_scope("user:discord:42") == "user:discord:42"
    assert scope_conversation("user:discord:42") == "user-discord~3A42"
    assert scope_conversation("guild:123") == "guild-123"
    for bad in ("guild:abc", "user:42", "user:nowhere:1", "server:1", ""):
        with pytest.raises(ScopeError):
            parse_scope(bad)
