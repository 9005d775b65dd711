"""Memory in pgvector: remember, recall by similarity within a user's conversation, forget."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from libra.ops.fakes.llm_wire import EMBEDDINGS, FakeLlmWire
from libra.processors.memory.embedders import DIMENSIONS, HashingEmbedder, build_embedder
from libra.processors.memory.store import MemoryStore
from libra.runtime.config import Settings

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


@pytest.fixture
def store(pool) -> MemoryStore:
    return MemoryStore(pool, HashingEmbedder())


async def _remember(
    store: MemoryStore, n: int, content: str, *, user="u1", conversation="c1", at=NOW
):
    return await store.remember(
        event_id=f"e{n}", user=user, conversation=conversation, turn=f"t{n}", content=content, at=at
    )


def test_hashing_embedder_ranks_related_text_higher() -> None:
    embed = HashingEmbedder().vector
    dog = embed("My dog Biscuit loves running on the beach")
    assert dog.shape == (DIMENSIONS,) and abs(float(np.linalg.norm(dog)) - 1) < 1e-5
    related = float(dog @ embed("What is my dog called?"))
    unrelated = float(dog @ embed("The quarterly tax report is due on Friday"))
    assert related > unrelated
    korean = embed("우리 강아지 이름은 비스킷이에요")
    assert float(korean @ embed("강아지 이름이 뭐였지?")) > float(
        korean @ embed("세금 신고는 금요일까지")
    )


async def test_recall_is_scoped_and_ranked(store: MemoryStore) -> None:
    await _remember(store, 1, "User: my dog is Biscuit\nLibra: lovely name")
    await _remember(store, 2, "User: I work as a nurse\nLibra: thank you for your work")
    await _remember(store, 3, "User: my dog is Rex\nLibra: nice", user="u2")
    await _remember(store, 4, "User: my dog is Max\nLibra: nice", conversation="c2")
    found = await store.recall(user="u1", conversation="c1", text="what's my dog's name?", k=2)
    assert found[0].startswith("User: my dog is Biscuit") and len(found) == 2
    assert await store.recall(user="u9", conversation="c1", text="dog", k=3) == []


async def test_reset_forgets_what_came_before_whatever_the_order(store: MemoryStore, pool) -> None:
    await _remember(store, 1, "User: old fact\nLibra: ok", at=NOW - timedelta(minutes=5))
    await store.forget(event_id="r1", user="u1", conversation="c1", at=NOW)
    assert await pool.fetchval("SELECT count(*) FROM memories") == 0
    # an exchange from before the reset, handled late, stays forgotten; a later one is kept
    assert not await _remember(
        store, 2, "User: late old fact\nLibra: ok", at=NOW - timedelta(minutes=1)
    )
    assert await _remember(store, 3, "User: new fact\nLibra: ok", at=NOW + timedelta(minutes=1))
    assert await pool.fetchval("SELECT array_agg(event_id) FROM memories") == ["e3"]


async def test_reset_of_all_conversations(store: MemoryStore, pool) -> None:
    await _remember(store, 1, "a", conversation="c1")
    await _remember(store, 2, "b", conversation="c2")
    await _remember(store, 3, "c", user="u2")
    await store.forget(event_id="r", user="u1", conversation=None, at=NOW + timedelta(seconds=1))
    assert await pool.fetchval("SELECT array_agg(event_id) FROM memories") == ["e3"]


async def test_a_recall_ranks_the_persons_memories_exactly(store: MemoryStore, pool) -> None:
    # no approximate index over everyone's memories: each write would pay a graph insertion,
    # and a filtered approximate scan can miss a person's few rows among many
    indexes = await pool.fetchval(
        "SELECT array_agg(indexdef) FROM pg_indexes WHERE tablename = 'memories'"
    )
    assert not any("hnsw" in i or "ivfflat" in i for i in indexes)
    assert any("(user_id, conversation, embedder)" in i for i in indexes)  # the owner's B-tree
    for i in range(30):
        await _remember(store, 100 + i, f"User: other {i}\nLibra: ok", user=f"other{i}")
    await _remember(store, 1, "User: my cat is Mochi\nLibra: cute")
    await _remember(store, 2, "User: I live in Seoul\nLibra: nice")
    recalled = await store.recall(user="u1", conversation="c1", text="my cat", k=2)
    assert recalled[0].startswith("User: my cat") and len(recalled) == 2


async def test_every_pooled_connection_searches_hnsw_wide(pool) -> None:
    # a knowledge search filters by scope after the index scan: it must look wider than
    # pgvector's 40, set for the session since a search is one query without a transaction
    values = await asyncio.gather(*(pool.fetchval("SHOW hnsw.ef_search") for _ in range(3)))
    assert values == ["200"] * 3


async def test_openai_embeddings_when_a_key_is_set(pool) -> None:
    async with FakeLlmWire() as wire:
        settings = Settings.from_env(
            {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": f"{wire.url}/v1"}
        )
        embedder = build_embedder(settings)
        store = MemoryStore(pool, embedder)
        await _remember(store, 1, "User: my cat is Mochi\nLibra: cute")
        assert await store.recall(user="u1", conversation="c1", text="cat", k=1)
        [request] = [r for r in wire.calls(EMBEDDINGS)][:1]
        assert request.body["dimensions"] == DIMENSIONS and embedder.name.startswith("openai:")
        # a person with no memories yet costs no call to the API
        asked = len(wire.calls(EMBEDDINGS))
        assert await store.recall(user="u9", conversation="c1", text="cat", k=1) == []
        assert len(wire.calls(EMBEDDINGS)) == asked
    assert build_embedder(Settings.from_env({})).name == "hashing-v1"
    ollama = build_embedder(
        Settings.from_env({"OLLAMA_URL": "http://x:11434", "EMBEDDING_MODEL": "nomic"})
    )
    assert ollama.name == "compat:nomic"


async def test_a_hanging_embeddings_api_costs_a_prompt_its_memories_not_its_reply(pool) -> None:
    from libra.contracts import Origin, TurnAccepted, make
    from libra.ops.fakes.llm_wire import Behaviour
    from libra.processors.llm.context import PromptBuilder

    async with FakeLlmWire() as wire:
        settings = Settings.from_env(
            {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": f"{wire.url}/v1"}
        )
        store = MemoryStore(pool, build_embedder(settings))
        await _remember(store, 1, "User: my cat is Mochi\nLibra: cute", conversation="http-u1")
        wire.always(EMBEDDINGS, Behaviour.hang())
        prompts = PromptBuilder(pool, store, recall_budget_s=0.2)
        turn = make(
            TurnAccepted,
            conversation="http-u1",
            user="u1",
            text="what is my cat called?",
            origin=Origin(platform="http"),
        )
        began = asyncio.get_running_loop().time()
        context = await prompts.context(turn)
        took = asyncio.get_running_loop().time() - began
        assert context.memories == [] and context.degraded == ()
        assert took < 1.5, f"the prompt waited {took:.2f}s for a hanging embeddings API"
        assert wire.calls(EMBEDDINGS)[-1].body["input"] == ["what is my cat called?"]
