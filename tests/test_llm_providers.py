"""The provider adapters, each driving its real SDK against the loopback fake of the vendor."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from libra.ops.fakes.llm_wire import (
    ANTHROPIC_MESSAGES,
    EMBEDDINGS,
    GROQ_CHAT,
    LOCAL_CHAT,
    OLLAMA_CHAT,
    OPENAI_CHAT,
    Behaviour,
    FakeLlmWire,
    embedding,
)
from libra.ops.fakes.loopback import LoopbackServer
from libra.processors.llm.providers import (
    DEFAULT_MODELS,
    NoProviderConfigured,
    Target,
    build_targets,
)
from libra.processors.llm.providers.base import (
    ChatMessage,
    ChatProvider,
    ChatRequest,
    ChatUsage,
    ProviderError,
)
from libra.processors.llm.providers.openai_compat import OpenAICompatProvider
from libra.runtime.config import ConfigError, Settings

KEYS = {
    "GROQ_API_KEY": "gsk_test-groq-secret",
    "OPENAI_API_KEY": "sk-test-openai-secret",
    "ANTHROPIC_API_KEY": "sk-ant-test-secret",
    "LLM_API_KEY": "local-test-secret",
}
PATHS = {
    "groq": GROQ_CHAT,
    "openai": OPENAI_CHAT,
    "anthropic": ANTHROPIC_MESSAGES,
    "ollama": OLLAMA_CHAT,
    "local": LOCAL_CHAT,
}
PROVIDERS = list(PATHS)
PROMPT = (
    ChatMessage(role="system", content="You are Libra."),
    ChatMessage(role="user", content="Say hello to the tests."),
)
TEXT = "Hello there, tests: this reply streams in pieces."


@pytest.fixture
async def wire() -> AsyncIterator[FakeLlmWire]:
    async with FakeLlmWire() as fake:
        yield fake


def _provider(wire: FakeLlmWire, name: str, **env: str) -> ChatProvider:
    settings = Settings.from_env({**wire.env(), **KEYS, "LLM_PROVIDERS": name, **env})
    (target,) = build_targets(settings)
    return target.provider


async def _collect(
    provider: ChatProvider, messages: tuple[ChatMessage, ...] = PROMPT, model: str = "m-1"
) -> tuple[list[str], ChatUsage]:
    pieces: list[str] = []
    usage = None
    async for item in provider.stream(ChatRequest(model=model, messages=messages)):
        if isinstance(item, ChatUsage):
            usage = item
        else:
            assert usage is None, "text arrived after the usage"
            pieces.append(item)
    assert usage is not None
    return pieces, usage


@pytest.mark.parametrize("name", PROVIDERS)
async def test_streams_pieces_in_order_with_usage(wire: FakeLlmWire, name: str) -> None:
    wire.queue(PATHS[name], Behaviour.ok(TEXT))
    provider = _provider(wire, name)
    try:
        pieces, usage = await _collect(provider, model="model-under-test")
    finally:
        await provider.close()
    assert pieces == [
        "Hello",
        " there,",
        " tests:",
        " this",
        " reply",
        " streams",
        " in",
        " pieces.",
    ]
    assert "".join(pieces) == TEXT
    assert usage.completion_tokens == len(pieces)
    assert usage.prompt_tokens > 0
    assert usage.finish_reason in ("stop", "end_turn")
    (request,) = wire.calls(PATHS[name])
    assert request.model == "model-under-test"
    assert request.stream
    contents = [m["content"] for m in request.messages]
    if name == "anthropic":
        assert request.body["system"] == "You are Libra."
        assert contents == ["Say hello to the tests."]
    else:
        assert contents == ["You are Libra.", "Say hello to the tests."]
    assert all(secret not in str(request.headers) for secret in KEYS.values())


@pytest.mark.parametrize("name", ["openai", "ollama", "local"])
async def test_openai_compatible_servers_get_asked_for_usage(wire: FakeLlmWire, name: str) -> None:
    provider = _provider(wire, name)
    try:
        await _collect(provider)
    finally:
        await provider.close()
    (request,) = wire.calls(PATHS[name])
    assert request.body["stream_options"] == {"include_usage": True}


# Anthropic always reports usage; OpenAI-compatible servers may not.
@pytest.mark.parametrize("name", ["openai", "ollama", "local", "groq"])
async def test_a_server_that_sends_no_usage_is_tolerated(wire: FakeLlmWire, name: str) -> None:
    wire.queue(PATHS[name], Behaviour(text="no counts here", usage=False))
    provider = _provider(wire, name)
    try:
        pieces, usage = await _collect(provider)
    finally:
        await provider.close()
    assert "".join(pieces) == "no counts here"
    assert usage.prompt_tokens == 0
    assert usage.completion_tokens == 0


async def test_ollama_needs_no_key_and_its_api_is_under_v1(wire: FakeLlmWire) -> None:
    settings = Settings.from_env({"OLLAMA_URL": f"{wire.url}/ollama"})
    (target,) = build_targets(settings)
    try:
        pieces, _ = await _collect(target.provider, model=target.model)
    finally:
        await target.provider.close()
    assert pieces
    (request,) = wire.calls()
    assert request.path == OLLAMA_CHAT
    assert request.model == DEFAULT_MODELS["ollama"]


@pytest.mark.parametrize("name", ["openai", "groq", "ollama"])
async def test_images_go_as_image_url_parts(wire: FakeLlmWire, name: str) -> None:
    url = "https://example.com/cat.png"
    message = ChatMessage(role="user", content="What is this?", images=(url,))
    provider = _provider(wire, name)
    try:
        await _collect(provider, (message,))
    finally:
        await provider.close()
    (request,) = wire.calls(PATHS[name])
    assert request.messages[0]["content"] == [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": url}},
    ]


async def test_anthropic_images_go_as_url_and_base64_sources(wire: FakeLlmWire) -> None:
    images = ("https://example.com/cat.png", "data:image/png;base64,iVBORw0KGgo=")
    message = ChatMessage(role="user", content="Compare them.", images=images)
    provider = _provider(wire, "anthropic")
    try:
        await _collect(provider, (message,))
    finally:
        await provider.close()
    (request,) = wire.calls(ANTHROPIC_MESSAGES)
    assert request.messages[0]["content"] == [
        {"type": "image", "source": {"type": "url", "url": images[0]}},
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
        },
        {"type": "text", "text": "Compare them."},
    ]
    assert "system" not in request.body


FAILURES = [
    pytest.param(Behaviour.rate_limited(0.25), "rate_limited", 429, 0, id="429"),
    pytest.param(Behaviour.error(500), "server", 500, 0, id="500"),
    pytest.param(Behaviour.error(503), "server", 503, 0, id="503"),
    pytest.param(Behaviour.error(401), "auth", 401, 0, id="401"),
    pytest.param(Behaviour.error(403), "auth", 403, 0, id="403"),
    pytest.param(Behaviour.error(400), "bad_request", 400, 0, id="400"),
    pytest.param(Behaviour.error(404), "bad_request", 404, 0, id="404"),
    pytest.param(Behaviour.error(422), "bad_request", 422, 0, id="422"),
    pytest.param(Behaviour.invalid_json(), "malformed", None, 0, id="invalid-json"),
    pytest.param(Behaviour.malformed(after=2), "malformed", None, 2, id="malformed-mid-stream"),
    pytest.param(Behaviour.disconnect(after=3), "connection", None, 3, id="disconnect"),
]


@pytest.mark.parametrize("name", PROVIDERS)
@pytest.mark.parametrize(("behaviour", "kind", "status", "pieces_before"), FAILURES)
async def test_sdk_errors_become_provider_errors(
    wire: FakeLlmWire,
    name: str,
    behaviour: Behaviour,
    kind: str,
    status: int | None,
    pieces_before: int,
) -> None:
    wire.queue(PATHS[name], behaviour)
    provider = _provider(wire, name)
    pieces: list[str] = []
    try:
        with pytest.raises(ProviderError) as caught:
            async for item in provider.stream(ChatRequest(model="m", messages=PROMPT)):
                assert isinstance(item, str)
                pieces.append(item)
    finally:
        await provider.close()
    error = caught.value
    assert (error.provider, error.kind, error.status) == (name, kind, status)
    assert error.retryable == (kind in ("rate_limited", "server", "malformed", "connection"))
    assert error.retry_after == (0.25 if kind == "rate_limited" else None)
    assert len(pieces) == pieces_before
    assert wire.count(PATHS[name]) == 1, "the SDK must not retry on its own"


@pytest.mark.parametrize("name", PROVIDERS)
async def test_the_sdk_read_timeout_is_a_timeout(wire: FakeLlmWire, name: str) -> None:
    wire.queue(PATHS[name], Behaviour.hang())
    provider = _provider(wire, name, LLM_TIMEOUT_SEC="0.3")
    try:
        with pytest.raises(ProviderError) as caught:
            await _collect(provider)
    finally:
        await provider.close()
    assert caught.value.kind == "timeout"


SENT_KEYS = {
    "groq": KEYS["GROQ_API_KEY"],
    "openai": KEYS["OPENAI_API_KEY"],
    "anthropic": KEYS["ANTHROPIC_API_KEY"],
    "local": KEYS["LLM_API_KEY"],
}


@pytest.mark.parametrize("name", list(SENT_KEYS))
async def test_an_echoed_api_key_never_reaches_the_message(wire: FakeLlmWire, name: str) -> None:
    key = SENT_KEYS[name]
    wire.queue(PATHS[name], Behaviour.error(401, f"Incorrect API key provided: {key}"))
    provider = _provider(wire, name)
    try:
        with pytest.raises(ProviderError) as caught:
            await _collect(provider)
    finally:
        await provider.close()
    assert caught.value.kind == "auth"
    assert key not in str(caught.value)
    assert "Incorrect API key provided: ***" in str(caught.value)


async def test_the_fake_embeds_deterministically_through_the_openai_sdk(wire: FakeLlmWire) -> None:
    import openai

    client = openai.AsyncOpenAI(api_key="sk-test", base_url=f"{wire.url}/v1", max_retries=0)
    try:
        first = await client.embeddings.create(
            model="text-embedding-3-small", input=["hello", "world"], dimensions=64
        )
        again = await client.embeddings.create(model="text-embedding-3-small", input="hello")
        models = await client.models.list()
    finally:
        await client.close()
    assert [len(d.embedding) for d in first.data] == [64, 64]
    assert first.data[0].embedding != first.data[1].embedding
    expected = embedding("text-embedding-3-small\0hello", 64)
    assert first.data[0].embedding == pytest.approx(expected, abs=1e-6)
    assert len(again.data[0].embedding) == 1536
    assert sum(v * v for v in again.data[0].embedding) == pytest.approx(1.0, abs=1e-4)
    assert "gpt-4o-mini" in [m.id for m in models.data]
    assert wire.count(EMBEDDINGS) == 2


# --- build_targets ---------------------------------------------------------------------------

GROQ_MODEL, OPENAI_MODEL = DEFAULT_MODELS["groq"], DEFAULT_MODELS["openai"]
OLLAMA, LOCAL = "http://127.0.0.1:11434", "http://127.0.0.1:8080/v1"

TARGET_CASES = [
    pytest.param({"OLLAMA_URL": OLLAMA}, [("ollama", DEFAULT_MODELS["ollama"])], id="only-ollama"),
    pytest.param(
        {"OPENAI_API_KEY": "gsk_abc"}, [("groq", GROQ_MODEL)], id="gsk-key-in-openai-is-groq"
    ),
    pytest.param({"OPENAI_API_KEY": "sk-abc"}, [("openai", OPENAI_MODEL)], id="openai"),
    pytest.param(
        {
            "LLM_BASE_URL": LOCAL,
            "OLLAMA_URL": OLLAMA,
            "ANTHROPIC_API_KEY": "a",
            "OPENAI_API_KEY": "sk-o",
            "GROQ_API_KEY": "gsk_g",
        },
        [
            ("groq", GROQ_MODEL),
            ("openai", OPENAI_MODEL),
            ("anthropic", DEFAULT_MODELS["anthropic"]),
            ("ollama", DEFAULT_MODELS["ollama"]),
            ("local", DEFAULT_MODELS["local"]),
        ],
        id="every-provider-in-the-default-order",
    ),
    pytest.param(
        {
            "GROQ_API_KEY": "gsk_g",
            "OPENAI_API_KEY": "sk-o",
            "PRIMARY_MODEL": "llama-3.1-8b-instant",
            "ALT_MODEL": "gemma2-9b-it",
        },
        [("groq", "llama-3.1-8b-instant"), ("groq", "gemma2-9b-it"), ("openai", OPENAI_MODEL)],
        id="primary-and-alt-models-on-the-first-provider",
    ),
    pytest.param(
        {"OPENAI_API_KEY": "gsk_g", "PRIMARY_MODEL": "m", "ALT_MODEL": "m"},
        [("groq", "m")],
        id="alt-model-equal-to-primary-adds-nothing",
    ),
    pytest.param(
        {
            "LLM_PROVIDERS": "ollama:llama3:8b, groq",
            "OLLAMA_URL": OLLAMA,
            "GROQ_API_KEY": "gsk_g",
            "PRIMARY_MODEL": "ignored-when-the-entry-names-one",
        },
        [("ollama", "llama3:8b"), ("groq", GROQ_MODEL)],
        id="split-on-the-first-colon",
    ),
    pytest.param(
        {
            "LLM_PROVIDERS": "anthropic,openai:gpt-4.1-mini",
            "ANTHROPIC_API_KEY": "a",
            "OPENAI_API_KEY": "sk-o",
            "GROQ_API_KEY": "gsk_unused",
            "PRIMARY_MODEL": "claude-sonnet-4-5",
            "ALT_MODEL": "claude-haiku-4-5-20251001",
        },
        [
            ("anthropic", "claude-sonnet-4-5"),
            ("anthropic", "claude-haiku-4-5-20251001"),
            ("openai", "gpt-4.1-mini"),
        ],
        id="explicit-order-skips-unlisted-providers",
    ),
    pytest.param(
        {"LLM_PROVIDERS": "LOCAL:qwen2.5-7b", "LLM_BASE_URL": LOCAL},
        [("local", "qwen2.5-7b")],
        id="local-server-without-key",
    ),
]


def _names(targets: list[Target]) -> list[tuple[str, str]]:
    return [(target.provider.name, target.model) for target in targets]


@pytest.mark.parametrize(("env", "expected"), TARGET_CASES)
async def test_build_targets(env: dict[str, str], expected: list[tuple[str, str]]) -> None:
    targets = build_targets(Settings.from_env(env))
    try:
        assert _names(targets) == expected
    finally:
        for provider in {id(t.provider): t.provider for t in targets}.values():
            await provider.close()


ERROR_CASES = [
    pytest.param(
        {"LLM_EMBEDDED": "0"}, NoProviderConfigured, "no LLM provider is configured", id="nothing"
    ),
    pytest.param(
        {"LLM_PROVIDERS": " , ", "GROQ_API_KEY": "gsk_g"},
        NoProviderConfigured,
        "names no provider",
        id="empty-entries",
    ),
    pytest.param(
        {"LLM_PROVIDERS": "bard", "GROQ_API_KEY": "gsk_g"},
        ConfigError,
        "unknown provider 'bard'",
        id="unknown",
    ),
    pytest.param(
        {"LLM_PROVIDERS": "groq,anthropic", "GROQ_API_KEY": "gsk_g"},
        ConfigError,
        "ANTHROPIC_API_KEY is not set",
        id="listed-but-not-configured",
    ),
    pytest.param(
        {"LLM_PROVIDERS": "openai", "OPENAI_API_KEY": "gsk_g"},
        ConfigError,
        "OPENAI_API_KEY is not set",
        id="a-groq-key-is-no-openai-key",
    ),
]


@pytest.mark.parametrize(("env", "error", "text"), ERROR_CASES)
def test_build_targets_refuses(env: dict[str, str], error: type[Exception], text: str) -> None:
    with pytest.raises(error) as caught:
        build_targets(Settings.from_env(env))
    assert text in str(caught.value)


async def test_targets_of_one_provider_share_its_client() -> None:
    env = {"LLM_PROVIDERS": "openai,openai:gpt-4.1-mini", "OPENAI_API_KEY": "sk-o"}
    first, second = build_targets(Settings.from_env(env))
    try:
        assert first.provider is second.provider
        assert (first.model, second.model) == (OPENAI_MODEL, "gpt-4.1-mini")
    finally:
        await first.provider.close()


async def test_base_urls_come_from_the_settings(wire: FakeLlmWire) -> None:
    env = {**wire.env(), **KEYS, "LLM_PROVIDERS": "groq,openai,anthropic"}
    targets = build_targets(Settings.from_env(env))
    try:
        for target in targets:
            await _collect(target.provider)
    finally:
        for target in targets:
            await target.provider.close()
    assert [r.path for r in wire.calls()] == [GROQ_CHAT, OPENAI_CHAT, ANTHROPIC_MESSAGES]
    openai_request = wire.calls(OPENAI_CHAT)[0]
    # OpenAI's newer models take only max_completion_tokens.
    assert openai_request.body["max_completion_tokens"] == 512
    assert wire.calls(GROQ_CHAT)[0].body["max_tokens"] == 512
    # Each SDK sent its key (the record shows that one came, never which).
    for request in wire.calls():
        sent = {request.headers.get("authorization"), request.headers.get("x-api-key")}
        assert "***" in sent


@pytest.mark.parametrize("name", PROVIDERS)
async def test_replies_come_on_one_kept_alive_connection(wire: FakeLlmWire, name: str) -> None:
    provider = _provider(wire, name)
    try:
        for _ in range(3):
            wire.queue(PATHS[name], Behaviour.ok(TEXT))
            pieces, _ = await _collect(provider)
            assert "".join(pieces) == TEXT
    finally:
        await provider.close()
    peers = {request.peer for request in wire.calls(PATHS[name])}
    assert len(peers) == 1, peers  # no new connection (and TLS handshake) per reply


class _RawSse(LoopbackServer):
    """Writes one OpenAI stream as servers may cut it: events split across writes and within
    their JSON, CRLF line ends, comments and event names, several events in one write."""

    WRITES = (
        b': keep-alive\r\n\r\nevent: message\r\ndata: {"choices":[{"delta":{"content":"Hel',
        b'lo"}}]}\r\n\r\ndata: {"choices":[{"delta":{"content":" wor"}}]}\n\ndata: {"choi',
        b'ces":[{"delta":{"content":"ld"},"finish_reason":"stop"}]}\n\n',
        b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}\n\ndata: [DO',
        b"NE]\n\n",
    )

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in self.WRITES:
            await response.write(piece)
            await asyncio.sleep(0.005)  # each its own read at the client
        await response.write_eof()
        return response


async def test_events_cut_anywhere_by_the_network_are_read_whole() -> None:
    async with _RawSse() as server:
        provider = OpenAICompatProvider(
            "local", default_model="m", timeout=5.0, base_url=f"{server.url}/v1"
        )
        try:
            pieces, usage = await _collect(provider)
        finally:
            await provider.close()
    assert pieces == ["Hello", " wor", "ld"]
    assert (usage.prompt_tokens, usage.completion_tokens, usage.finish_reason) == (7, 3, "stop")
