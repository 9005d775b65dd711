"""A server's own moderation policy (``/moderation``) and its moderation log channel.

The classifier is the openai SDK against the loopback fake of ``/v1/moderations`` (its scores:
0.9 for a flagged category, 0.0001 for the others); admins set the policy through the real
slash commands on the loopback Discord; admission applies it to the classifier's answer and
records it on the turn; the gateway reports flagged turns in the server's log channel, with a
link and never the text.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
import redis.asyncio as aioredis

from libra.contracts import (
    Origin,
    SessionSettings,
    TextReceived,
    TurnAccepted,
    TurnRejected,
    make,
)
from libra.ops.fakes.discord import MANAGE_GUILD, FakeUser
from libra.ops.fakes.llm_wire import Behaviour, FakeLlmWire
from libra.processors.moderation.base import Verdict
from libra.processors.moderation.chain import Moderator
from libra.processors.moderation.openai import OpenAIModeration
from libra.processors.moderation.policy import (
    PolicyError,
    ServerPolicies,
    ServerPolicy,
    parse_categories,
    parse_thresholds,
)
from libra.processors.turns.admission import TurnsProcessor
from libra.processors.turns.ratelimit import RateLimiter
from libra.runtime.eventlog import EventLog
from libra.runtime.sessions import SessionView

from .discord_world import Gateways, World
from .helpers import eventually, stream_events
from .stack import answering_with, running
from .test_discord_gateway import chat_mode_on, delivered, replies_to

REPLY = "Noted."
FLAGGED = "I will stab the neighbour tonight FLAGMARK"  # 'stab': violence, harassment
CLEAN = "What is a good name for a cat?"


# --- the policy itself ----------------------------------------------------------------------


def test_categories_and_thresholds_are_read_or_refused_with_the_reason() -> None:
    assert parse_categories("") == parse_categories("all") == parse_categories(" ALL ")
    assert "blocked_word" not in parse_categories("all")  # the operator's list is not a server's
    assert parse_categories("hate, self-harm") == {"hate", "self_harm"}
    assert parse_categories("none") == frozenset()
    with pytest.raises(PolicyError, match="unknown category cats"):
        parse_categories("hate, cats")
    assert parse_thresholds("violence=0.8, hate = 0.25") == {"violence": 0.8, "hate": 0.25}
    for bad in ("violence", "violence=high", "violence=1.5", "blocked_word=0.5", "x=0.1"):
        with pytest.raises(PolicyError):
            parse_thresholds(bad)


def test_a_policy_turns_the_engines_answer_into_the_servers_decision() -> None:
    stab = Verdict(
        flagged=True,
        categories=("harassment", "violence"),
        scores={"harassment": 0.6, "violence": 0.9, "hate": 0.2},
        engine="openai",
    )
    assert ServerPolicy().judge(stab) == ("harassment", "violence")
    only_hate = ServerPolicy(categories=frozenset({"hate"}), scope="guild:1")
    assert only_hate.judge(stab) == ()
    assert only_hate.describe() == "guild:1 categories=hate"
    lenient = ServerPolicy(thresholds={"harassment": 0.7, "violence": 0.95})
    assert lenient.judge(stab) == ()
    strict = ServerPolicy(thresholds={"hate": 0.1})
    assert strict.judge(stab) == ("harassment", "hate", "violence")
    # no scores (Llama Guard, a fail-closed policy): the engine's decision stands
    closed = Verdict(flagged=True, categories=("sexual_minors",), engine="none")
    assert ServerPolicy(thresholds={"sexual_minors": 0.99}).judge(closed) == ("sexual_minors",)
    assert ServerPolicy(categories=frozenset({"hate"})).judge(closed) == ()
    # the operator's word list always applies
    words = Verdict(flagged=True, categories=("blocked_word",), engine="words")
    assert ServerPolicy(categories=frozenset()).judge(words) == ("blocked_word",)
    # a value written by hand that does not parse leaves that part at the default
    odd = ServerPolicy.from_settings(
        "guild:1", {"moderation.categories": "cats", "moderation.thresholds": "hate=0.3"}
    )
    assert odd.categories == parse_categories("all") and odd.thresholds == {"hate": 0.3}


# --- admission applies each server's policy -------------------------------------------------


@pytest.fixture
async def wire():
    async with FakeLlmWire(reply=Behaviour.ok(REPLY), moderation_latency=0.01) as found:
        yield found


@pytest.fixture
async def redis(redis_url):
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


async def _set(log: EventLog, guild: str, key: str, value: str) -> None:
    origin = Origin(platform="discord", guild=guild, channel="9")
    await log.publish(
        make(
            SessionSettings,
            conversation=f"discord-{guild}-9",
            user="discord:admin",
            scope=f"guild:{guild}",
            key=key,
            value=value,
            origin=origin,
        )
    )


def _said(message: str, guild: str, platform: str = "discord") -> TextReceived:
    origin = Origin(platform=platform, guild=guild, channel="9", message="77")
    return make(
        TextReceived,
        conversation=f"{platform}-{guild}-9",
        user=f"{platform}:someone-{guild}",
        text=message,
        origin=origin,
    )


async def test_admission_applies_each_servers_policy_and_records_it(
    eventlog: EventLog, redis, wire: FakeLlmWire
) -> None:
    await _set(eventlog, "1", "moderation.categories", "hate,self_harm")
    await _set(eventlog, "2", "moderation.thresholds", "hate=0.0001")
    await _set(eventlog, "3", "moderation.thresholds", "violence=0.95,harassment=0.95")
    engine = OpenAIModeration(api_key="sk-test", timeout=5, base_url=wire.env()["OPENAI_BASE_URL"])
    views: list[SessionView] = []

    async def start_view() -> SessionView:
        view = SessionView(eventlog, None)  # no database: the log's session events
        await view.start()
        views.append(view)
        return view

    processor = TurnsProcessor(
        redis,
        RateLimiter(redis, limit=100, window_s=10),
        moderator=Moderator([engine], breaker_failures=0),
        policies=ServerPolicies(start_view),
    )

    async def decide(said: TextReceived) -> TurnAccepted | TurnRejected:
        [out] = [o async for o in processor.handle(said)]
        assert isinstance(out, TurnAccepted | TurnRejected)
        return out

    try:
        one = await decide(_said(FLAGGED, "1"))  # refuses hate and self-harm only
        assert isinstance(one, TurnAccepted) and one.moderation is not None
        assert not one.moderation.flagged and one.moderation.scores["violence"] == 0.9
        assert one.moderation.policy == "guild:1 categories=hate,self_harm"

        two = await decide(_said(CLEAN, "2"))  # stricter on hate than the engine
        assert isinstance(two, TurnRejected) and two.reason == "moderated"
        assert two.moderation is not None and two.moderation.categories == ("hate",)
        assert two.moderation.policy == "guild:2 thresholds=hate=0.0001"

        three = await decide(_said(FLAGGED, "3"))  # more lenient than the engine
        assert isinstance(three, TurnAccepted)

        for other in (_said(FLAGGED, "4"), _said(FLAGGED, "1", platform="http")):
            refused = await decide(other)  # no policy of its own: the default
            assert isinstance(refused, TurnRejected)
            assert refused.moderation is not None and refused.moderation.policy == ""
            assert refused.moderation.categories == ("harassment", "violence")

        await _set(eventlog, "1", "moderation.categories", "")  # back to all, from now on
        await eventually(lambda: _policy_is(views[0], "1", ""))
        assert isinstance(await decide(_said(FLAGGED, "1")), TurnRejected)
    finally:
        for view in views:
            await view.stop()


async def test_the_settings_are_read_from_the_log_while_postgresql_is_unreachable(
    eventlog: EventLog, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    await _set(eventlog, "8", "moderation.log", "123")
    await _set(eventlog, "8", "moderation.categories", "hate")
    unreachable = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    await unreachable.close()  # every read now fails, as with the server down
    view = SessionView(eventlog, unreachable)
    await view.start()
    try:
        assert view.settings("guild:8", "moderation.") == {
            "moderation.log": "123",
            "moderation.categories": "hate",
        }
        assert "sessions projection unreadable" in caplog.text
    finally:
        await view.stop()


async def _policy_is(view: SessionView, guild: str, categories: str) -> bool:
    return view.setting(f"guild:{guild}", "moderation.categories") == categories


# --- /moderation and the log channel, end to end on the loopback Discord ----------------------


def _sub(name: str, *options: dict) -> list[dict]:
    return [{"type": 1, "name": name, "options": list(options)}]


async def test_admins_set_the_policy_and_flagged_messages_are_reported_without_their_text(
    settings, eventlog: EventLog, world: World, gateways: Gateways, wire: FakeLlmWire
) -> None:
    fake = world.fake
    mod_log = fake.add_channel(world.guild, "mod-log")
    s = answering_with(settings, wire, MODERATION_ENGINES="openai")

    async def ask(user: FakeUser, options: list[dict], **kw) -> str:
        done = await fake.invoke(
            "moderation", channel_id=world.channel, user=user, options=options, **kw
        )
        await asyncio.wait_for(done.responded.wait(), 10)
        assert done.ephemeral
        return done.content

    async def admin(options: list[dict]) -> str:
        return await ask(world.admin, options, permissions=MANAGE_GUILD)

    async with running(s, ["turns", "llm", "sessions"]):
        await gateways.start(moderation_engines="openai")
        await chat_mode_on(eventlog, world)
        log_option = {"type": 7, "name": "channel", "value": str(mod_log)}
        assert await ask(world.alice, _sub("log", log_option)) == (
            "Only server admins (Manage Server) can change that."
        )
        assert await admin(_sub("log", log_option)) == (
            f"Flagged messages will be reported in <#{mod_log}>, with a link, never their text."
        )

        flagged = await fake.send_message(world.channel, FLAGGED, author=world.alice)
        await eventually(lambda: _posted(fake, mod_log, 1), timeout=20)
        [report] = fake.bot_messages(mod_log)
        link = f"https://discord.com/channels/{world.guild}/{world.channel}/{flagged['id']}"
        assert report["content"] == (
            f"Flagged message from <@{world.alice.id}> in <#{world.channel}>: "
            f"harassment 0.90, violence 0.90. Engine: openai.\n{link}"
        )
        assert fake.allowed_mentions[int(report["id"])] == {"parse": []}  # it pings no one
        await eventually(lambda: _replied(fake, flagged), timeout=10)
        assert "harassment and violence" in replies_to(fake, flagged)[0]["content"]

        listed = {"type": 3, "name": "list", "value": "hate, self_harm"}
        assert await admin(_sub("categories", listed)) == (
            "This server now refuses: hate, self_harm."
        )
        bad = {"type": 3, "name": "list", "value": "cats"}
        assert (await admin(_sub("categories", bad))).startswith(
            "That isn't a policy I can use: unknown category cats"
        )
        await eventually(lambda: _settings_row(eventlog, world.guild, 2), timeout=10)
        allowed = await fake.send_message(world.channel, FLAGGED, author=world.alice)
        await delivered(eventlog, 1, timeout=20)
        assert replies_to(fake, allowed)[0]["content"] == REPLY

        hate = [
            {"type": 3, "name": "category", "value": "hate"},
            {"type": 10, "name": "score", "value": 0.0001},
        ]
        assert await admin(_sub("threshold", *hate)) == (
            "hate is now refused from a score of 0.0001."
        )
        await eventually(lambda: _settings_row(eventlog, world.guild, 3), timeout=10)
        strict = await fake.send_message(world.channel, CLEAN, author=world.alice)
        await eventually(lambda: _posted(fake, mod_log, 2), timeout=20)
        assert f"/{strict['id']}" in fake.bot_messages(mod_log)[1]["content"]
        assert "Policy: guild:" in fake.bot_messages(mod_log)[1]["content"]

        shown = await ask(world.alice, _sub("show"))
        assert shown == (
            "Moderation here\n- engines: openai\n- refused categories: hate, self_harm\n"
            f"- thresholds: hate=0.0001\n- log channel: <#{mod_log}>"
        )

    decisions = [
        e
        for e in await stream_events(eventlog.js, "LIBRA", "libra.turn.*.>")
        if isinstance(e, TurnAccepted | TurnRejected)
    ]
    assert [type(e).__name__ for e in decisions] == ["TurnRejected", "TurnAccepted", "TurnRejected"]
    assert decisions[1].moderation is not None
    assert decisions[1].moderation.policy == f"guild:{world.guild} categories=hate,self_harm"
    for message in fake.bot_messages(mod_log):  # reported with a link, never the text
        assert "FLAGMARK" not in message["content"] and CLEAN not in message["content"]
    assert len(fake.bot_messages(mod_log)) == 2


async def _posted(fake, channel: int, count: int) -> bool:
    return len(fake.bot_messages(channel)) >= count


async def _replied(fake, message: dict) -> bool:
    return bool(replies_to(fake, message))


async def _settings_row(log: EventLog, guild: int, count: int) -> bool:
    found = await stream_events(log.js, "LIBRA", "libra.session.settings.>")
    return len([e for e in found if e.scope == f"guild:{guild}"]) >= count
