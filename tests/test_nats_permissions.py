"""nats.conf's users: each component may do what it needs and nothing it does not."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

import httpx
import nats
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS

from libra.contracts import (
    AUDIO_BUCKET,
    LlmCompleted,
    Origin,
    SessionSettings,
    TextReceived,
    TtsSynthesized,
    TurnAccepted,
    derive,
    encode_event,
    make,
)
from libra.ops.components import Resources, Supervisor
from libra.ops.embedded import EmbeddedNats, free_port, nats_users
from libra.ops.fakes.llm_wire import Behaviour, FakeLlmWire
from libra.ops.replay import Selection, replay
from libra.processors.tts.chain import TtsChain
from libra.processors.tts.espeak import EspeakEngine
from libra.processors.tts.processor import TtsProcessor
from libra.runtime.audio import AudioStore
from libra.runtime.config import Settings
from libra.runtime.consumer import ConsumerRunner
from libra.runtime.eventlog import EventLog

from .factories import text
from .helpers import eventually, stream_events
from .stack import TEXT_PIPELINE, answering_with

ORIGIN = Origin(platform="discord", guild="1", channel="2")
VIOLATION = "permissions violation"


class Login:
    """A connection as one user of nats.conf that remembers what the server refused it."""

    def __init__(self) -> None:
        self.refused: list[str] = []
        self.nc: NATS | None = None

    async def connect(self, url: str) -> Login:
        async def on_error(exc: Exception) -> None:
            self.refused.append(str(exc))

        self.nc = await nats.connect(url, error_cb=on_error, max_reconnect_attempts=0)
        return self

    async def tries(self, subject: str) -> bool:
        """Publishes to ``subject``; returns whether the server let it through."""
        before = len(self.refused)
        await self.nc.publish(subject, b"{}")
        await self.nc.flush()
        await asyncio.sleep(0.1)  # a refusal comes back as an asynchronous -ERR
        return not any(VIOLATION in r for r in self.refused[before:])


@contextlib.asynccontextmanager
async def login(server: EmbeddedNats, user: str | None) -> AsyncIterator[Login]:
    """Connects as ``user`` (None: with no credentials at all)."""
    url = server.public_url if user is None else server.url_for(user)
    who = await Login().connect(url)
    try:
        yield who
    finally:
        await who.nc.close()


def test_every_component_has_a_user_with_a_password_from_the_environment() -> None:
    from libra.ops.components import COMPONENTS

    users = nats_users()
    assert set(COMPONENTS) <= set(users)
    assert {"admin", "observer", "replay"} <= set(users)
    assert all(env.startswith("LIBRA_NATS_PASSWORD_") for env in users.values())


@pytest.mark.parametrize(
    ("user", "refused", "allowed"),
    [
        ("discord", "libra.llm.completed.x", "libra.text.received.x"),
        ("discord", "libra.llm.delta.x", "libra.voice.captured.x"),
        ("discord", "libra.turn.confirmed.x", "libra.voice.resumed.x"),
        ("http", "libra.turn.accepted.x", "libra.text.received.x"),
        ("llm", "libra.text.received.x", "libra.llm.completed.x"),
        ("llm", "libra.turn.accepted.x", "libra.dead.llm.x"),
        ("llm", "libra.knowledge.added.x", "libra.tool.called.x"),
        ("http", "libra.tool.returned.x", "libra.knowledge.added.x"),
        ("discord", "libra.tool.returned.x", "libra.knowledge.removed.x"),
        ("turns", "libra.llm.completed.x", "libra.turn.accepted.x"),
        ("turns", "libra.dead.llm.x", "libra.dead.turns.x"),
        ("asr", "$O.libra-audio.C.x", "libra.asr.transcribed.x"),
        ("tts", "libra.text.received.x", "$O.libra-audio.C.x"),
        ("memory", "libra.llm.completed.x", "libra.dead.memory.x"),
        ("history", "libra.session.chat.x", "libra.dead.history.x"),
        ("replay", "libra.llm.completed.x", "replay.r1.llm.completed.x"),
        (None, "libra.text.received.x", "$JS.API.STREAM.INFO.LIBRA"),
    ],
)
async def test_publishing_only_what_a_user_may(
    eventlog: EventLog, nats_server: EmbeddedNats, user: str | None, refused: str, allowed: str
) -> None:
    async with login(nats_server, user) as who:
        assert not await who.tries(refused)
        assert await who.tries(allowed)


async def test_only_its_component_pulls_from_a_durable_consumer(
    eventlog: EventLog, nats_server: EmbeddedNats
) -> None:
    for user in ("http", "discord", "tts", "replay", "observer"):
        async with login(nats_server, user) as who:
            assert not await who.tries("$JS.API.CONSUMER.MSG.NEXT.LIBRA.llm")
            assert not await who.tries("$JS.API.CONSUMER.DELETE.LIBRA.llm")
    async with login(nats_server, "llm") as llm:
        assert await llm.tries("$JS.API.CONSUMER.MSG.NEXT.LIBRA.llm")
        assert not await llm.tries("$JS.API.CONSUMER.MSG.NEXT.LIBRA.turns")


async def test_the_llm_reads_messages_and_transcripts_ahead_of_admission(
    eventlog: EventLog, nats_server: EmbeddedNats
) -> None:
    async with login(nats_server, "llm") as llm:
        seen: list[str] = []

        async def note(msg) -> None:
            seen.append(msg.subject)

        for said in ("libra.text.received", "libra.asr.transcribed"):
            await llm.nc.subscribe(f"{said}.*", cb=note)
            await llm.nc.flush()
            await eventlog.nc.publish(f"{said}.x", b"{}")
            await eventually(lambda said=said: _has(seen, f"{said}.x"))
        assert not any(VIOLATION in r for r in llm.refused)


async def test_anonymous_is_the_observer_who_sees_everything(
    eventlog: EventLog, nats_server: EmbeddedNats
) -> None:
    async with login(nats_server, None) as anyone:
        seen: list[str] = []

        async def note(msg) -> None:
            seen.append(msg.subject)

        await anyone.nc.subscribe("libra.>", cb=note)
        await anyone.nc.flush()
        said = text(conversation="http-zoe")
        await eventlog.publish(said)
        await eventually(lambda: _has(seen, said.subject))
        info = await anyone.nc.jetstream().stream_info("LIBRA")
        assert info.state.messages == 1
        assert not any(VIOLATION in r for r in anyone.refused)


async def _has(seen: list[str], subject: str) -> bool:
    return subject in seen


def _violations(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if VIOLATION in r.getMessage().lower()]


async def test_each_component_does_its_work_as_its_own_user(
    settings: Settings, eventlog: EventLog, nats_server: EmbeddedNats, pool, caplog
) -> None:
    caplog.set_level(logging.WARNING)
    port = free_port()
    async with FakeLlmWire(reply=Behaviour.ok("Hello from the model.")) as wire:
        s = Settings.from_env(
            {
                "NATS_URL": settings.nats_url,
                "DATABASE_URL": settings.database_url,
                "REDIS_URL": settings.redis_url,
                "OPENAI_API_KEY": "sk-test-key",
                "OPENAI_BASE_URL": wire.env()["OPENAI_BASE_URL"],
                "HTTP_PORT": str(port),
            }
        )
        async with _as_their_users(s, nats_server, [*TEXT_PIPELINE, "http"]):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as http:
                await eventually(lambda: _up(http), timeout=15)
                r = await http.post(
                    "/api/chat/completions",
                    json={"userId": "ivy", "message": "Hi!", "stream": True},
                )
                said = [
                    json.loads(line[6:]) for line in r.text.splitlines() if line[:6] == "data: "
                ]
                assert "".join(c["content"] for c in said) == "Hello from the model."
            turn = r.headers["x-libra-turn"]
            await eventually(lambda: _projected(pool, turn), timeout=20)
    assert _violations(caplog) == []


async def _up(http: httpx.AsyncClient) -> bool:
    try:
        return (await http.get("/api/health")).status_code in (200, 503)
    except httpx.HTTPError:
        return False


async def _projected(pool, turn: str) -> bool:
    row = await pool.fetchrow(
        "SELECT t.status, (SELECT count(*) FROM messages m WHERE m.turn = t.turn) AS messages,"
        " (SELECT count(*) FROM memories) AS memories FROM turns t WHERE t.turn = $1",
        turn,
    )
    return (
        row is not None
        and row["status"] == "delivered"
        and row["messages"] == 2
        and (row["memories"] == 1)
    )


@contextlib.asynccontextmanager
async def _as_their_users(
    settings: Settings, server: EmbeddedNats, names: list[str]
) -> AsyncIterator[None]:
    """Runs each component on a connection of its own, logged in as its own user."""
    supervisors, logs = [], []
    try:
        for name in names:
            log = await EventLog.connect(server.url_for(name), name=name)
            logs.append(log)
            resources = Resources(settings, log, settings.database_url, settings.redis_url)
            supervisor = Supervisor(resources, [name])
            supervisors.append((supervisor, resources))
            await supervisor.start()
            await supervisor.wait_built()
        yield
    finally:
        for supervisor, resources in supervisors:
            await supervisor.stop()
            await resources.close()
        for log in logs:
            await log.close()


async def test_voice_components_reach_the_audio_as_they_need(
    eventlog: EventLog, nats_server: EmbeddedNats, caplog
) -> None:
    caplog.set_level(logging.WARNING)
    turn = make(
        TurnAccepted,
        conversation="discord-1-2",
        user="u1",
        text="say something",
        modality="voice",
        origin=ORIGIN,
    )
    reply = derive(
        turn,
        LlmCompleted,
        key="completed",
        text="Hello there.",
        provider="p",
        model="m",
        modality="voice",
        origin=ORIGIN,
    )
    await eventlog.publish_many([turn, reply])

    tts_log = await EventLog.connect(nats_server.url_for("tts"), name="tts")
    chain = TtsChain([EspeakEngine({"en": "en-us"})], timeout_s=10)
    runner = ConsumerRunner(tts_log, TtsProcessor(tts_log, await AudioStore.open(tts_log), chain))
    task = asyncio.create_task(runner.run())
    try:
        await eventually(lambda: _spoken(eventlog), timeout=30)
    finally:
        await runner.stop()
        await asyncio.wait_for(task, 10)
        await tts_log.close()
    [clip, *_] = [e for e in await stream_events(eventlog.js, "LIBRA", "libra.tts.>")]
    assert isinstance(clip, TtsSynthesized) and clip.audio.bucket == AUDIO_BUCKET

    for user in ("asr", "discord"):  # the asr hears utterances, Discord plays clips
        log = await EventLog.connect(nats_server.url_for(user), name=user)
        try:
            audio = await AudioStore.open(log)
            assert len(await audio.get(clip.audio)) == clip.audio.size > 0
        finally:
            await log.close()
    discord = await EventLog.connect(nats_server.url_for("discord"), name="discord")
    try:
        stored = await (await AudioStore.open(discord)).put(
            "utt/permission-test", b"\0\0" * 1600, format="pcm_s16le", sample_rate=16000
        )
        assert stored.duration_ms == 100
    finally:
        await discord.close()
    assert _violations(caplog) == []


@pytest.mark.parametrize("edge", ["http", "discord"])
async def test_an_edge_puts_and_reads_audio_but_cannot_empty_the_bucket(
    eventlog: EventLog, nats_server: EmbeddedNats, edge: str
) -> None:
    stream = f"OBJ_{AUDIO_BUCKET}"
    theirs = await (await AudioStore.open(eventlog)).put(
        "clip/someone-else", b"\1\0" * 1600, format="pcm_s16le", sample_rate=16000
    )
    log = await EventLog.connect(nats_server.url_for(edge), name=edge)
    try:
        audio = await AudioStore.open(log)
        mine = await audio.put("utt/mine", b"\0\0" * 1600, format="pcm_s16le", sample_rate=16000)
        assert await audio.get(theirs) == b"\1\0" * 1600 and mine.duration_ms == 100
        held = (await eventlog.js.stream_info(stream)).state.messages
        with pytest.raises(nats.js.errors.ServerError, match="rollup not permitted"):
            await log.js.publish(f"$O.{AUDIO_BUCKET}.C.x", b"", headers={"Nats-Rollup": "all"})
    finally:
        await log.close()
    async with login(nats_server, edge) as who:
        for api in ("STREAM.PURGE", "STREAM.DELETE", "STREAM.MSG.DELETE"):
            assert not await who.tries(f"$JS.API.{api}.{stream}")
    assert (await eventlog.js.stream_info(stream)).state.messages == held
    assert await (await AudioStore.open(eventlog)).get(mine) == b"\0\0" * 1600


async def _spoken(log: EventLog) -> bool:
    clips = await stream_events(log.js, "LIBRA", "libra.tts.>")
    return any(isinstance(c, TtsSynthesized) and c.final for c in clips)


async def test_replay_runs_as_its_own_user(
    settings: Settings, eventlog: EventLog, nats_server: EmbeddedNats, caplog
) -> None:
    caplog.set_level(logging.WARNING)
    said = text(conversation="http-kim", user="kim")
    await eventlog.publish(said)
    replayer = Settings.from_env(
        {
            "NATS_URL": nats_server.url_for("replay"),
            "DATABASE_URL": settings.database_url,
            "REDIS_URL": settings.redis_url,
        }
    )
    lines: list[str] = []
    result = await replay(replayer, "turns", Selection(user="kim"), run="perm", say=lines.append)
    assert result.inputs == 1 and result.outputs == 1 and result.errors == 0
    [accepted] = await stream_events(eventlog.js, "LIBRA_REPLAY", "replay.perm.>")
    assert isinstance(accepted, TurnAccepted) and accepted.causation == said.id
    assert _violations(caplog) == []
    assert encode_event(said)  # the input stayed where it was: nothing new in libra.>
    assert (await eventlog.js.stream_info("LIBRA")).state.messages == 1


async def test_admission_reads_the_servers_policies_as_its_own_user(
    settings: Settings, eventlog: EventLog, nats_server: EmbeddedNats, caplog
) -> None:
    caplog.set_level(logging.WARNING)
    origin = Origin(platform="discord", guild="5", channel="6", message="7")
    async with FakeLlmWire(reply=Behaviour.ok("ok")) as wire:
        s = answering_with(settings, wire, MODERATION_ENGINES="openai")
        await eventlog.publish(
            make(
                SessionSettings,
                conversation="discord-5-6",
                user="discord:admin",
                scope="guild:5",
                key="moderation.categories",
                value="none",
                origin=origin,
            )
        )
        said = make(
            TextReceived,
            conversation="discord-5-6",
            user="discord:ann",
            text="I will stab it",  # violence, for the fake classifier
            origin=origin,
        )
        async with _as_their_users(s, nats_server, ["turns"]):
            await eventlog.publish(said)
            await eventually(lambda: _decided(eventlog), timeout=20)
    [decision] = await stream_events(eventlog.js, "LIBRA", "libra.turn.>")
    assert isinstance(decision, TurnAccepted) and decision.moderation is not None
    assert decision.moderation.policy == "guild:5 categories=none"
    assert _violations(caplog) == []


async def _decided(log: EventLog) -> bool:
    return bool(await stream_events(log.js, "LIBRA", "libra.turn.>"))
