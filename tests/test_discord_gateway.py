"""The Discord gateway against a loopback Discord that hikari really talks to, on real servers.

The turns and llm processors' part is played by :class:`Responder`: it answers each
``text.received`` the log keeps with ``turn.accepted``, deltas and ``llm.completed`` (or a
rejection), derived from the input as the processors derive theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
import pytest
from nats.js.api import DeliverPolicy

from libra.contracts import (
    LlmCompleted,
    LlmDelta,
    LlmFailed,
    ReplyDelivered,
    SessionChat,
    SessionSettings,
    TextReceived,
    TurnAccepted,
    TurnRejected,
    conversation_id,
    decode_event,
    derive,
    make,
    new_id,
    stable_id,
)
from libra.contracts.events import Origin
from libra.gateway.discord.gateway import parse_shards
from libra.gateway.discord.recovery import undelivered
from libra.ops.components import Resources, Supervisor
from libra.ops.embedded import EmbeddedNats, free_port
from libra.ops.fakes.discord import (
    MANAGE_CHANNELS,
    MANAGE_GUILD,
    FakeDiscord,
    FakeUser,
    snowflake_ms,
)
from libra.runtime.config import ConfigError, Settings
from libra.runtime.eventlog import EventLog

from . import factories
from .discord_world import Gateways, World
from .helpers import eventually, stream_count, stream_events
from .stack import running

EDIT = r"/channels/\d+/messages/\d+"
POST = r"/channels/\d+/messages"


@dataclass(frozen=True)
class Rejected:
    reason: str
    message: str
    retry_after_s: float | None = None


@dataclass(frozen=True)
class Failing:
    pieces: list[str]
    message: str


Reply = list[str] | Rejected | Failing | None


class Responder:
    """Plays the turns and llm processors: answers every ``text.received`` the log keeps.

    Like the processors it reads the stream, not the subject: two gateways publish one message's
    event twice, and the stream keeps one.
    """

    def __init__(
        self, log: EventLog, script: Callable[[TextReceived], Reply], gap: float, first: float
    ) -> None:
        self.log = log
        self.script = script
        self.gap = gap
        self.first = first  # time to the first delta, as a model takes to start
        self.seen: list[TextReceived] = []
        self.completed: dict[str, LlmCompleted] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Responder:
        self._sub = await self.log.js.subscribe(
            "libra.text.received.>",
            stream="LIBRA",
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.NEW,
            cb=self._on_msg,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._sub.unsubscribe()
        for task in self._tasks:
            task.cancel()

    async def _on_msg(self, msg) -> None:
        said = decode_event(msg.data)
        assert isinstance(said, TextReceived)
        self.seen.append(said)
        task = asyncio.create_task(self.answer(said))
        self._tasks.add(task)

    async def answer(self, said: TextReceived) -> None:
        script = self.script(said)
        if script is None:
            return
        if isinstance(script, Rejected):
            await self.log.publish(
                derive(
                    said,
                    TurnRejected,
                    key="turn",
                    reason=script.reason,
                    message=script.message,
                    retry_after_s=script.retry_after_s,
                    origin=said.origin,
                )
            )
            return
        accepted = derive(said, TurnAccepted, key="turn", text=said.text, origin=said.origin)
        await self.log.publish(accepted)
        await asyncio.sleep(self.first)
        pieces = script.pieces if isinstance(script, Failing) else script
        for index, piece in enumerate(pieces):
            await self.log.publish(
                derive(
                    accepted,
                    LlmDelta,
                    key=f"delta/{index}",
                    index=index,
                    text=piece,
                    origin=said.origin,
                )
            )
            await asyncio.sleep(self.gap)
        if isinstance(script, Failing):
            await self.log.publish(
                derive(
                    accepted,
                    LlmFailed,
                    key="completed",
                    error="timeout",
                    message=script.message,
                    origin=said.origin,
                )
            )
            return
        done = derive(
            accepted,
            LlmCompleted,
            key="completed",
            text="".join(script),
            provider="fake",
            model="fake",
            deltas=len(script),
            origin=said.origin,
        )
        self.completed[said.id] = done
        await self.log.publish(done)


def replies_with(*pieces: str) -> Callable[[TextReceived], Reply]:
    return lambda _said: list(pieces)


@contextlib.asynccontextmanager
async def responder(
    log: EventLog, script: Callable[[TextReceived], Reply], *, gap: float = 0.0, first: float = 0.0
) -> AsyncIterator[Responder]:
    async with Responder(log, script, gap, first) as found:
        yield found


async def chat_mode_on(log: EventLog, world: World, *, channel: int | None = None) -> None:
    channel = channel or world.channel
    await log.publish(
        make(
            SessionChat,
            conversation=conversation_id("discord", world.guild, channel),
            user=str(world.admin.id),
            enabled=True,
            origin=Origin(platform="discord", guild=str(world.guild), channel=str(channel)),
        )
    )


async def delivered(log: EventLog, count: int, *, timeout: float = 15.0) -> list[ReplyDelivered]:
    """Waits until ``count`` replies were delivered; returns them."""
    async with asyncio.timeout(timeout):
        while await stream_count(log.js, "LIBRA", "libra.reply.delivered.>") < count:
            await asyncio.sleep(0.05)
    found = await stream_events(log.js, "LIBRA", "libra.reply.delivered.>")
    return [e for e in found if isinstance(e, ReplyDelivered)]


def replies_to(fake: FakeDiscord, message: dict) -> list[dict]:
    return [
        m
        for m in fake.bot_messages(int(message["channel_id"]))
        if (m.get("message_reference") or {}).get("message_id") == message["id"]
    ]


# --- streaming replies ----------------------------------------------------------------------


async def test_a_chat_mode_message_gets_a_reply_edited_as_deltas_arrive(
    eventlog: EventLog, world: World, gateways: Gateways, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake = world.fake
    await chat_mode_on(eventlog, world)
    await gateways.start()
    pieces = ["Hello", " Alice,", " nice", " to", " meet", " you", " today."]
    async with responder(eventlog, replies_with(*pieces), gap=0.45, first=0.5) as fake_llm:
        said = await fake.send_message(world.channel, "hi there", author=world.alice)
        [receipt] = await delivered(eventlog, 1)

    [reply] = fake.bot_messages(world.channel)
    assert reply["content"] == "Hello Alice, nice to meet you today."
    assert reply["message_reference"]["message_id"] == said["id"]
    assert receipt.message_ids == (reply["id"],)
    assert receipt.causation == fake_llm.completed[fake_llm.seen[0].id].id

    [event] = fake_llm.seen
    assert event.id == stable_id(f"discord-message:{said['id']}", snowflake_ms(int(said["id"])))
    assert event.conversation == world.conversation
    assert event.user == f"discord:{world.alice.id}"
    assert event.origin.message == said["id"] and event.origin.channel == str(world.channel)

    posts = fake.calls_to("POST", POST)
    edits = [c for c in fake.calls_to("PATCH", EDIT) if c.path.endswith(reply["id"])]
    typing = fake.calls_to("POST", r"/channels/\d+/typing")
    assert len(posts) == 1 and posts[0].body["content"] == "Hello"
    assert typing and typing[0].at < posts[0].at
    assert len(edits) >= 2, "the reply is edited while it streams, not only at the end"
    writes = [posts[0].at] + [e.at for e in edits]
    assert all(b - a >= 0.95 for a, b in itertools.pairwise(writes))
    assert caplog.records and fake.token not in caplog.text


async def test_a_5000_character_reply_arrives_as_several_messages_no_fence_broken(
    eventlog: EventLog, world: World, gateways: Gateways
) -> None:
    fake = world.fake
    await chat_mode_on(eventlog, world)
    await gateways.start()
    prose = " ".join(f"Sentence number {i} explains one more thing." for i in range(32))
    code = "\n".join(f"value_{i} = compute({i})  # step {i}" for i in range(70))
    text = f"{prose}\n\n```python\n{code}\n```\n\n{prose}"
    assert 4900 < len(text) < 5300
    pieces = [text[i : i + 400] for i in range(0, len(text), 400)]
    async with responder(eventlog, replies_with(*pieces), gap=0.02):
        said = await fake.send_message(world.channel, "write a lot", author=world.alice)
        [receipt] = await delivered(eventlog, 1)

    messages = fake.bot_messages(world.channel)
    assert len(messages) >= 3
    assert list(receipt.message_ids) == [m["id"] for m in messages]
    assert replies_to(fake, said) == messages[:1], "only the first message is a reply"
    for message in messages:
        assert len(message["content"]) <= 2000
        assert message["content"].count("```") % 2 == 0, message["content"]
    marks = re.compile(r"```[A-Za-z0-9_+\-.#]*|\s")
    joined = "\n".join(m["content"] for m in messages)
    assert marks.sub("", joined) == marks.sub("", text)
    opened = [m for m in messages if m["content"].startswith("```python")]
    assert opened, "the block cut by a split is reopened with its language"


async def test_a_429_on_an_edit_is_waited_out_and_the_reply_still_completes(
    eventlog: EventLog, world: World, gateways: Gateways
) -> None:
    fake = world.fake
    await chat_mode_on(eventlog, world)
    await gateways.start(discord_edit_interval_sec=0.2)
    fake.rate_limit("PATCH", EDIT, times=1, retry_after=0.8)
    async with responder(eventlog, replies_with("one", " two", " three"), gap=0.3):
        await fake.send_message(world.channel, "count", author=world.alice)
        await delivered(eventlog, 1)

    [reply] = fake.bot_messages(world.channel)
    assert reply["content"] == "one two three"
    edits = fake.calls_to("PATCH", EDIT)
    limited = [i for i, c in enumerate(edits) if c.status == 429]
    assert limited == [0]
    assert edits[1].status == 200
    assert edits[1].at - edits[0].at >= 0.75, "hikari waited for the bucket to reset"


async def test_rejected_and_failed_turns_get_a_short_message(
    eventlog: EventLog, world: World, gateways: Gateways
) -> None:
    fake = world.fake
    await chat_mode_on(eventlog, world)
    await gateways.start()
    slow_down = Rejected("rate_limited", "slow down — try again in 6 s", 6.0)
    async with responder(eventlog, lambda _said: slow_down):
        said = await fake.send_message(world.channel, "again!", author=world.alice)
        await fake.wait_for(lambda: bool(replies_to(fake, said)))

    [notice] = replies_to(fake, said)
    assert notice["content"] == "slow down — try again in 6 s"
    assert await stream_count(eventlog.js, "LIBRA", "libra.reply.delivered.>") == 0


async def test_a_message_with_a_lone_surrogate_is_answered_with_it_replaced(
    eventlog: EventLog, world: World, gateways: Gateways
) -> None:
    """Discord's JSON may spell a lone surrogate (``\\ud800``): it cannot go into an event as it
    is, so it becomes U+FFFD and the rest of the message is answered."""
    fake = world.fake
    await chat_mode_on(eventlog, world)
    await gateways.start()
    async with responder(eventlog, replies_with("got it")) as fake_llm:
        said = await fake.send_message(world.channel, "odd \ud800 text", author=world.alice)
        await delivered(eventlog, 1)

    assert [e.text for e in fake_llm.seen] == ["odd \ufffd text"]
    assert [r["content"] for r in replies_to(fake, said)] == ["got it"]


async def test_a_reply_that_fails_midway_keeps_what_was_said_and_says_why(
    eventlog: EventLog, world: World, gateways: Gateways
) -> None:
    fake = world.fake
    await chat_mode_on(eventlog, world)
    await gateways.start()
    broken = Failing(["The answer", " is"], "Sorry, the model stopped answering.")
    async with responder(eventlog, lambda _said: broken, gap=1.2):  # edited, then idle
        said = await fake.send_message(world.channel, "tell me", author=world.alice)
        await fake.wait_for(lambda: len(fake.bot_messages(world.channel)) == 2, timeout=15)

    partial, notice = fake.bot_messages(world.channel)
    assert partial["content"] == "The answer is"
    assert partial["message_reference"]["message_id"] == said["id"]
    assert notice["content"] == "Sorry, the model stopped answering."
    assert await stream_count(eventlog.js, "LIBRA", "libra.reply.delivered.>") == 0


async def _answer_twice(log: EventLog, said: TextReceived, first: list[str], second: list[str]):
    """Plays an llm killed after streaming ``first`` whose restart streams ``second``: two
    attempts at one turn, each from index 0, as the llm processor numbers them."""
    accepted = derive(said, TurnAccepted, key="turn", text=said.text, origin=said.origin)
    await log.publish(accepted)
    now_ms = int(time.time() * 1000)
    for attempt, pieces in ((new_id(at_ms=now_ms - 5000), first), (new_id(at_ms=now_ms), second)):
        for index, piece in enumerate(pieces):
            await log.publish(
                derive(
                    accepted,
                    LlmDelta,
                    key=f"delta/{attempt}/{index}",
                    index=index,
                    text=piece,
                    attempt=attempt,
                    origin=said.origin,
                )
            )
            await asyncio.sleep(0.5)  # an edit is due between two pieces
    await log.publish(
        derive(
            accepted,
            LlmCompleted,
            key="completed",
            text="".join(second),
            provider="f",
            model="f",
            origin=said.origin,
        )
    )


async def test_a_reply_restarted_by_the_llm_starts_over_not_glued_to_the_first_try(
    eventlog: EventLog, world: World, gateways: Gateways
) -> None:
    fake = world.fake
    await chat_mode_on(eventlog, world)
    await gateways.start(discord_edit_interval_sec=0.2)
    message = await fake.send_message(world.channel, "hello?", author=world.alice)
    [said] = await received(eventlog, 1)
    await _answer_twice(eventlog, said, ["Hello", " w"], ["Hel", "lo wor", "ld!"])
    await delivered(eventlog, 1)

    [reply] = replies_to(fake, message)
    assert reply["content"] == "Hello world!"
    writes = [
        c.body["content"]
        for c in fake.calls_to("POST", POST) + fake.calls_to("PATCH", EDIT)
        if c.status == 200
    ]
    assert "Hel" in writes, "the second attempt is shown from its start"
    assert all("Hello world!".startswith(w) for w in writes), writes


async def test_silence_from_the_processors_ends_in_an_apology(
    eventlog: EventLog, world: World, gateways: Gateways
) -> None:
    fake = world.fake
    await chat_mode_on(eventlog, world)
    await gateways.start(reply_idle_s=1.0)
    async with responder(eventlog, lambda _said: None):
        said = await fake.send_message(world.channel, "hello?", author=world.alice)
        await fake.wait_for(lambda: bool(replies_to(fake, said)), timeout=15)

    [notice] = replies_to(fake, said)
    assert notice["content"] == "Sorry, no answer came in time. Please try again in a moment."
    assert fake.calls_to("POST", r"/channels/\d+/typing"), "it showed it was working on it"


# --- who is answered ------------------------------------------------------------------------


async def test_mentions_replies_dms_and_threads_are_answered_other_messages_not(
    eventlog: EventLog, world: World, gateways: Gateways
) -> None:
    fake = world.fake
    bot = fake.user("another bot", bot=True)
    dm = fake.add_channel(None)
    thread = fake.add_thread(world.channel, "side talk")  # follows its channel's chat mode
    await chat_mode_on(eventlog, world)
    await gateways.start()
    async with responder(eventlog, replies_with("sure")) as fake_llm:
        await fake.send_message(world.quiet, "talking among ourselves", author=world.alice)
        await fake.send_message(world.channel, "beep", author=bot)
        mention = await fake.send_message(
            world.quiet, "what's up?", author=world.alice, mention_bot=True
        )
        await delivered(eventlog, 1)
        [answer] = replies_to(fake, mention)
        follow_up = await fake.send_message(
            world.quiet, "and then?", author=world.alice, reply_to=int(answer["id"])
        )
        await fake.send_message(dm, "hello in private", author=world.alice)
        await fake.send_message(thread, "in the thread", author=world.alice)
        await delivered(eventlog, 4)

    said = {e.text: e for e in fake_llm.seen}
    assert set(said) == {"what's up?", "and then?", "hello in private", "in the thread"}
    assert said["what's up?"].conversation == conversation_id("discord", world.guild, world.quiet)
    assert [(c.role, c.text) for c in said["and then?"].context] == [
        ("user", "what's up?"),
        ("assistant", "sure"),
    ]
    assert said["hello in private"].conversation == conversation_id("discord", "dm", dm)
    assert said["hello in private"].origin.guild == ""
    threaded = said["in the thread"]
    assert threaded.conversation == conversation_id("discord", world.guild, thread)
    assert (threaded.origin.channel, threaded.origin.thread) == (str(world.channel), str(thread))
    assert replies_to(fake, follow_up), "a reply to Libra is answered where chat mode is off"


async def test_attachments_are_seen_read_in_or_named(
    eventlog: EventLog, world: World, gateways: Gateways
) -> None:
    fake = world.fake
    await chat_mode_on(eventlog, world)
    gateway = await gateways.start(
        primary_model="openai:gpt-4o-mini", discord_text_attachment_chars=12
    )
    files = (
        fake.attachment("cat.png", b"\x89PNG....", "image/png"),
        fake.attachment("notes.txt", "첫 줄\nsecond line\nthird".encode(), "text/plain"),
        fake.attachment("song.mp3", b"ID3" + bytes(100), "audio/mpeg"),
    )
    async with responder(eventlog, replies_with("got them")) as fake_llm:
        await fake.send_message(world.channel, "look", author=world.alice, attachments=files)
        await delivered(eventlog, 1)
        image, text, other = fake_llm.seen[0].attachments
        await eventlog.publish(
            make(
                SessionSettings,
                conversation=world.conversation,
                scope=f"guild:{world.guild}",
                key="model",
                value="groq:llama-3.3-70b",
                origin=Origin(platform="discord"),
            )
        )

        async def model_seen() -> bool:  # the gateway follows the log
            return gateway.view.setting(f"guild:{world.guild}", "model") == "groq:llama-3.3-70b"

        await eventually(model_seen)
        await fake.send_message(
            world.channel, "and now?", author=world.alice, attachments=files[:1]
        )
        await delivered(eventlog, 2)

    assert (image.kind, image.url) == ("image", files[0]["url"])
    assert (text.kind, text.text) == ("text", "첫 줄\nsecond l" + "\n[… truncated]")
    assert (other.kind, other.name, other.size) == ("other", "song.mp3", 103)
    [blind] = fake_llm.seen[1].attachments
    assert (blind.kind, blind.name, blind.url) == ("image", "cat.png", "")


async def test_the_access_file_is_read_again_when_it_changes(
    eventlog: EventLog, world: World, gateways: Gateways, tmp_path
) -> None:
    fake = world.fake
    rules = tmp_path / "access.toml"
    rules.write_text(f'[block]\nusers = ["{world.alice.id}"]\n')
    await chat_mode_on(eventlog, world)
    gateway = await gateways.start(discord_access_file=str(rules))
    async with responder(eventlog, replies_with("hi")) as fake_llm:
        await fake.send_message(world.channel, "am I blocked?", author=world.alice)
        await fake.send_message(world.channel, "I am not", author=world.admin)
        await delivered(eventlog, 1)
        rules.write_text("[block]\nusers = []\n")

        async def unblocked() -> bool:  # the file is looked at once a second
            return str(world.alice.id) not in gateway.access.rules().block.users

        await eventually(unblocked)
        await fake.send_message(world.channel, "and now?", author=world.alice)
        await delivered(eventlog, 2)

    assert [e.text for e in fake_llm.seen] == ["I am not", "and now?"]


# --- slash commands -------------------------------------------------------------------------


async def test_chat_on_is_refused_without_manage_channels_and_survives_a_restart(
    settings: Settings, eventlog: EventLog, world: World, gateways: Gateways
) -> None:
    fake = world.fake
    on = [{"type": 1, "name": "on", "options": []}]
    async with running(settings, ["sessions"]):
        first = await gateways.start()
        refused = await fake.invoke("chat", channel_id=world.quiet, user=world.alice, options=on)
        await asyncio.wait_for(refused.responded.wait(), 10)
        assert refused.ephemeral
        assert refused.content == "Only members who can manage this channel can switch chat mode."

        allowed = await fake.invoke(
            "chat",
            channel_id=world.quiet,
            user=world.admin,
            options=on,
            permissions=MANAGE_CHANNELS,
            locale="ko",
        )
        await asyncio.wait_for(allowed.responded.wait(), 10)
        assert not allowed.ephemeral
        assert allowed.content == "채팅 모드를 켰어요. 이 채널의 모든 메시지에 답할게요."
        [switched] = await stream_events(eventlog.js, "LIBRA", "libra.session.chat.>")
        assert switched.enabled and switched.user == f"discord:{world.admin.id}"
        assert switched.conversation == conversation_id("discord", world.guild, world.quiet)

        async with asyncio.timeout(10):  # the sessions projection folds it
            while not await _chat_row(settings.database_url, switched.conversation):
                await asyncio.sleep(0.05)
        await gateways.stop(first)
        second = await gateways.start()
        assert second.view.chat_state(switched.conversation) is True

        async with responder(eventlog, replies_with("I'm listening")) as fake_llm:
            said = await fake.send_message(world.quiet, "anyone?", author=world.alice)
            await delivered(eventlog, 1)
    assert [e.text for e in fake_llm.seen] == ["anyone?"]
    assert replies_to(fake, said)[0]["content"] == "I'm listening"


async def _chat_row(database_url: str, conversation: str) -> bool:
    conn = await asyncpg.connect(database_url)
    try:
        return bool(
            await conn.fetchval(
                "SELECT enabled FROM chat_channels WHERE conversation = $1", conversation
            )
        )
    finally:
        await conn.close()


async def test_model_persona_reset_stats_and_help(
    eventlog: EventLog, world: World, gateways: Gateways, pool: asyncpg.Pool
) -> None:
    fake = world.fake
    await gateways.start(primary_model="groq:llama-3.3-70b")
    name = [{"type": 3, "name": "name", "value": "openai:gpt-4o"}]

    async def ask(command: str, user: FakeUser, options=None, **kw) -> str:
        done = await fake.invoke(
            command, channel_id=world.channel, user=user, options=options, **kw
        )
        await asyncio.wait_for(done.responded.wait(), 10)
        assert done.ephemeral
        return done.content

    assert await ask("model", world.alice) == "Model for this server: groq:llama-3.3-70b"
    assert await ask("model", world.alice, name) == (
        "Only server admins (Manage Server) can change that."
    )
    assert await ask("model", world.admin, name, permissions=MANAGE_GUILD) == (
        "Model for this server is now openai:gpt-4o."
    )
    assert await ask("model", world.alice) == "Model for this server: openai:gpt-4o"
    prompt = [{"type": 3, "name": "prompt", "value": "You are a pirate."}]
    assert await ask("persona", world.admin, prompt, permissions=MANAGE_GUILD) == (
        "System prompt for this server updated."
    )
    assert await ask("reset", world.alice) == "Done: I forgot our conversation here."

    await pool.execute(
        "INSERT INTO turns (turn, conversation, user_id, platform, received_at, prompt_tokens,"
        " completion_tokens) VALUES ('t1', 'c', $1, 'discord', now(), 100, 20),"
        " ('t2', 'c', $1, 'discord', now(), 50, 5),"
        " ('t3', 'c', $1, 'discord', now() - interval '2 days', 9, 9),"
        " ('t4', 'c', $2, 'http', now(), 7, 7)",
        f"discord:{world.alice.id}",
        f"http:{world.alice.id}",  # the same digits on HTTP are someone else
    )
    assert await ask("stats", world.alice) == (
        "Today: 2 turns, 150 prompt tokens, 25 reply tokens."
    )
    assert "Mention me" in await ask("help", world.alice)
    assert "저를 멘션" in await ask("help", world.alice, locale="ko")

    settings_events = await stream_events(eventlog.js, "LIBRA", "libra.session.settings.>")
    assert [(e.scope, e.key, e.value) for e in settings_events] == [
        (f"guild:{world.guild}", "model", "openai:gpt-4o"),
        (f"guild:{world.guild}", "persona", "You are a pirate."),
    ]
    [reset] = await stream_events(eventlog.js, "LIBRA", "libra.session.memory_reset.>")
    assert (reset.scope, reset.user, reset.conversation) == (
        "conversation",
        f"discord:{world.alice.id}",
        world.conversation,
    )


async def test_commands_are_synced_with_korean_names_to_the_configured_guild(
    world: World, gateways: Gateways
) -> None:
    fake = world.fake
    await gateways.start(discord_guild_id=str(world.guild))
    synced = {c["name"]: c for c in fake.commands[world.guild]}
    assert set(synced) == {
        *("chat", "reset", "model", "persona", "moderation", "stats", "help"),
        *("join", "leave", "record", "stop", "voice"),
        *("learn", "knowledge", "tools"),
    }
    assert [o["name"] for o in synced["voice"]["options"]] == ["auto", "manual"]
    moderation = {o["name"]: o for o in synced["moderation"]["options"]}
    assert list(moderation) == ["show", "categories", "threshold", "log"]
    assert synced["moderation"]["name_localizations"]["ko"] == "검토"
    [category, score] = moderation["threshold"]["options"]
    assert [c["value"] for c in category["choices"]][:2] == ["harassment", "hate"]
    assert (score["min_value"], score["max_value"], score["required"]) == (0, 1, False)
    assert synced["chat"]["name_localizations"]["ko"] == "채팅"
    assert synced["stats"]["description_localizations"]["ko"] == "오늘 내 사용량: 대화 수와 토큰"
    assert [o["name"] for o in synced["chat"]["options"]] == ["on", "off"]
    assert fake.commands.get(None) in (None, [])
    for command in synced.values():
        assert 1 <= len(command["description"]) <= 100
        assert re.fullmatch(r"[-_\w]{1,32}", command["name"])


# --- more than one connection, more than one instance ---------------------------------------


async def test_a_dropped_websocket_is_resumed_and_no_message_is_answered_twice(
    eventlog: EventLog, world: World, gateways: Gateways
) -> None:
    fake = world.fake
    await chat_mode_on(eventlog, world)
    await gateways.start()
    async with responder(eventlog, replies_with("pong")) as fake_llm:
        first = await fake.send_message(world.channel, "ping 1", author=world.alice)
        await delivered(eventlog, 1)
        await fake.drop(replay_overlap=3)  # the resume sends "ping 1" and its replies again
        second = await fake.send_message(world.channel, "ping 2", author=world.alice)
        await fake.wait_for(lambda: fake.sessions[0].resumes == 1, timeout=20)
        await delivered(eventlog, 2)
        # A later message's reply comes after a second answer to "ping 1" would have.
        third = await fake.send_message(world.channel, "ping 3", author=world.alice)
        await delivered(eventlog, 3)

    assert fake.identifies == 1, "the session was resumed, not identified again"
    replayed = [f["d"].get("id") for f in fake.sessions[0].replayed if f["t"] == "MESSAGE_CREATE"]
    assert first["id"] in replayed and second["id"] in replayed
    assert len(replies_to(fake, first)) == 1
    assert len(replies_to(fake, second)) == 1
    assert len(replies_to(fake, third)) == 1
    assert [e.text for e in fake_llm.seen] == ["ping 1", "ping 2", "ping 3"]


async def test_heartbeats_are_acknowledged(
    settings: Settings, database_url: str, eventlog: EventLog
) -> None:
    async with FakeDiscord(heartbeat_interval_ms=150) as fake:
        gateways = Gateways(settings, fake, database_url)
        try:
            gateway = await gateways.start()
            await fake.wait_for(lambda: fake.heartbeats >= 4, timeout=5)
            latency = gateway.bot.heartbeat_latency
        finally:
            await gateways.stop_all()
    assert 0 <= latency < 1, "hikari saw its heartbeats acknowledged"
    assert len(fake.sessions) == 1 and fake.sessions[0].resumes == 0, "no zombie reconnects"


async def test_two_gateway_instances_on_one_fake_answer_once_without_redis(
    eventlog: EventLog, world: World, gateways: Gateways
) -> None:
    fake = world.fake
    await chat_mode_on(eventlog, world)
    nowhere = f"redis://127.0.0.1:{free_port()}"  # the log alone says who answers
    await gateways.start(redis_url=nowhere)
    await gateways.start(redis_url=nowhere)
    assert len(fake.sessions) == 2
    async with responder(eventlog, replies_with("only ", "once")) as fake_llm:
        sent = [
            await fake.send_message(world.channel, f"message {i}", author=world.alice)
            for i in range(6)
        ]
        await delivered(eventlog, 6)
        # A later message's reply comes after a second answer to the six would have.
        sent.append(await fake.send_message(world.channel, "and one more", author=world.alice))
        await delivered(eventlog, 7)

    assert [len(replies_to(fake, m)) for m in sent] == [1] * 7
    assert len(fake.bot_messages(world.channel)) == 7
    assert await stream_count(eventlog.js, "LIBRA", "libra.text.received.>") == 7
    assert len(fake_llm.seen) == 7
    creates = {s.id: sum(1 for _, f in s.sent if f["t"] == "MESSAGE_CREATE") for s in fake.sessions}
    assert all(count >= 7 for count in creates.values()), "both instances got every message"


async def test_each_sharded_gateway_answers_the_servers_of_its_shard(
    settings: Settings, eventlog: EventLog, database_url: str
) -> None:
    async with FakeDiscord(shards=2) as fake:
        guilds: dict[int, int] = {}
        while len(guilds) < 2:
            guild = fake.add_guild()
            guilds.setdefault(fake.shard_of(guild), guild)
        channels = {shard: fake.add_channel(guild) for shard, guild in guilds.items()}
        for shard, guild in guilds.items():
            world = World(
                fake, guild, channels[shard], channels[shard], fake.user("a"), fake.user("b")
            )
            await chat_mode_on(eventlog, world)
        gateways = Gateways(settings, fake, database_url)
        try:
            for shard in (0, 1):
                await gateways.start(discord_shard_ids=str(shard), discord_shard_count=2)
            assert sorted(s.shard for s in fake.sessions) == [(0, 2), (1, 2)]
            person = fake.user("alice")
            async with responder(eventlog, replies_with("hello")):
                sent = {
                    shard: await fake.send_message(channel, "hi", author=person)
                    for shard, channel in channels.items()
                }
                await delivered(eventlog, 2)
        finally:
            await gateways.stop_all()

    for shard, message in sent.items():
        assert len(replies_to(fake, message)) == 1
        [session] = [s for s in fake.sessions if s.shard[0] == shard]
        got = {f["d"].get("id") for _, f in session.sent if f["t"] == "MESSAGE_CREATE"}
        assert message["id"] in got and sent[1 - shard]["id"] not in got


# --- crashes, restarts and outages ------------------------------------------------------
# A gateway is "killed" by Gateways.crash: its replies under way end where they are. The
# processors' part is played by publishing the turn's events when each case needs them.


def turn_of(said: TextReceived, pieces: list[str]) -> list:
    """The events the turns and llm processors make for ``said``: accepted, deltas, completed."""
    accepted = derive(said, TurnAccepted, key="turn", text=said.text, origin=said.origin)
    deltas = [
        derive(accepted, LlmDelta, key=f"delta/{i}", index=i, text=piece, origin=said.origin)
        for i, piece in enumerate(pieces)
    ]
    done = derive(
        accepted,
        LlmCompleted,
        key="completed",
        text="".join(pieces),
        provider="fake",
        model="fake",
        deltas=len(pieces),
        origin=said.origin,
    )
    return [accepted, *deltas, done]


async def received(log: EventLog, count: int) -> list[TextReceived]:
    """Waits until the log holds ``count`` messages; returns them."""

    async def logged() -> bool:
        return await stream_count(log.js, "LIBRA", "libra.text.received.>") >= count

    await eventually(logged, timeout=15)
    return await stream_events(log.js, "LIBRA", "libra.text.received.>")


async def test_a_gateway_killed_before_it_replied_is_answered_once_by_the_next(
    eventlog: EventLog, world: World, gateways: Gateways, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="libra.discord.recovery")
    fake = world.fake
    await chat_mode_on(eventlog, world)
    first = await gateways.start()
    message = await fake.send_message(world.channel, "are you there?", author=world.alice)
    [said] = await received(eventlog, 1)  # logged, and no one has answered it yet
    await gateways.crash(first)
    await eventlog.publish_many(turn_of(said, ["Yes, ", "still here."]))

    # Two gateways start together: one of them recovers the turn, the other leaves it.
    await asyncio.gather(*(gateways.start(recover_grace_s=2.0) for _ in range(2)))
    [receipt] = await delivered(eventlog, 1)
    await eventually(_logged(caplog, "another gateway recovers the reply"))

    [reply] = replies_to(fake, message)
    assert reply["content"] == "Yes, still here."
    assert fake.bot_messages(world.channel) == [reply]
    assert receipt.message_ids == (reply["id"],) and receipt.turn == said.id
    [claim] = await stream_events(eventlog.js, "LIBRA", "libra.reply.claimed.>")
    assert claim.turn == said.id
    assert _count(caplog, "recovering the reply") == 1
    assert _count(caplog, "another gateway recovers the reply") == 1


async def test_a_gateway_killed_after_posting_has_its_reply_edited_not_posted_again(
    eventlog: EventLog, world: World, gateways: Gateways
) -> None:
    fake = world.fake
    await chat_mode_on(eventlog, world)
    first = await gateways.start()
    message = await fake.send_message(world.channel, "tell me a story", author=world.alice)
    [said] = await received(eventlog, 1)
    accepted, opening, rest, done = turn_of(said, ["Once upon a time", ", a log."])
    await eventlog.publish_many([accepted, opening])
    await fake.wait_for(lambda: bool(replies_to(fake, message)), timeout=15)
    await gateways.crash(first)  # posted, never delivered
    [posted] = replies_to(fake, message)
    assert posted["content"] == "Once upon a time"

    await gateways.start(recover_grace_s=0.3)
    await eventlog.publish_many([rest, done])  # the reply completes after the restart
    [receipt] = await delivered(eventlog, 1)

    assert fake.bot_messages(world.channel) == [posted], "one message, the one posted first"
    assert posted["content"] == "Once upon a time, a log."
    assert receipt.message_ids == (posted["id"],)
    edits = [c for c in fake.calls_to("PATCH", EDIT) if c.path.endswith(posted["id"])]
    assert edits and edits[-1].body["content"] == "Once upon a time, a log."


async def test_recovery_leaves_the_messages_that_came_after_it_connected(
    eventlog: EventLog,
) -> None:
    """A gateway answers live what was written since it began connecting: its recovery takes
    only what came before, or it would claim a turn it answers itself, and a crash of it would
    leave that turn claimed by no one who answers it."""
    said = factories.text()
    await eventlog.publish(said)
    before = said.at - timedelta(seconds=1)
    after = said.at + timedelta(seconds=1)
    since = said.at - timedelta(seconds=60)

    def everything(_said: TextReceived) -> bool:
        return True

    assert await undelivered(eventlog, since=since, before=before, mine=everything) == []
    found = await undelivered(eventlog, since=since, before=after, mine=everything)
    assert [s.id for s in found] == [said.id]


async def test_a_reply_delivered_while_a_gateway_starts_is_not_recovered(
    eventlog: EventLog, world: World, gateways: Gateways, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="libra.discord.recovery")
    fake = world.fake
    await chat_mode_on(eventlog, world)
    await gateways.start()
    message = await fake.send_message(world.channel, "quick one", author=world.alice)
    [said] = await received(eventlog, 1)
    # A second gateway starts while the first still answers: it waits its grace period, sees the
    # first one deliver, and leaves the turn.
    await gateways.start(recover_grace_s=5.0)
    await eventually(_logged(caplog, "recovering the reply"))
    await eventlog.publish_many(turn_of(said, ["Done."]))
    await delivered(eventlog, 1)
    await eventually(_logged(caplog, "was delivered meanwhile"), timeout=15)

    assert [m["content"] for m in replies_to(fake, message)] == ["Done."]
    assert len(fake.bot_messages(world.channel)) == 1
    assert await stream_count(eventlog.js, "LIBRA", "libra.reply.claimed.>") == 1
    assert await stream_count(eventlog.js, "LIBRA", "libra.reply.delivered.>") == 1


def _count(caplog: pytest.LogCaptureFixture, words: str) -> int:
    return sum(words in r.getMessage() for r in caplog.records)


def _logged(caplog: pytest.LogCaptureFixture, words: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return _count(caplog, words) > 0

    return check


async def test_with_nats_down_a_message_gets_a_readable_reply_within_5_s(
    settings: Settings,
    eventlog: EventLog,
    world: World,
    gateways: Gateways,
    nats_server: EmbeddedNats,
) -> None:
    fake = world.fake
    await chat_mode_on(eventlog, world)
    gateway = await gateways.start()
    await nats_server.stop()
    try:
        sent_at = time.monotonic()
        message = await fake.send_message(world.channel, "hello?", author=world.alice)
        await fake.wait_for(lambda: bool(replies_to(fake, message)), timeout=5)
        took = time.monotonic() - sent_at
    finally:
        await nats_server.start()
    [notice] = replies_to(fake, message)
    assert notice["content"] == "I can't answer right now, try again in a minute."
    assert took < 5

    async def reconnected() -> bool:
        return gateway.log.nc.is_connected

    await eventually(reconnected, timeout=15)
    await eventlog.provision(settings)  # LIBRA_LIVE is in memory: a restart of NATS loses it
    async with responder(eventlog, replies_with("I'm back.")):
        again = await fake.send_message(world.channel, "and now?", author=world.alice)
        await delivered(eventlog, 1)
    assert [m["content"] for m in replies_to(fake, again)] == ["I'm back."]
    logged = await stream_events(eventlog.js, "LIBRA", "libra.text.received.>")
    assert [e.text for e in logged] == ["and now?"], "what was refused is not answered later"


def test_shards_are_read_from_the_settings() -> None:
    assert parse_shards("", 0) == (None, None)
    assert parse_shards("", 4) == (None, 4)
    assert parse_shards("0-2,5", 8) == ([0, 1, 2, 5], 8)
    with pytest.raises(ConfigError, match="DISCORD_SHARD_COUNT"):
        parse_shards("1", 0)
    with pytest.raises(ConfigError, match="below 2"):
        parse_shards("0-2", 2)


async def test_libra_up_leaves_discord_off_without_a_token(
    settings: Settings, eventlog: EventLog, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="libra.supervisor")
    resources = Resources(settings, eventlog, settings.database_url, settings.redis_url)
    supervisor = Supervisor(resources, ["discord"])
    await supervisor.start()
    await supervisor.stop()
    await resources.close()
    assert [r.getMessage() for r in caplog.records] == [
        "component discord is off: DISCORD_TOKEN is not set"
    ]
