"""The provider chain over the real SDKs and the loopback fake: retries, timeouts, breaker,
fallback, and never switching providers in the middle of a reply."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from prometheus_client import REGISTRY

from libra.ops.fakes.llm_wire import (
    ANTHROPIC_MESSAGES,
    GROQ_CHAT,
    OLLAMA_CHAT,
    OPENAI_CHAT,
    Behaviour,
    FakeLlmWire,
)
from libra.processors.llm.chain import AllProvidersFailed, ChainResult, ProviderChain
from libra.processors.llm.providers import DEFAULT_MODELS, build_targets
from libra.processors.llm.providers.base import ChatMessage
from libra.runtime.config import Settings

GROQ, OPENAI = DEFAULT_MODELS["groq"], DEFAULT_MODELS["openai"]
PROMPT = (ChatMessage(role="user", content="Tell me something."),)
TEXT = "One two three four five six."


@pytest.fixture
async def wire() -> AsyncIterator[FakeLlmWire]:
    async with FakeLlmWire(reply=Behaviour.ok(TEXT)) as fake:
        yield fake


@pytest.fixture
async def make_chain(wire: FakeLlmWire) -> AsyncIterator[Callable[..., ProviderChain]]:
    """Builds chains over the fake (groq, then openai unless told), closed after the test."""
    chains: list[ProviderChain] = []

    def make(providers: str = "groq,openai", timeout: str = "2", **knobs: Any) -> ProviderChain:
        env = {
            **wire.env(),
            "GROQ_API_KEY": "gsk_test",
            "OPENAI_API_KEY": "sk-test",
            "ANTHROPIC_API_KEY": "sk-ant-test",
            "LLM_PROVIDERS": providers,
            "LLM_TIMEOUT_SEC": timeout,
        }
        settings = Settings.from_env(env)
        knobs = {
            "timeout": settings.llm_timeout_sec,
            "retries": 2,
            "backoff": 0.01,
            "backoff_max": 0.02,
            **knobs,
        }
        chain = ProviderChain(build_targets(settings), **knobs)
        chains.append(chain)
        return chain

    yield make
    for chain in chains:
        await chain.aclose()


async def _reply(chain: ProviderChain, **kwargs: Any) -> tuple[list[str], ChainResult]:
    pieces: list[str] = []
    result = None
    async for item in chain.stream(PROMPT, max_tokens=64, temperature=0.2, **kwargs):
        if isinstance(item, ChainResult):
            result = item
        else:
            assert result is None, "a piece came after the result"
            pieces.append(item)
    assert result is not None
    return pieces, result


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _errors(result: ChainResult | AllProvidersFailed) -> list[tuple[str, str]]:
    return [(a.provider, a.error) for a in result.attempts]


async def test_streams_the_first_providers_reply(
    wire: FakeLlmWire, make_chain: Callable[..., ProviderChain]
) -> None:
    chain = make_chain()
    ok_before = _metric("libra_llm_requests_total", provider="groq", model=GROQ, outcome="ok")
    completion_before = _metric(
        "llm_tokens_used_total", provider="groq", model=GROQ, kind="completion"
    )
    first_before = _metric("libra_llm_first_token_seconds_count", provider="groq")

    pieces, result = await _reply(chain)

    assert "".join(pieces) == TEXT
    assert len(pieces) == 6
    assert (result.provider, result.model, result.attempts) == ("groq", GROQ, ())
    assert result.usage.completion_tokens == 6
    assert 0 < result.ttft_ms <= result.total_ms
    assert wire.count(OPENAI_CHAT) == 0
    ok_after = _metric("libra_llm_requests_total", provider="groq", model=GROQ, outcome="ok")
    assert ok_after == ok_before + 1
    completion_after = _metric(
        "llm_tokens_used_total", provider="groq", model=GROQ, kind="completion"
    )
    assert completion_after == completion_before + 6
    assert _metric("libra_llm_first_token_seconds_count", provider="groq") == first_before + 1


async def test_a_429_is_retried_after_its_retry_after(
    wire: FakeLlmWire, make_chain: Callable[..., ProviderChain]
) -> None:
    wire.queue(GROQ_CHAT, Behaviour.rate_limited(0.3))
    chain = make_chain()
    started = time.monotonic()
    pieces, result = await _reply(chain)
    assert time.monotonic() - started >= 0.3, "the retry came before Retry-After allowed"
    assert "".join(pieces) == TEXT
    assert result.provider == "groq"
    assert _errors(result) == [("groq", "rate_limited")]
    assert wire.count(GROQ_CHAT) == 2
    assert wire.count(OPENAI_CHAT) == 0


async def test_a_retry_after_beyond_the_cap_moves_on_at_once(
    wire: FakeLlmWire, make_chain: Callable[..., ProviderChain]
) -> None:
    wire.queue(GROQ_CHAT, Behaviour.rate_limited(60))
    chain = make_chain(max_retry_after=5.0)
    started = time.monotonic()
    _, result = await _reply(chain)
    assert time.monotonic() - started < 5
    assert result.provider == "openai"
    assert _errors(result) == [("groq", "rate_limited")]
    assert wire.count(GROQ_CHAT) == 1


async def test_500s_use_up_the_retries_then_fall_back(
    wire: FakeLlmWire, make_chain: Callable[..., ProviderChain]
) -> None:
    wire.always(GROQ_CHAT, Behaviour.error(500))
    chain = make_chain(retries=2)
    fallbacks_before = _metric(
        "libra_llm_fallbacks_total", from_provider="groq", to_provider="openai"
    )
    errors_before = _metric(
        "libra_llm_requests_total", provider="groq", model=GROQ, outcome="server"
    )
    pieces, result = await _reply(chain)
    assert "".join(pieces) == TEXT
    assert (result.provider, result.model) == ("openai", OPENAI)
    assert _errors(result) == [("groq", "server")] * 3
    assert wire.count(GROQ_CHAT) == 3
    assert wire.count(OPENAI_CHAT) == 1
    fallbacks_after = _metric(
        "libra_llm_fallbacks_total", from_provider="groq", to_provider="openai"
    )
    assert fallbacks_after == fallbacks_before + 1
    errors_after = _metric(
        "libra_llm_requests_total", provider="groq", model=GROQ, outcome="server"
    )
    assert errors_after == errors_before + 3


async def test_a_401_is_not_retried(
    wire: FakeLlmWire, make_chain: Callable[..., ProviderChain]
) -> None:
    wire.always(GROQ_CHAT, Behaviour.error(401))
    chain = make_chain(retries=3)
    _, result = await _reply(chain)
    assert result.provider == "openai"
    assert _errors(result) == [("groq", "auth")]
    assert wire.count(GROQ_CHAT) == 1


async def test_a_silent_provider_times_out_and_is_retried(
    wire: FakeLlmWire, make_chain: Callable[..., ProviderChain]
) -> None:
    wire.queue(GROQ_CHAT, Behaviour.hang())
    chain = make_chain(timeout="0.3")
    pieces, result = await _reply(chain)
    assert "".join(pieces) == TEXT
    assert result.provider == "groq"
    assert _errors(result) == [("groq", "timeout")]
    assert 250 <= result.attempts[0].latency_ms < 2000
    assert result.ttft_ms >= 300


async def test_a_slow_first_token_within_the_timeout_is_waited_for(
    wire: FakeLlmWire, make_chain: Callable[..., ProviderChain]
) -> None:
    wire.queue(GROQ_CHAT, Behaviour.ok(TEXT, ttft=0.2, tokens_per_sec=50))
    chain = make_chain(timeout="0.5")
    pieces, result = await _reply(chain)
    assert "".join(pieces) == TEXT
    assert result.attempts == ()
    assert result.ttft_ms >= 200


async def test_a_slow_reader_is_not_a_slow_provider(
    wire: FakeLlmWire, make_chain: Callable[..., ProviderChain]
) -> None:
    wire.queue(GROQ_CHAT, Behaviour.ok("a b c"))
    chain = make_chain(timeout="0.2")
    pieces: list[str] = []
    result = None
    async for item in chain.stream(PROMPT, max_tokens=64, temperature=0.2):
        if isinstance(item, ChainResult):
            result = item
        else:
            pieces.append(item)
            await asyncio.sleep(0.3)  # longer than the timeout, but the wait is ours
    assert pieces == ["a", " b", " c"]
    assert result is not None and result.attempts == ()


async def test_cancelling_a_reply_is_a_cancellation_not_a_timeout(
    wire: FakeLlmWire, make_chain: Callable[..., ProviderChain]
) -> None:
    wire.queue(GROQ_CHAT, Behaviour.hang(after=1, text=TEXT))
    chain = make_chain(timeout="5")
    pieces: list[str | ChainResult] = []

    async def read() -> None:
        async for item in chain.stream(PROMPT, max_tokens=64, temperature=0.2):
            pieces.append(item)

    reader = asyncio.create_task(read())
    await asyncio.sleep(0.3)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert pieces == ["One"]


async def test_a_malformed_reply_before_the_first_piece_is_retried(
    wire: FakeLlmWire, make_chain: Callable[..., ProviderChain]
) -> None:
    wire.queue(GROQ_CHAT, Behaviour.invalid_json(), Behaviour.malformed(after=0))
    chain = make_chain()
    pieces, result = await _reply(chain)
    assert "".join(pieces) == TEXT
    assert _errors(result) == [("groq", "malformed"), ("groq", "malformed")]
    assert wire.count(GROQ_CHAT) == 3


@pytest.mark.parametrize(
    ("behaviour", "cause"),
    [
        (Behaviour.malformed(after=2, text=TEXT), "malformed"),
        (Behaviour.disconnect(after=2, text=TEXT), "connection"),
        (Behaviour.hang(after=2, text=TEXT), "timeout"),
    ],
)
async def test_a_failure_mid_reply_ends_it_without_switching_providers(
    wire: FakeLlmWire,
    make_chain: Callable[..., ProviderChain],
    behaviour: Behaviour,
    cause: str,
) -> None:
    wire.queue(GROQ_CHAT, behaviour)
    chain = make_chain(timeout="0.4")
    interrupted_before = _metric(
        "libra_llm_requests_total", provider="groq", model=GROQ, outcome="interrupted"
    )
    pieces: list[str] = []
    with pytest.raises(AllProvidersFailed) as caught:
        async for item in chain.stream(PROMPT, max_tokens=64, temperature=0.2):
            assert isinstance(item, str)
            pieces.append(item)
    failure = caught.value
    assert pieces == ["One", " two"]
    assert failure.partial_text == "One two"
    assert failure.error == "interrupted"
    assert _errors(failure) == [("groq", "interrupted")]
    assert failure.attempts[0].message.startswith(f"{cause} after 2 pieces (7 characters)")
    assert "broke off after 7 characters" in str(failure)
    assert wire.count(GROQ_CHAT) == 1, "a reply that started must not be retried"
    assert wire.count(OPENAI_CHAT) == 0, "a reply that started must not switch providers"
    interrupted_after = _metric(
        "libra_llm_requests_total", provider="groq", model=GROQ, outcome="interrupted"
    )
    assert interrupted_after == interrupted_before + 1


async def test_when_everything_fails_the_error_reads_well(
    wire: FakeLlmWire, make_chain: Callable[..., ProviderChain]
) -> None:
    wire.always(GROQ_CHAT, Behaviour.error(503))
    wire.always(OPENAI_CHAT, Behaviour.error(401))
    chain = make_chain(retries=1)
    with pytest.raises(AllProvidersFailed) as caught:
        await _reply(chain)
    failure = caught.value
    assert _errors(failure) == [("groq", "server"), ("groq", "server"), ("openai", "auth")]
    assert failure.error == "auth"
    assert failure.partial_text == ""
    assert str(failure) == (
        f"no LLM provider could answer: groq ({GROQ}) had a server error (2 times);"
        f" openai ({OPENAI}) refused the API key"
    )
    assert "sk-test" not in str(failure) + repr(failure.attempts)


async def test_the_breaker_opens_and_later_requests_skip_the_provider(
    wire: FakeLlmWire, make_chain: Callable[..., ProviderChain]
) -> None:
    wire.always(GROQ_CHAT, Behaviour.error(500))
    chain = make_chain(retries=0, breaker_failures=2, breaker_reset=0.5)
    for _ in range(2):
        _, result = await _reply(chain)
        assert _errors(result) == [("groq", "server")]
    assert _metric("libra_llm_breaker_open", provider="groq") == 1
    open_before = _metric(
        "libra_llm_requests_total", provider="groq", model=GROQ, outcome="circuit_open"
    )

    for _ in range(3):
        _, result = await _reply(chain)
        assert result.provider == "openai"
        assert _errors(result) == [("groq", "circuit_open")]
    assert wire.count(GROQ_CHAT) == 2, "an open breaker must not call the provider"
    assert wire.count(OPENAI_CHAT) == 5
    open_after = _metric(
        "libra_llm_requests_total", provider="groq", model=GROQ, outcome="circuit_open"
    )
    assert open_after == open_before + 3

    # After the reset time one request may try again; its success closes the breaker.
    wire.always(GROQ_CHAT, None)
    await asyncio.sleep(0.6)
    _, result = await _reply(chain)
    assert (result.provider, result.attempts) == ("groq", ())
    assert _metric("libra_llm_breaker_open", provider="groq") == 0
    assert wire.count(GROQ_CHAT) == 3


async def test_bad_requests_do_not_trip_the_breaker(
    wire: FakeLlmWire, make_chain: Callable[..., ProviderChain]
) -> None:
    wire.always(GROQ_CHAT, Behaviour.error(400))
    chain = make_chain(retries=2, breaker_failures=1)
    for _ in range(3):
        _, result = await _reply(chain)
        assert _errors(result) == [("groq", "bad_request")]
    assert wire.count(GROQ_CHAT) == 3, "400 is not retried, and never opens the breaker"


async def test_a_reader_that_stops_early_does_not_count_as_a_failure(
    wire: FakeLlmWire, make_chain: Callable[..., ProviderChain]
) -> None:
    wire.always(GROQ_CHAT, Behaviour.ok(TEXT, tokens_per_sec=100))
    chain = make_chain(breaker_failures=1)
    for _ in range(2):
        stream = chain.stream(PROMPT, max_tokens=64, temperature=0.2)
        assert await anext(stream) == "One"
        await stream.aclose()
    _, result = await _reply(chain)
    assert (result.provider, result.attempts) == ("groq", ())


async def test_a_model_override_goes_first(
    wire: FakeLlmWire, make_chain: Callable[..., ProviderChain]
) -> None:
    chain = make_chain()
    _, result = await _reply(chain, model_override="openai:gpt-4.1-mini")
    assert (result.provider, result.model) == ("openai", "gpt-4.1-mini")
    _, result = await _reply(chain, model_override="llama-3.1-8b-instant")
    assert (result.provider, result.model) == ("groq", "llama-3.1-8b-instant")
    assert [r.model for r in wire.calls()] == ["gpt-4.1-mini", "llama-3.1-8b-instant"]

    # A failing override falls back to the usual order.
    wire.queue(OPENAI_CHAT, Behaviour.error(404))
    _, result = await _reply(chain, model_override="openai:no-such-model")
    assert (result.provider, result.model) == ("groq", GROQ)
    assert _errors(result) == [("openai", "bad_request")]
    assert chain.describe() == f"groq:{GROQ},openai:{OPENAI}"
    assert chain.default_model == GROQ


async def test_anthropic_overloaded_falls_back_to_ollama(
    wire: FakeLlmWire, make_chain: Callable[..., ProviderChain]
) -> None:
    wire.always(ANTHROPIC_MESSAGES, Behaviour.error(529))
    chain = make_chain(providers="anthropic,ollama:llama3:8b", retries=1)
    pieces, result = await _reply(chain)
    assert "".join(pieces) == TEXT
    assert (result.provider, result.model) == ("ollama", "llama3:8b")
    assert _errors(result) == [("anthropic", "server")] * 2
    assert wire.calls(OLLAMA_CHAT)[0].model == "llama3:8b"


async def test_alt_model_is_tried_on_the_first_provider_before_the_next(
    wire: FakeLlmWire,
) -> None:
    env = {
        **wire.env(),
        "GROQ_API_KEY": "gsk_test",
        "OPENAI_API_KEY": "sk-test",
        "PRIMARY_MODEL": "big-model",
        "ALT_MODEL": "small-model",
    }
    chain = ProviderChain.from_settings(Settings.from_env(env))
    wire.queue(GROQ_CHAT, Behaviour.error(404))
    try:
        _, result = await _reply(chain)
    finally:
        await chain.aclose()
    assert (result.provider, result.model) == ("groq", "small-model")
    assert [r.model for r in wire.calls(GROQ_CHAT)] == ["big-model", "small-model"]


async def test_two_hundred_replies_stream_at_once(
    wire: FakeLlmWire, make_chain: Callable[..., ProviderChain]
) -> None:
    wire.always(GROQ_CHAT, Behaviour.ok(TEXT, ttft=0.05, tokens_per_sec=200))
    chain = make_chain(timeout="10")
    results = await asyncio.gather(*(_reply(chain) for _ in range(200)))
    assert all("".join(pieces) == TEXT for pieces, _ in results)
    assert {result.provider for _, result in results} == {"groq"}
    assert all(result.attempts == () for _, result in results)
    assert wire.count(GROQ_CHAT) == 200
