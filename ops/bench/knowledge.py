"""`libra bench knowledge`: ingestion, search latency by size, and retrieval quality.

- Ingestion: documents added as `libra knowledge add` adds them (bucket + ``knowledge.added``)
  and folded by the knowledge projection (chunked, embedded, written), in chunks/s from the
  first publish to the last chunk in PostgreSQL; beside it, the bare work of chunking and
  embedding the same text with no log and no database.
- Search: hybrid (vector + full-text, fused) latency p50/p99 at each size, with vector-only and
  text-only beside it; the query's embedding included. The filler chunks are synthetic (random
  words, random unit vectors) and copied straight into the table: what is measured is the
  search, not how the filler was made.
- Quality: recall@1 and recall@k (k = KNOWLEDGE_TOP_K) over the questions of
  ``knowledge_corpus``, for each method; a question is answered when a chunk among the first k
  holds the phrase that answers it.

The embedder is the configured one (the local hashing embedder with nothing configured).
"""

from __future__ import annotations

import asyncio
import random
import time

import asyncpg
import numpy as np

from libra.processors.knowledge.chunking import chunk_text
from libra.processors.knowledge.documents import Limits, add_document
from libra.processors.knowledge.parsing import read
from libra.processors.knowledge.search import KnowledgeSearch, Mode
from libra.processors.memory.embedders import DIMENSIONS, build_embedder
from libra.projections.knowledge import KnowledgeProjection
from libra.runtime.config import Settings
from libra.runtime.database import connect_pool, migrate
from libra.runtime.documents import DocumentStore
from libra.runtime.eventlog import EventLog
from libra.runtime.projection import ProjectionRunner

from .common import percentile, report, servers
from .knowledge_corpus import DOCUMENTS, QUESTIONS

__all__ = ["run_bench_knowledge"]

MODES: tuple[Mode, ...] = ("hybrid", "vector", "text")
_SCOPES = ("global", "guild:1", "guild:2", "user:discord:3")
_WORDS = [
    "river",
    "stone",
    "lantern",
    "orchard",
    "cable",
    "harbour",
    "meadow",
    "signal",
    "copper",
    "violet",
    "engine",
    "ledger",
    "summit",
    "willow",
    "parcel",
    "canvas",
    "tunnel",
    "beacon",
    "cedar",
    "falcon",
    "quarry",
    "ribbon",
    "saddle",
    "thimble",
]


_FILL_BATCH = 2000
_FILL_COLUMNS = ["id", "document", "scope", "index", "heading", "content", "embedder", "embedding"]


QUALITY_SCOPE = "guild:42"  # the corpus once, alone: copies of one chunk would fill the top k


def _ingest_texts(copies: int) -> list[tuple[str, bytes, str]]:
    """The corpus once in its own scope, then ``copies`` times over (each copy a little
    different: a number in it) in the global one."""
    return [(name, text.encode(), QUALITY_SCOPE) for name, text in DOCUMENTS.items()] + [
        (f"{n}-{name}", f"{text}\n\nCopy {n}.".encode(), "global")
        for n in range(copies)
        for name, text in DOCUMENTS.items()
    ]


async def _ingestion(
    log: EventLog, pool: asyncpg.Pool, settings: Settings, copies: int
) -> dict[str, float]:
    embedder = build_embedder(settings)
    store = await DocumentStore.open(log.js)
    files = _ingest_texts(copies)
    limits = Limits.from_settings(settings)
    started = time.perf_counter()
    bare_chunks = 0
    for name, data, _ in files:
        chunks = chunk_text(
            read(name, data, max_bytes=0).text,
            tokens=limits.chunk_tokens,
            overlap=limits.chunk_overlap,
        )
        await embedder.embed([c.text for c in chunks])
        bare_chunks += len(chunks)
    bare_s = time.perf_counter() - started

    runner = ProjectionRunner(log, pool, KnowledgeProjection(store, embedder), batch_size=16)
    task = asyncio.create_task(runner.run())
    started = time.perf_counter()
    for name, data, scope in files:
        await add_document(
            log, store, name=name, data=data, scope=scope, added_by="console:bench", limits=limits
        )
    while await pool.fetchval("SELECT count(*) FROM knowledge_documents") < len(files):
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - started
    await runner.stop()
    await task
    chunks = await pool.fetchval("SELECT count(*) FROM knowledge_chunks")
    return {
        "documents": len(files),
        "chunks": chunks,
        "chunks_per_s": chunks / elapsed,
        "bare_chunk_and_embed_per_s": bare_chunks / bare_s,
    }


