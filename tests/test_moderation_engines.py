"""The moderation engines and their fallback chain, driving the real SDKs against the fakes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from libra.ops.fakes.llm_wire import GROQ_CHAT, MODERATIONS, Behaviour, FakeLlmWire
from libra.processors.moderation.base import CATEGORIES, ModerationUnavailable
from libra.processors.moderation.chain import (
    CLASSIFIED,
    Moderator,
    build_engines,
    engine_names,
    parse_fail_policy,
)
from libra.processors.moderation.llama_guard import GUARD_MODEL, LlamaGuard, parse_guard_answer
from libra.processors.moderation.openai import OpenAIModeration
from libra.processors.moderation.words import WordListEngine
from libra.runtime.config import ConfigError, Settings

OPENAI_KEY = "sk-test-moderation-secret"
GROQ_KEY = "gsk_test-guard-secret"
KEYS = {"OPENAI_API_KEY": OPENAI_KEY, "GROQ_API_KEY": GROQ_KEY, "MODERATION_BLOCKLIST": "zorp"}
THREAT = "I will stab you after the meeting"
CLEAN = "What a lovely day for a walk"


@pytest.fixture
async def wire() -> AsyncIterator[FakeLlmWire]:
    async with FakeLlmWire() as fake:
        yield fake


def _settings(wire: FakeLlmWire, **env: str) -> Settings:
    chain = {"MODERATION_ENGINES": "openai,llama_guard,words"}
    return Settings.from_env({**wire.env(), **KEYS, **chain, **env})


@pytest.fixture
async def moderator(wire: FakeLlmWire) -> AsyncIterator[Moderator]:
    """openai, llama_guard, words; 0.5 s each; fail open; breakers after 3 failures."""
    settings = _settings(wire, MODERATION_TIMEOUT_SEC="0.5", MODERATION_BREAKER_FAILURES="3")
    chain = Moderator.from_settings(settings)
    yield chain
    await chain.aclose()


async def test_openai_flags_and_maps_categories_with_the_highest_score(wire: FakeLlmWire) -> None:
    engine = OpenAIModeration(api_key=OPENAI_KEY, timeout=2.0, base_url=f"{wire.url}/v1")
    try:
        flagged = await engine.check(THREAT)
        clean = await engine.check(CLEAN)
        hate = await engine.check("vermin")  # hate/threatening, after hate, is not flagged
    finally:
        await engine.close()
    assert hate.categories == ("hate",) and hate.scores["hate"] == 0.9
    assert flagged.flagged and flagged.engine == "openai"
    # violence, and harassment/threatening -> harassment
    assert flagged.categories == ("harassment", "violence")
    # harassment's score is harassment/threatening's, the higher of its two OpenAI categories
    assert flagged.scores["harassment"] == 0.9 and flagged.scores["violence"] == 0.9
    assert flagged.scores["hate"] == 0.0001
    assert set(flagged.scores) == set(CLASSIFIED)
    assert not clean.flagged and clean.categories == ()
    assert max(clean.scores.values()) < 0.01
    sent = wire.calls(MODERATIONS)
    assert [c.body for c in sent] == [
        {"model": "omni-moderation-latest", "input": THREAT},
        {"model": "omni-moderation-latest", "input": CLEAN},
        {"model": "omni-moderation-latest", "input": "vermin"},
    ]
    assert sent[0].headers["authorization"] == "***"  # the key was sent (and hidden here)


async def test_llama_guard_maps_its_codes(wire: FakeLlmWire) -> None:
    engine = LlamaGuard(api_key=GROQ_KEY, timeout=2.0, base_url=wire.url)
    try:
        threat = await engine.check(THREAT)
        two = await engine.check("vermin, all of them, and nsfw pictures")
        clean = await engine.check(CLEAN)
    finally:
        await engine.close()
    assert (threat.flagged, threat.categories, threat.scores) == (
        True,
        ("violence",),
        {"violence": 1.0},
    )
    assert two.categories == ("hate", "sexual") and two.engine == "llama_guard"
    assert not clean.flagged and clean.categories == () and clean.scores == {}
    request = wire.calls(GROQ_CHAT)[0]
    assert request.model == GUARD_MODEL and not request.stream
    assert request.messages == [{"role": "user", "content": THREAT}]


@pytest.mark.parametrize(
    ("answer", "categories"),
    [
        ("safe", ()),
        ("\nsafe\n", ()),
        ("unsafe\nS1,S10", ("hate", "violence")),
        (" UNSAFE \n s4 , S3", ("sexual", "sexual_minors")),
        ("unsafe\nS5,S7", ("harassment",)),
        ("unsafe\nS2,S6,S8,S9,S13,S14", ("illicit",)),
        ("unsafe\nS11,S12", ("self_harm", "sexual")),
        ("unsafe\nS15", ("illicit",)),  # a code a later model adds
        ("unsafe", ("illicit",)),  # harm, without saying which
        ("", None),
        ("I cannot help with that.", None),
        ("safe\nS1", None),
        ("unsafe\nviolence", None),
        ("unsafe\nS1\nS2", None),
        ("unsafe\nS1 S2", None),
    ],
)
def test_guard_answers(answer: str, categories: tuple[str, ...] | None) -> None:
    assert parse_guard_answer(answer) == categories


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="safeunSF0123456789,\n ", max_size=30))
def test_any_guard_answer_is_a_verdict_in_libras_categories_or_none(answer: str) -> None:
    categories = parse_guard_answer(answer)
    assert categories is None or set(categories) <= set(CLASSIFIED)
    assert categories != () or answer.strip().lower() == "safe"


async def test_the_fakes_latency_is_the_verdicts() -> None:
    async with FakeLlmWire(moderation_latency=0.25) as wire:
        openai = OpenAIModeration(api_key=OPENAI_KEY, timeout=2.0, base_url=f"{wire.url}/v1")
        guard = LlamaGuard(api_key=GROQ_KEY, timeout=2.0, base_url=wire.url)
        try:
            verdicts = [await openai.check(THREAT), await guard.check(THREAT)]
        finally:
            await openai.close()
            await guard.close()
    assert all(v.flagged and 250 <= v.latency_ms < 2000 for v in verdicts)


@pytest.mark.parametrize(
    ("path", "behaviour"),
    [
        (MODERATIONS, Behaviour.error(500)),
        (MODERATIONS, Behaviour.error(429)),
        (MODERATIONS, Behaviour.invalid_json()),
        (MODERATIONS, Behaviour.disconnect(after=0)),
        (GROQ_CHAT, Behaviour.error(503)),
        (GROQ_CHAT, Behaviour.invalid_json()),
        (GROQ_CHAT, Behaviour.ok("Sure! Here is a poem about the meeting.")),
    ],
)
async def test_failures_are_unavailable(wire: FakeLlmWire, path: str, behaviour: Behaviour) -> None:
    wire.always(path, behaviour)
    engine: OpenAIModeration | LlamaGuard = (
        OpenAIModeration(api_key=OPENAI_KEY, timeout=2.0, base_url=f"{wire.url}/v1")
        if path == MODERATIONS
        else LlamaGuard(api_key=GROQ_KEY, timeout=2.0, base_url=wire.url)
    )
    try:
        with pytest.raises(ModerationUnavailable) as caught:
            await engine.check(THREAT)
    finally:
        await engine.close()
    assert THREAT not in str(caught.value)  # what people say stays out of logs


async def test_a_server_error_falls_back_to_the_next_engine(
    wire: FakeLlmWire, moderator: Moderator
) -> None:
    wire.always(MODERATIONS, Behaviour.error(500))
    verdict = await moderator.check(THREAT)
    assert (verdict.engine, verdict.flagged, verdict.categories) == (
        "llama_guard",
        True,
        ("violence",),
    )
    assert wire.count(MODERATIONS) == 1 and wire.count(GROQ_CHAT) == 1


async def test_a_timeout_falls_back_and_counts_in_the_latency(
    wire: FakeLlmWire, moderator: Moderator
) -> None:
    wire.always(MODERATIONS, Behaviour.hang())
    verdict = await moderator.check(CLEAN)
    assert verdict.engine == "llama_guard" and not verdict.flagged
    assert verdict.latency_ms >= 500  # the wait for OpenAI is part of what the person waited


async def test_garbage_from_both_classifiers_leaves_the_word_list(
    wire: FakeLlmWire, moderator: Moderator
) -> None:
    wire.always(MODERATIONS, Behaviour.invalid_json())
    wire.always(GROQ_CHAT, Behaviour.ok("Let me think about it"))
    blocked = await moderator.check("you are a ZORP")
    passed = await moderator.check(THREAT)  # fail open: the classifiers' categories go unjudged
    assert (blocked.engine, blocked.flagged, blocked.categories) == (
        "words",
        True,
        ("blocked_word",),
    )
    assert (passed.engine, passed.flagged) == ("words", False)


async def test_the_breaker_opens_after_repeated_failures(
    wire: FakeLlmWire, moderator: Moderator
) -> None:
    wire.always(MODERATIONS, Behaviour.error(503))
    for _ in range(5):
        verdict = await moderator.check(THREAT)
        assert verdict.engine == "llama_guard" and verdict.flagged
    assert wire.count(MODERATIONS) == 3  # then passed over without a call
    assert wire.count(GROQ_CHAT) == 5
    assert REGISTRY.get_sample_value("libra_moderation_breaker_open", {"engine": "openai"}) == 1
    calls = {"engine": "openai", "outcome": "circuit_open"}
    assert REGISTRY.get_sample_value("libra_moderation_engine_calls_total", calls) >= 2


def _all_down(wire: FakeLlmWire) -> None:
    wire.always(MODERATIONS, Behaviour.error(500))
    wire.always(GROQ_CHAT, Behaviour.error(500))


@pytest.mark.parametrize(
    ("policy", "engines", "flagged", "categories"),
    [
        ("open", "openai,llama_guard", False, ()),
        ("closed", "openai,llama_guard", True, CLASSIFIED),
        (
            "closed:sexual_minors,self_harm",
            "openai,llama_guard",
            True,
            ("self_harm", "sexual_minors"),
        ),
        # the word list's clean answer vouches for blocked words only
        ("closed", "openai,llama_guard,words", True, CLASSIFIED),
        (" Closed : sexual_minors ", "openai,llama_guard,words", True, ("sexual_minors",)),
    ],
)
async def test_every_engine_down_follows_the_fail_policy(
    wire: FakeLlmWire, policy: str, engines: str, flagged: bool, categories: tuple[str, ...]
) -> None:
    _all_down(wire)
    settings = _settings(wire, MODERATION_FAIL=policy, MODERATION_ENGINES=engines)
    moderator = Moderator.from_settings(settings)
    try:
        verdict = await moderator.check(CLEAN)
    finally:
        await moderator.aclose()
    assert (verdict.engine, verdict.flagged, verdict.categories, verdict.scores) == (
        "none",
        flagged,
        categories,
        {},
    )


async def test_a_blocked_word_still_refuses_with_the_classifiers_down(wire: FakeLlmWire) -> None:
    _all_down(wire)
    moderator = Moderator.from_settings(_settings(wire, MODERATION_FAIL="closed"))
    try:
        verdict = await moderator.check("zorp")
    finally:
        await moderator.aclose()
    assert (verdict.engine, verdict.categories) == ("words", ("blocked_word",))


async def test_fail_closed_asks_on_until_a_classifier_answers(wire: FakeLlmWire) -> None:
    wire.always(MODERATIONS, Behaviour.error(500))
    settings = _settings(
        wire, MODERATION_FAIL="closed", MODERATION_ENGINES="words,openai,llama_guard"
    )
    moderator = Moderator.from_settings(settings)
    try:
        verdict = await moderator.check(CLEAN)
    finally:
        await moderator.aclose()
    assert (verdict.engine, verdict.flagged) == ("llama_guard", False)


async def test_secrets_stay_out_of_errors_and_logs(
    wire: FakeLlmWire, moderator: Moderator, caplog: pytest.LogCaptureFixture
) -> None:
    wire.always(MODERATIONS, Behaviour.error(401, f"Incorrect API key provided: {OPENAI_KEY}"))
    wire.always(GROQ_CHAT, Behaviour.error(401, f"Invalid API Key {GROQ_KEY}"))
    engine = OpenAIModeration(api_key=OPENAI_KEY, timeout=2.0, base_url=f"{wire.url}/v1")
    try:
        with pytest.raises(ModerationUnavailable) as caught:
            await engine.check(CLEAN)
    finally:
        await engine.close()
    assert "401" in str(caught.value) and OPENAI_KEY not in str(caught.value)
    with caplog.at_level(logging.WARNING, logger="libra.moderation"):
        verdict = await moderator.check(CLEAN)
    assert verdict.engine == "words"
    assert "unavailable" in caplog.text
    assert OPENAI_KEY not in caplog.text and GROQ_KEY not in caplog.text


async def test_the_word_list_engine() -> None:
    engine = WordListEngine(frozenset({"zorp", "blarg"}))
    assert (await engine.check("a Zorp here")).categories == ("blocked_word",)
    assert not (await engine.check("zorping is fine")).flagged


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({}, ["words"]),
        ({"OPENAI_API_KEY": OPENAI_KEY, "GROQ_API_KEY": GROQ_KEY}, ["words"]),  # opted into
        ({"OPENAI_API_KEY": OPENAI_KEY, "MODERATION_ENGINES": " llama_guard , openai "}, None),
    ],
)
def test_engine_order(env: dict[str, str], names: list[str] | None) -> None:
    assert engine_names(Settings.from_env(env)) == (names or ["llama_guard", "openai"])


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"MODERATION_ENGINES": "openai,perspective"}, "unknown engine 'perspective'"),
        ({"MODERATION_ENGINES": "words,words"}, "named twice"),
        ({"MODERATION_ENGINES": "openai"}, "OPENAI_API_KEY"),
        ({"MODERATION_ENGINES": "llama_guard,words"}, "GROQ_API_KEY"),
    ],
)
def test_engines_that_cannot_be_built_are_config_errors(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        build_engines(Settings.from_env(env))


@pytest.mark.parametrize(
    "value", ["ajar", "closed:", "closed:spam", "open:hate", "closed:blocked_word"]
)
def test_bad_fail_policies_are_config_errors(value: str) -> None:
    with pytest.raises(ConfigError, match="MODERATION_FAIL"):
        parse_fail_policy(value)


def test_categories_are_libras() -> None:
    assert set(CLASSIFIED) | {"blocked_word"} == set(CATEGORIES)
