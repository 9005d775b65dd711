"""Knowledge in the prompt, end to end: a document added, a question asked over HTTP, the
numbered sources in what the model was sent, the sources recorded in ``llm.completed``, and a
replay that gives the turn the recorded sources again after the document is gone."""

from __future__ import annotations

import httpx
import pytest

from libra.contracts import LlmCompleted
from libra.ops.fakes.llm_wire import OPENAI_CHAT, Behaviour, FakeLlmWire
from libra.ops.replay import REPLAY_STREAM, Selection, replay
from libra.processors.knowledge.documents import (
    Limits,
    add_document,
    find_document,
    remove_document,
)
from libra.runtime.documents import DocumentStore

from .helpers import eventually, stream_events, wait_http
from .knowledge_docs import GUIDE_MD, PAGE_HTML
from .stack import TEXT_PIPELINE, answering_with, running

REPLY = "The bakery opens at seven in the morning [1]."
LIMITS = Limits(max_bytes=1_000_000, chunk_tokens=200, chunk_overlap=20)


@pytest.fixture
async def wire():
    async with FakeLlmWire(reply=Behaviour.ok(REPLY)) as fake:
        yield fake


async def test_sources_go_into_the_prompt_and_the_record_and_replay_reuses_them(
    settings, eventlog, wire, pool
) -> None:
    s = answering_with(settings, wire)
    async with running(s, [*TEXT_PIPELINE, "knowledge", "http"]) as resources:
        store = await DocumentStore.open(resources.log.js)
        common = {"added_by": "console:test", "limits": LIMITS}
        page = await add_document(
            resources.log, store, name="hours.html", data=PAGE_HTML.encode(), scope="global",
            **common,
        )  # fmt: skip
        await add_document(
            resources.log, store, name="guide.md", data=GUIDE_MD.encode(), scope="guild:9",
            **common,
        )  # fmt: skip

        async def projected() -> bool:
            return await pool.fetchval("SELECT count(*) FROM knowledge_documents") == 2

        await eventually(projected)
        await wait_http(s.http_port)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{s.http_port}", timeout=20
        ) as http:
            answer = await http.post(
                "/api/chat/completions",
                json={"userId": "carol", "message": "When does the bakery open?"},
            )
        assert answer.status_code == 200 and answer.json()["content"] == REPLY

        system = wire.calls(OPENAI_CHAT)[-1].messages[0]["content"]
        assert "[1] hours.html\nOpening hours\n\nThe bakery opens" in system
        assert "The bakery opens at seven in the morning." in system
        assert "cite it by its number in brackets, like [1]" in system
        assert "Libra guide" not in system  # a Discord server's document: not for this turn

        [completed] = [
            e
            for e in await stream_events(resources.log.js, "LIBRA", "libra.llm.completed.>")
            if isinstance(e, LlmCompleted)
        ]
        [source] = completed.knowledge
        assert source.chunk == f"{page.document}:0" and source.document == page.document
        assert source.title == "hours.html" and source.scope == "global"
        assert "opens at seven" in source.text and source.score > 0

        row = await find_document(pool, page.document)
        await remove_document(resources.log, store, row, removed_by="console:test")

        async def removed() -> bool:
            return (
                await pool.fetchval("SELECT count(*) FROM knowledge_chunks")
                == (await pool.fetchval("SELECT sum(chunks) FROM knowledge_documents") or 0)
                and await find_document(pool, page.document) is None
            )

        await eventually(removed)

    wire.reset()
    result = await replay(s, "llm", Selection(conversation="http-carol"), run="k1")
    assert result.inputs == 1 and result.errors == 0
    system = wire.calls(OPENAI_CHAT)[-1].messages[0]["content"]
    assert "[1] hours.html" in system and "opens at seven" in system  # the record, not a search
    [again] = await stream_events(eventlog.js, REPLAY_STREAM, "replay.k1.llm.completed.>")
    assert again.knowledge == completed.knowledge
