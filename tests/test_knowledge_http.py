"""``/api/knowledge`` on real JetStream and PostgreSQL: upload, list and remove; scopes by caller;
refusals that add nothing."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import asyncpg
import httpx
import jwt
import pytest
import redis.asyncio as aioredis

from libra.gateway.http.app import create_app
from libra.gateway.http.auth import Authenticator
from libra.processors.knowledge.documents import Limits
from libra.processors.memory.embedders import HashingEmbedder
from libra.projections.knowledge import KnowledgeProjection
from libra.runtime.documents import DocumentStore
from libra.runtime.eventlog import EventLog
from libra.runtime.projection import ProjectionRunner

from .helpers import eventually, stream_events
from .knowledge_docs import GUIDE_MD, PAGE_HTML

KEY = "service-key-for-the-knowledge-tests"
SECRET = "jwt-secret-for-the-knowledge-tests-0123"
LIMITS = Limits(max_bytes=10_000, chunk_tokens=100, chunk_overlap=10)


def _person(sub: str) -> dict[str, str]:
    token = jwt.encode({"sub": sub, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")
    return {"Authorization": f"Bearer {token}"}


SERVICE = {"X-API-Key": KEY}


@pytest.fixture
async def api(eventlog: EventLog, pool: asyncpg.Pool, redis_url: str) -> AsyncIterator:
    async def the_pool() -> asyncpg.Pool:
        return pool

    auth = Authenticator(api_key=KEY, jwt_secret=SECRET)
    redis = aioredis.from_url(redis_url)
    app = create_app(
        eventlog,
        pool=the_pool,
        redis=redis,
        auth=auth,
        llm_status=lambda: "ok",
        max_body_bytes=1_000_000,
        knowledge=LIMITS,
    )
    runner = ProjectionRunner(
        eventlog,
        pool,
        KnowledgeProjection(await DocumentStore.open(eventlog.js), HashingEmbedder()),
    )
    task = asyncio.create_task(runner.run())
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            yield http
    finally:
        await runner.stop()
        await task
        await redis.aclose()


async def _listed(http: httpx.AsyncClient, headers: dict[str, str], count: int, **params):
    found: list = []

    async def check() -> bool:
        answer = await http.get("/api/knowledge", headers=headers, params=params)
        found[:] = answer.json()["documents"]
        return len(found) == count

    with contextlib.suppress(AssertionError):
        await eventually(check)
    return found


async def test_upload_list_and_remove_with_a_service_key(
    api: httpx.AsyncClient, eventlog: EventLog
) -> None:
    answer = await api.post(
        "/api/knowledge",
        headers=SERVICE,
        data={"scope": "guild:77"},
        files=[
            ("file", ("guide.md", GUIDE_MD.encode(), "text/markdown")),
            ("file", ("hours.html", PAGE_HTML.encode(), "text/html")),
        ],
    )
    assert answer.status_code == 201, answer.text
    added = answer.json()["documents"]
    assert [(d["title"], d["scope"], d["mediaType"]) for d in added] == [
        ("guide.md", "guild:77", "text/markdown"),
        ("hours.html", "guild:77", "text/html"),
    ]
    listed = await _listed(api, SERVICE, 2, scope="guild:77")
    assert {d["document"] for d in listed} == {d["document"] for d in added}
    assert all(d["chunks"] >= 1 and d["addedBy"] == "http:service" for d in listed)
    assert await _listed(api, SERVICE, 0, scope="global") == []

    gone = await api.delete(f"/api/knowledge/{added[0]['document']}", headers=SERVICE)
    assert gone.status_code == 200 and gone.json()["removed"] is True
    assert [d["title"] for d in await _listed(api, SERVICE, 1)] == ["hours.html"]
    assert (await api.delete("/api/knowledge/nothing-here", headers=SERVICE)).status_code == 404
    kinds = [
        type(e).__name__ for e in await stream_events(eventlog.js, "LIBRA", "libra.knowledge.>")
    ]
    assert kinds == ["KnowledgeAdded", "KnowledgeAdded", "KnowledgeRemoved"]


async def test_a_person_uses_only_their_own_scope(api: httpx.AsyncClient) -> None:
    alice, bob = _person("alice"), _person("bob")
    mine = await api.post(
        "/api/knowledge", headers=alice, files={"file": ("notes.txt", b"My cat is Miso.")}
    )
    assert mine.status_code == 201 and mine.json()["documents"][0]["scope"] == "user:http:alice"
    document = mine.json()["documents"][0]["document"]
    other = await api.post(
        "/api/knowledge", headers=alice, data={"scope": "global"},
        files={"file": ("notes.txt", b"Everyone's cat.")},
    )  # fmt: skip
    assert other.status_code == 403
    assert len(await _listed(api, alice, 1)) == 1
    assert await _listed(api, bob, 0) == []
    assert (
        await api.get("/api/knowledge", headers=bob, params={"scope": "user:http:alice"})
    ).status_code == 403
    assert (await api.delete(f"/api/knowledge/{document}", headers=bob)).status_code == 404
    assert (await api.delete(f"/api/knowledge/{document}", headers=alice)).status_code == 200
    assert (await api.get("/api/knowledge")).status_code == 401


@pytest.mark.parametrize(
    ("files", "status", "why"),
    [
        ([("file", ("photo.png", b"\x89PNG", "image/png"))], 400, "not a type Libra reads"),
        ([("file", ("empty.txt", b"", "text/plain"))], 400, "is empty"),
        ([("file", ("bad.txt", b"\xff\xfe", "text/plain"))], 400, "not UTF-8"),
        ([("file", ("bad.pdf", b"%PDF-1.4 nonsense", "application/pdf"))], 400, "not a PDF"),
        ([("file", ("big.txt", b"a" * 10_001, "text/plain"))], 413, "over 10,000 bytes"),
        (
            [
                ("file", ("good.md", GUIDE_MD.encode(), "text/markdown")),
                ("file", ("photo.png", b"\x89PNG", "image/png")),
            ],
            400,
            "nothing was added",
        ),
    ],
)
async def test_a_bad_document_refuses_the_request_and_adds_nothing(
    api: httpx.AsyncClient, eventlog: EventLog, files, status: int, why: str
) -> None:
    answer = await api.post("/api/knowledge", headers=SERVICE, files=files)
    assert answer.status_code == status and why in answer.json()["message"]
    assert await stream_events(eventlog.js, "LIBRA", "libra.knowledge.>") == []
    assert (await eventlog.js.stream_info("OBJ_libra-knowledge")).state.messages == 0


async def test_a_bad_scope_and_a_missing_file_are_refused(api: httpx.AsyncClient) -> None:
    bad = await api.post(
        "/api/knowledge", headers=SERVICE, data={"scope": "server:1"},
        files={"file": ("notes.txt", b"hello")},
    )  # fmt: skip
    assert bad.status_code == 400 and "not a knowledge scope" in bad.json()["message"]
    none = await api.post("/api/knowledge", headers=SERVICE, data={"scope": "global"})
    assert none.status_code == 400
