"""Knowledge bases on real JetStream and PostgreSQL: documents added, chunked and embedded by
the knowledge projection, rebuilt the same from the log, removed; searched by scope; the CLI."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import pytest
from click.testing import CliRunner
from nats.js.errors import NotFoundError

from libra.contracts import KnowledgeAdded, KnowledgeRemoved
from libra.ops.cli import main
from libra.processors.knowledge.chunking import chunk_text
from libra.processors.knowledge.documents import (
    Limits,
    add_document,
    find_document,
    remove_document,
)
from libra.processors.knowledge.parsing import DocumentRejected
from libra.processors.knowledge.search import KnowledgeSearch
from libra.processors.memory.embedders import HashingEmbedder
from libra.projections.knowledge import KnowledgeProjection
from libra.runtime.config import Settings
from libra.runtime.documents import DocumentMissing, DocumentStore
from libra.runtime.eventlog import EventLog
from libra.runtime.projection import ProjectionRunner, rebuild

from .helpers import eventually, stream_events
from .knowledge_docs import GUIDE_MD, PAGE_HTML, pdf_with_text

LIMITS = Limits(max_bytes=1_000_000, chunk_tokens=40, chunk_overlap=8)
_CHUNK_COLUMNS = "id, document, scope, index, heading, content, embedder, embedding::text, search"


@pytest.fixture
async def store(eventlog: EventLog) -> DocumentStore:
    return await DocumentStore.open(eventlog.js)


@contextlib.asynccontextmanager
async def projecting(log: EventLog, pool: asyncpg.Pool, store: DocumentStore) -> AsyncIterator:
    runner = ProjectionRunner(log, pool, KnowledgeProjection(store, HashingEmbedder()))
    task = asyncio.create_task(runner.run())
    try:
        yield runner
    finally:
        await runner.stop()
        await task


async def _add(log: EventLog, store: DocumentStore, name: str, data: bytes, scope: str = "global"):
    return await add_document(
        log, store, name=name, data=data, scope=scope, added_by="console:test", limits=LIMITS
    )


async def _chunks(pool: asyncpg.Pool) -> list[tuple]:
    rows = await pool.fetch(f"SELECT {_CHUNK_COLUMNS} FROM knowledge_chunks ORDER BY id")
    return [tuple(r) for r in rows]


def _has_documents(pool: asyncpg.Pool, count: int):
    async def check() -> bool:
        return await pool.fetchval("SELECT count(*) FROM knowledge_documents") == count

    return check


async def test_documents_are_chunked_embedded_and_rebuilt_the_same(
    eventlog: EventLog, pool: asyncpg.Pool, store: DocumentStore
) -> None:
    guide = await _add(eventlog, store, "docs/guide.md", GUIDE_MD.encode())
    page = await _add(eventlog, store, "hours.html", PAGE_HTML.encode(), "guild:77")
    menu = await _add(eventlog, store, "menu.pdf", pdf_with_text("Soup of the day is lentil"))
    async with projecting(eventlog, pool, store):
        await eventually(_has_documents(pool, 3))
    text = (await store.get(guide.text)).decode()
    expected = chunk_text(text, tokens=LIMITS.chunk_tokens, overlap=LIMITS.chunk_overlap)
    rows = await pool.fetch(
        "SELECT id, index, heading, content, embedder FROM knowledge_chunks"
        " WHERE document = $1 ORDER BY index",
        guide.document,
    )
    assert [(r["index"], r["heading"], r["content"]) for r in rows] == [
        (c.index, c.heading, c.text) for c in expected
    ]
    assert rows[0]["id"] == f"{guide.document}:0" and rows[0]["embedder"] == "hashing-v1"
    assert guide.title == "guide.md" and guide.media_type == "text/markdown"
    listed = await find_document(pool, page.document)
    assert listed is not None and listed.scope == "guild:77" and listed.chunks >= 1
    pdf = await pool.fetchval(
        "SELECT content FROM knowledge_chunks WHERE document = $1", menu.document
    )
    assert "lentil" in pdf
    before = await _chunks(pool)
    assert len(before) == await pool.fetchval("SELECT sum(chunks) FROM knowledge_documents")

    applied = await rebuild(eventlog, pool, KnowledgeProjection(store, HashingEmbedder()))
    assert applied == 3
    assert await _chunks(pool) == before


async def test_a_removed_document_goes_and_stays_gone_after_a_rebuild(
    eventlog: EventLog, pool: asyncpg.Pool, store: DocumentStore
) -> None:
    kept = await _add(eventlog, store, "guide.md", GUIDE_MD.encode())
    gone = await _add(eventlog, store, "hours.html", PAGE_HTML.encode())
    async with projecting(eventlog, pool, store):
        await eventually(_has_documents(pool, 2))
        row = await find_document(pool, gone.document)
        assert row is not None
        removed = await remove_document(eventlog, store, row, removed_by="console:test")
        await eventually(_has_documents(pool, 1))
    assert isinstance(removed, KnowledgeRemoved) and removed.conversation == "global"
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM knowledge_chunks WHERE document = $1", gone.document
        )
        == 0
    )
    with pytest.raises(DocumentMissing):
        await store.get(gone.text)
    before = await _chunks(pool)

    await rebuild(eventlog, pool, KnowledgeProjection(store, HashingEmbedder()))
    assert await _chunks(pool) == before
    assert {r.document for r in [await find_document(pool, kept.document)] if r} == {kept.document}


async def test_a_refused_document_leaves_nothing_behind(
    eventlog: EventLog, store: DocumentStore
) -> None:
    with pytest.raises(DocumentRejected, match="not UTF-8"):
        await _add(eventlog, store, "bad.txt", b"\xff\xfe bad")
    with pytest.raises(DocumentRejected, match="over the limit"):
        await _add(eventlog, store, "big.txt", b"a" * (LIMITS.max_bytes + 1))
    assert await stream_events(eventlog.js, "LIBRA", "libra.knowledge.>") == []
    assert (await eventlog.js.stream_info("OBJ_libra-knowledge")).state.messages == 0


async def test_a_document_whose_publish_fails_leaves_no_objects(
    eventlog: EventLog, store: DocumentStore
) -> None:
    class Down(Exception):
        pass

    async def refuse(_event) -> int:
        raise Down

    eventlog.publish = refuse  # type: ignore[method-assign]
    with pytest.raises(Down):
        await _add(eventlog, store, "guide.md", GUIDE_MD.encode())
    with pytest.raises(NotFoundError):  # nats-py's answer for a bucket with no live objects
        await store.store.list(ignore_deletes=True)


async def test_hybrid_search_finds_the_answer_within_the_turns_scopes(
    eventlog: EventLog, pool: asyncpg.Pool, store: DocumentStore
) -> None:
    await _add(eventlog, store, "guide.md", GUIDE_MD.encode())
    await _add(eventlog, store, "hours.html", PAGE_HTML.encode(), "guild:77")
    await _add(eventlog, store, "mine.txt", b"My cat is called Miso.", "user:discord:5")
    async with projecting(eventlog, pool, store):
        await eventually(_has_documents(pool, 3))
    search = KnowledgeSearch(pool, HashingEmbedder())
    question = "When does the bakery open in the morning?"

    everywhere = ["global", "guild:77", "user:discord:5"]
    for mode in ("hybrid", "vector", "text"):
        hits = await search.search(question, everywhere, k=2, mode=mode)
        assert "opens at seven" in hits[0].text, mode
        assert hits[0].title == "hours.html" and hits[0].scope == "guild:77"
    hybrid = await search.search(question, everywhere, k=3)
    assert [h.score for h in hybrid] == sorted((h.score for h in hybrid), reverse=True)

    elsewhere = await search.search(question, ["global", "guild:78"], k=5)
    assert elsewhere and all(h.scope == "global" for h in elsewhere)
    assert not any("bakery" in h.text for h in elsewhere)
    cat = await search.search("what is my cat called", ["global", "user:discord:5"], k=1)
    assert "Miso" in cat[0].text
    assert await search.search("what is my cat called", ["user:discord:6"], k=3) == []
    assert await search.has_any(["guild:77"]) and not await search.has_any(["guild:78"])


async def test_the_cli_adds_lists_and_removes(
    settings: Settings, eventlog: EventLog, pool: asyncpg.Pool, store: DocumentStore, tmp_path
) -> None:
    (tmp_path / "guide.md").write_text(GUIDE_MD)
    (tmp_path / "photo.png").write_bytes(b"\x89PNG")
    env = {
        "NATS_URL": settings.nats_url,
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "LOG_LEVEL": "WARNING",
    }
    runner = CliRunner()

    def libra(*args: str):
        return asyncio.to_thread(runner.invoke, main, list(args), env=env)

    added = await libra(
        "knowledge", "add", str(tmp_path / "guide.md"), str(tmp_path / "photo.png"),
        "--guild", "77",
    )  # fmt: skip
    assert added.exit_code == 1  # one of the two was refused, and said why
    assert "added " in added.output and "to guild:77" in added.output
    assert "not added:" in added.output and "not a type Libra reads" in added.output
    [event] = await stream_events(eventlog.js, "LIBRA", "libra.knowledge.>")
    assert isinstance(event, KnowledgeAdded) and event.conversation == "guild-77"
    assert event.user.startswith("console:")

    async with projecting(eventlog, pool, store):
        await eventually(_has_documents(pool, 1))
        listed = await libra("knowledge", "list", "--guild", "77")
        assert event.document in listed.output and "guide.md" in listed.output
        assert "no documents" in (await libra("knowledge", "list")).output
        removed = await libra("knowledge", "remove", event.document)
        assert removed.exit_code == 0, removed.output
        await eventually(_has_documents(pool, 0))
    assert (await libra("knowledge", "remove", event.document)).exit_code == 1
    bad = await libra("knowledge", "add", str(tmp_path / "guide.md"), "--user", "42")
    assert bad.exit_code == 2 and "not a knowledge scope" in bad.output


async def test_the_knowledge_login_folds_documents_and_writes_no_objects(
    eventlog: EventLog, pool: asyncpg.Pool, store: DocumentStore, nats_server
) -> None:
    await _add(eventlog, store, "guide.md", GUIDE_MD.encode())
    log = await EventLog.connect(nats_server.url_for("knowledge"), name="test-knowledge")
    try:
        own = await DocumentStore.open(log.js)
        async with projecting(log, pool, own):
            await eventually(_has_documents(pool, 1))
        with pytest.raises(Exception):  # noqa: B017 - a permissions violation or a timeout
            await own.put("anything/source", b"not allowed")
    finally:
        await log.close()
    assert await pool.fetchval("SELECT error FROM knowledge_documents") == ""