async def _quality(search: KnowledgeSearch, k: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for mode in MODES:
        first = top = 0
        for question, phrase in QUESTIONS:
            hits = await search.search(question, [QUALITY_SCOPE], k=k, mode=mode)
            first += bool(hits) and phrase in hits[0].text
            top += any(phrase in h.text for h in hits)
        out[mode] = {"recall_at_1": first / len(QUESTIONS), f"recall_at_{k}": top / len(QUESTIONS)}
    return out


async def _fill(pool: asyncpg.Pool, embedder_name: str, upto: int) -> None:
    """Adds synthetic chunks until the table holds ``upto``."""
    have = await pool.fetchval("SELECT count(*) FROM knowledge_chunks")
    rng = np.random.default_rng(have)
    words = random.Random(have)
    rows = []
    for n in range(have, upto):
        vector = rng.standard_normal(DIMENSIONS).astype(np.float32)
        text = " ".join(words.choices(_WORDS, k=120))
        rows.append(
            (
                f"filler:{n}",
                "filler",
                _SCOPES[n % len(_SCOPES)],
                n,
                "",
                text,
                embedder_name,
                vector / np.linalg.norm(vector),
            )
        )
    async with pool.acquire() as conn:
        # The HNSW index is built once over the whole table, as after a bulk load: inserting
        # row by row into it would take hours for 100k random 1024-wide vectors on 2 cores.
        await conn.execute("DROP INDEX IF EXISTS knowledge_chunks_embedding")
        for at in range(0, len(rows), _FILL_BATCH):
            await conn.copy_records_to_table(
                "knowledge_chunks",
                records=rows[at : at + _FILL_BATCH],
                columns=_FILL_COLUMNS,
                timeout=3600,
            )
        await conn.execute("SET maintenance_work_mem = '1GB'")
        await conn.execute(
            "CREATE INDEX knowledge_chunks_embedding ON knowledge_chunks"
            " USING hnsw (embedding vector_cosine_ops)",
            timeout=7200,
        )
        await conn.execute(
            "INSERT INTO knowledge_documents (document, scope, title, media_type, size, sha256,"
            " added_by, added_at) VALUES ('filler', 'global', 'filler', 'text/plain', 0, '',"
            " 'console:bench', now()) ON CONFLICT DO NOTHING"
        )
        await conn.execute("ANALYZE knowledge_chunks")


async def _latency(search: KnowledgeSearch, k: int, queries: int) -> dict[str, float]:
    out: dict[str, float] = {}
    scopes = ["global", "guild:1", "user:discord:3"]
    for mode in MODES:
        times = []
        for n in range(queries):
            question = QUESTIONS[n % len(QUESTIONS)][0]
            started = time.perf_counter()
            await search.search(question, scopes, k=k, mode=mode)
            times.append((time.perf_counter() - started) * 1000)
        out[f"{mode}_p50_ms"] = percentile(times, 50)
        out[f"{mode}_p99_ms"] = percentile(times, 99)
    return out


async def run_bench_knowledge(
    settings: Settings, *, sizes: list[int], queries: int, as_json: bool, copies: int = 20
) -> dict:
    """Runs every figure of the knowledge benchmark and prints them."""
    async with servers(settings, postgres=True) as srv:
        await migrate(srv.database_url)
        log = await EventLog.connect(srv.nats_nosync_url, name="libra-bench-knowledge")
        pool = await connect_pool(srv.database_url)
        try:
            await log.provision(settings)
            embedder = build_embedder(settings)
            search = KnowledgeSearch(pool, embedder)
            k = settings.knowledge_top_k
            ingestion = await _ingestion(log, pool, settings, copies)
            quality = await _quality(search, k)
            latency = {}
            for size in sorted(sizes):
                await _fill(pool, embedder.name, size)
                latency[f"{size}_chunks"] = await _latency(search, k, queries)
        finally:
            await pool.close()
            await log.close()
    results = {
        "embedder": embedder.name,
        "k": k,
        "ingestion": ingestion,
        "quality": quality,
        "search": latency,
    }
    report(results, as_json=as_json, title="libra bench knowledge")
    return results
