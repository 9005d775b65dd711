"""A server's knowledge base on Discord, on real servers and the loopback Discord: /learn (Manage
Server) adds a file to the server's scope, /knowledge lists and removes only that scope's
documents, refused files add nothing, and a reply drawn from documents (or tools) shows its
sources under it, without the sources line reaching history or a reply chain."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from libra.contracts import (
    KnowledgeAdded,
    KnowledgeRemoved,
    LlmCompleted,
    RetrievedChunk,
    TextReceived,
    ToolUse,
    TurnAccepted,
    decode_event,
    derive,
)
from libra.gateway.discord.outcome import footer, without_footer
from libra.gateway.discord.split import MESSAGE_LIMIT, split_message, with_footer
from libra.ops.fakes.discord import EVERYDAY_PERMISSIONS, MANAGE_GUILD, FakeUser, Interaction
from libra.ops.fakes.llm_wire import OPENAI_CHAT, Behaviour, FakeLlmWire
from libra.processors.knowledge.documents import Limits, add_document
from libra.runtime.config import Settings
from libra.runtime.documents import DocumentStore
from libra.runtime.eventlog import EventLog

from . import factories
from .discord_world import Gateways, World, run_autocomplete, run_subcommand
from .helpers import eventually, stream_count, stream_events
from .knowledge_docs import GUIDE_MD, PAGE_HTML
from .stack import TEXT_PIPELINE, answering_with, running
from .test_discord_gateway import delivered

MAX_BYTES = 10_000
LIMITS = Limits(max_bytes=MAX_BYTES, chunk_tokens=100, chunk_overlap=10)
ADDED = re.compile(
    r"Added \*\*(?P<title>.+)\*\* to this server's knowledge base: document `(?P<document>\w+)`,"
    r" (?P<chunks>\d+) chunks?\. I answer from it and cite it from now on\."
)


async def _learn(
    world: World,
    user: FakeUser,
    file: dict[str, Any],
    *,
    title: str | None = None,
    permissions: int = MANAGE_GUILD,
    channel: int | None = None,
    locale: str = "en-US",
) -> Interaction:
    options: list[dict[str, Any]] = [{"type": 11, "name": "file", "value": file}]
    if title is not None:
        options.append({"type": 3, "name": "title", "value": title})
    done = await world.fake.invoke(
        "learn",
        channel_id=channel or world.channel,
        user=user,
        options=options,
        permissions=permissions,
        locale=locale,
    )
    await world.fake.wait_for(lambda: done.answered, timeout=20)  # deferred, then followed up
    assert done.ephemeral
    return done


async def _knowledge(
    world: World,
    sub: str,
    user: FakeUser,
    *,
    document: str | None = None,
    permissions: int = MANAGE_GUILD,
) -> str:
    options = [] if document is None else [{"type": 3, "name": "document", "value": document}]
    return await run_subcommand(
        world, "knowledge", sub, user, options=options, permissions=permissions
    )


async def _documents(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT document, scope, title, added_by, chunks FROM knowledge_documents ORDER BY added_at"
    )


# --- /learn -----------------------------------------------------------------------------------


async def test_learn_adds_a_file_to_the_servers_knowledge_base_for_admins_only(
    settings: Settings, eventlog: EventLog, world: World, gateways: Gateways, pool: asyncpg.Pool
) -> None:
    fake = world.fake
    async with running(settings, ["knowledge"]):
        await gateways.start(knowledge_max_document_bytes=MAX_BYTES)
        guide = fake.attachment("guide.md", GUIDE_MD.encode(), "text/markdown; charset=utf-8")

        refused = await _learn(world, world.alice, guide, permissions=EVERYDAY_PERMISSIONS)
        assert refused.content == "Only server admins (Manage Server) can change that."
        dm = fake.add_channel(None)
        in_dm = await _learn(world, world.admin, guide, channel=dm)
        assert in_dm.content == "That works in a server, not in DMs."
        assert fake.downloads == []  # refused before the file was fetched
        assert await stream_count(eventlog.js, "LIBRA", "libra.knowledge.>") == 0

        added = await _learn(world, world.admin, guide, title="Libra guide")
        found = ADDED.fullmatch(added.content)
        assert found, added.content
        assert found["title"] == "Libra guide" and int(found["chunks"]) >= 2
        [row] = await _documents(pool)
        assert (row["document"], row["scope"], row["title"]) == (
            found["document"],
            f"guild:{world.guild}",
            "Libra guide",
        )
        assert row["added_by"] == f"discord:{world.admin.id}"
        assert (
            row["chunks"]
            == int(found["chunks"])
            == await pool.fetchval(
                "SELECT count(*) FROM knowledge_chunks WHERE document = $1 AND scope = $2",
                row["document"],
                f"guild:{world.guild}",
            )
        )
        [event] = await stream_events(eventlog.js, "LIBRA", "libra.knowledge.>")
        assert isinstance(event, KnowledgeAdded)
        assert (event.scope, event.media_type, event.user) == (
            f"guild:{world.guild}",
            "text/markdown",
            f"discord:{world.admin.id}",
        )

        korean = await _learn(
            world, world.admin, fake.attachment("hours.html", PAGE_HTML.encode(), "text/html"),
            locale="ko",
        )  # fmt: skip
        assert korean.content.startswith("**hours.html**을(를) 이 서버의 지식 베이스에 추가했어요")
    assert fake.downloads == ["guide.md", "hours.html"]


async def test_refused_files_say_why_and_add_nothing(
    eventlog: EventLog, world: World, gateways: Gateways
) -> None:
    fake = world.fake
    await gateways.start(knowledge_max_document_bytes=MAX_BYTES)

    async def learned(name: str, data: bytes, content_type: str, **kw: Any) -> str:
        file = fake.attachment(name, data, content_type, **kw)
        return (await _learn(world, world.admin, file)).content

    assert await learned("big.txt", b"x" * 100, "text/plain", size=20_480) == (
        "That file is 20 KB, over the 10 KB a document may have. Nothing was added."
    )
    assert await learned("tool.exe", b"MZ\x90\x00", "application/octet-stream") == (
        "I can't read that kind of file (tool.exe): send a txt, md, html or pdf file."
    )
    assert await learned("empty.txt", b"", "text/plain") == (
        "That file is empty. Nothing was added."
    )
    assert fake.downloads == []  # each refused by what Discord declared, before a byte came
    # a size that Discord understated: the download stops past the limit
    assert await learned("liar.txt", b"a" * 50_000, "text/plain", size=100) == (
        "That file is larger than Discord said, over the 10 KB a document may have."
        " Nothing was added."
    )
    broken = await learned("broken.pdf", b"not a pdf at all", "application/pdf")
    assert broken.startswith("I couldn't add that file: 'broken.pdf' is not a PDF that can be")
    assert broken.endswith(". Nothing was added.")
    assert await learned("latin.txt", "café".encode("latin-1"), "text/plain") == (
        "I couldn't add that file: 'latin.txt' is not UTF-8 text (byte 3 is not valid UTF-8)."
        " Nothing was added."
    )
    blank = b"<html><script>var x = 1;</script></html>"
    assert "'blank.html' holds no text" in await learned("blank.html", blank, "text/html")
    assert await stream_count(eventlog.js, "LIBRA", "libra.knowledge.>") == 0
    store = await DocumentStore.open(eventlog.js)
    assert await _bucket_names(store) == []


async def _bucket_names(store: DocumentStore) -> list[str]:
    try:
        return [info.name for info in await store.store.list()]
    except NotFoundError:  # an empty bucket
        return []


# --- /knowledge -------------------------------------------------------------------------------


async def test_knowledge_list_and_remove_reach_only_the_servers_own_documents(
    settings: Settings, eventlog: EventLog, world: World, gateways: Gateways, pool: asyncpg.Pool
) -> None:
    other_guild = world.fake.add_guild("Elsewhere")
    async with running(settings, ["knowledge"]):
        await gateways.start()
        assert await _knowledge(world, "list", world.admin) == (
            "This server's knowledge base is empty: add a document with `/learn`."
        )
        store = await DocumentStore.open(eventlog.js)

        async def add(name: str, text: str, scope: str) -> str:
            added = await add_document(
                eventlog, store, name=name, data=text.encode(), scope=scope,
                added_by="console:test", limits=LIMITS,
            )  # fmt: skip
            return added.document

        own = await add("rules.md", "# Rules\n\nBe kind.", f"guild:{world.guild}")
        faq = await add("faq_v2.md", "# FAQ\n\nAsk away.", f"guild:{world.guild}")
        theirs = await add("secret.md", "Their plans.", f"guild:{other_guild}")
        common = await add("global.md", "For everyone.", "global")
        mine = await add("mine.md", "Alice's notes.", f"user:discord:{world.admin.id}")

        async def projected() -> bool:
            return len(await _documents(pool)) == 5

        await eventually(projected)

        listed = await _knowledge(world, "list", world.admin)
        assert listed.splitlines() == [
            "This server's knowledge base (2):",
            f"`{own}` **rules.md** · 1 chunk · 17 B",
            f"`{faq}` **faq_v2.md** · 1 chunk · 16 B",
        ]
        refused = "Only server admins (Manage Server) can change that."
        assert (
            await _knowledge(world, "list", world.alice, permissions=EVERYDAY_PERMISSIONS)
            == refused
        )
        assert (
            await _knowledge(
                world, "remove", world.alice, document=own, permissions=EVERYDAY_PERMISSIONS
            )
            == refused
        )

        for elsewhere in (theirs, common, mine, "no-such-document"):
            assert await _knowledge(world, "remove", world.admin, document=elsewhere) == (
                f"There's no document `{elsewhere}` in this server's knowledge base; "
                "`/knowledge list` shows its documents."
            )
        assert await _knowledge(world, "remove", world.admin, document=own) == (
            f"Removed **rules.md** (`{own}`) from this server's knowledge base."
        )

        async def removed() -> bool:
            return [r["document"] for r in await _documents(pool)] == [
                faq,
                theirs,
                common,
                mine,
            ]

        await eventually(removed)
        assert (await _knowledge(world, "list", world.admin)).splitlines()[1:] == [
            f"`{faq}` **faq_v2.md** · 1 chunk · 16 B"
        ]
        [gone] = [
            e
            for e in await stream_events(eventlog.js, "LIBRA", "libra.knowledge.>")
            if isinstance(e, KnowledgeRemoved)
        ]
        assert (gone.document, gone.scope, gone.user) == (
            own,
            f"guild:{world.guild}",
            f"discord:{world.admin.id}",
        )

        async def suggested(user: FakeUser, typed: str, permissions: int) -> list[str]:
            return await run_autocomplete(
                world, "knowledge", "remove", "document", typed, user, permissions=permissions
            )

        assert await suggested(world.admin, "", MANAGE_GUILD) == [faq]
        assert await suggested(world.admin, "FAQ", MANAGE_GUILD) == [faq]
        assert await suggested(world.admin, "secret", MANAGE_GUILD) == []
        assert await suggested(world.alice, "", EVERYDAY_PERMISSIONS) == []  # titles are for admins


async def test_learn_and_knowledge_are_synced_for_managers_with_korean_names(
    world: World, gateways: Gateways
) -> None:
    await gateways.start(discord_guild_id=str(world.guild))
    synced = {c["name"]: c for c in world.fake.commands[world.guild]}
    learn, knowledge = synced["learn"], synced["knowledge"]
    assert int(learn["default_member_permissions"]) == MANAGE_GUILD
    assert int(knowledge["default_member_permissions"]) == MANAGE_GUILD
    assert [(o["name"], o["type"], o.get("required")) for o in learn["options"]] == [
        ("file", 11, True),
        ("title", 3, False),
    ]
    assert learn["name_localizations"]["ko"] == "학습"
    assert [o["name"] for o in knowledge["options"]] == ["list", "remove"]
    [document] = knowledge["options"][1]["options"]
    assert document["autocomplete"] is True


# --- sources under a reply ----------------------------------------------------------------------

HOURS = RetrievedChunk(chunk="d1:0", document="d1", title="hours.html", scope="global")
FAQ = RetrievedChunk(chunk="d2:0", document="d2", title="faq_v2.md", scope="guild:1")
HOURS_2 = RetrievedChunk(chunk="d1:1", document="d1", title="hours.html", scope="global")


def _completed(text: str, **fields: Any) -> LlmCompleted:
    said = factories.text()
    return derive(
        said, LlmCompleted, key="completed", text=text, provider="p", model="m",
        origin=said.origin, **fields,
    )  # fmt: skip


def test_the_sources_line_names_each_document_once_with_the_numbers_cited() -> None:
    knowledge = (HOURS, FAQ, HOURS_2)
    cited = _completed("Seven [1], and six [3].", knowledge=knowledge)
    assert footer(cited, "en") == "-# Sources: [1, 3] hours.html"
    uncited = _completed("Seven, and six.", knowledge=knowledge)
    assert footer(uncited, "en") == r"-# Sources: [1, 3] hours.html · [2] faq\_v2.md"
    both = _completed(
        "Rolled [2].",
        knowledge=knowledge,
        tools=(
            ToolUse(call="1", name="dice"),
            ToolUse(call="2", name="time"),
            ToolUse(call="3", name="dice"),
        ),
    )
    assert footer(both, "ko") == "-# 출처: [2] faq\\_v2.md\n-# 도구: dice, time"
    assert footer(_completed("Hi [1]."), "en") == ""
    odd = RetrievedChunk(chunk="d3:0", document="d3", title="<@1> *bold*\nx" + "y" * 80)
    shown = footer(_completed("[1]", knowledge=(odd,)), "en")
    assert shown.startswith(r"-# Sources: [1] \<@1\> \*bold\* xyyy") and shown.endswith("y…")
    assert "\n" not in shown
    assert without_footer("Seven [1].\n-# Sources: [1] hours.html\n-# Tools: dice") == (
        "Seven [1]."
    )
    assert without_footer("-# a heading-ish line\nthen text") == "-# a heading-ish line\nthen text"


def test_the_footer_goes_under_the_last_message_and_every_message_fits() -> None:
    line = "-# Sources: [1] hours.html"
    assert with_footer(["short"], line) == [f"short\n{line}"]
    assert with_footer([], line) == []
    text = ("word " * 399).strip()  # 1,994 characters: one message, with no room for the line
    chunks = with_footer(split_message(text), line)
    assert len(chunks) == 2 and chunks[-1].endswith(f"\n{line}")
    assert all(len(c) <= MESSAGE_LIMIT for c in chunks)
    code = "```python\n" + "x = 1\n" * 500  # a block left open by the model
    chunks = with_footer(split_message(code), line)
    assert all(len(c) <= MESSAGE_LIMIT for c in chunks)
    assert chunks[-1].endswith(f"```\n{line}")  # closed before the line, not shown as code


class _Answers:
    """Plays the turns and llm processors: each ``text.received`` gets the completion
    ``script`` makes of it (with sources and tools), all at once."""

    def __init__(self, log: EventLog, script: Callable[[TextReceived], dict[str, Any]]) -> None:
        self.log, self.script = log, script
        self.seen: list[TextReceived] = []

    async def on_msg(self, msg) -> None:
        said = decode_event(msg.data)
        assert isinstance(said, TextReceived)
        self.seen.append(said)
        accepted = derive(said, TurnAccepted, key="turn", text=said.text, origin=said.origin)
        await self.log.publish(accepted)
        await self.log.publish(
            derive(
                accepted,
                LlmCompleted,
                key="completed",
                provider="fake",
                model="fake",
                origin=said.origin,
                **self.script(said),
            )
        )


@contextlib.asynccontextmanager
async def _answering(
    log: EventLog, script: Callable[[TextReceived], dict[str, Any]]
) -> AsyncIterator[_Answers]:
    answers = _Answers(log, script)
    sub = await log.js.subscribe(
        "libra.text.received.>",
        stream="LIBRA",
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.NEW,
        cb=answers.on_msg,
    )
    try:
        yield answers
    finally:
        await sub.unsubscribe()


async def test_a_reply_shows_its_sources_and_tools_which_stay_out_of_history_and_context(
    settings: Settings, eventlog: EventLog, world: World, gateways: Gateways, pool: asyncpg.Pool
) -> None:
    fake = world.fake
    long_text = ("All day. " * 230).strip() + " [2]"

    def script(said: TextReceived) -> dict[str, Any]:
        if "long" in said.text:
            return {"text": long_text, "knowledge": (HOURS, FAQ)}
        if "again" in said.text:
            return {"text": "Still seven."}
        return {
            "text": "It opens at seven [1].",
            "knowledge": (HOURS, FAQ, HOURS_2),
            "tools": (ToolUse(call="c1", name="time", result="08:00"),),
        }

    async with running(settings, ["history"]), _answering(eventlog, script) as answers:
        await gateways.start()
        await fake.send_message(world.channel, "when?", author=world.alice, mention_bot=True)
        await delivered(eventlog, 1)
        [reply] = fake.bot_messages(world.channel)
        assert reply["content"] == (
            "It opens at seven [1].\n-# Sources: [1] hours.html\n-# Tools: time"
        )

        await fake.send_message(
            world.channel, "again?", author=world.alice, reply_to=int(reply["id"])
        )
        await delivered(eventlog, 2)
        assert [(c.role, c.text) for c in answers.seen[1].context] == [
            ("user", "when?"),
            ("assistant", "It opens at seven [1]."),  # as the model wrote it
        ]

        await fake.send_message(world.channel, "long?", author=world.alice, mention_bot=True)
        await delivered(eventlog, 3)
        *_, first, last = fake.bot_messages(world.channel)
        assert len(first["content"]) <= MESSAGE_LIMIT and len(last["content"]) <= MESSAGE_LIMIT
        assert last["content"].endswith("[2]\n-# Sources: [2] faq\\_v2.md")
        assert "Sources" not in first["content"]

        async def stored() -> bool:
            query = "SELECT count(*) FROM messages WHERE role = 'assistant'"
            return await pool.fetchval(query) == 3

        await eventually(stored)
        texts = await pool.fetch("SELECT content FROM messages WHERE role = 'assistant'")
        assert {r["content"] for r in texts} == {
            "It opens at seven [1].",
            "Still seven.",
            long_text,
        }


# --- end to end: a document learnt, a question answered from it ------------------------------


@pytest.fixture
async def wire() -> AsyncIterator[FakeLlmWire]:
    async with FakeLlmWire(reply=Behaviour.ok("The bakery opens at seven [1].")) as fake:
        yield fake


async def test_a_document_learnt_on_discord_is_cited_under_the_answer(
    settings: Settings, world: World, gateways: Gateways, wire: FakeLlmWire
) -> None:
    fake = world.fake
    stack = answering_with(settings, wire)
    async with running(stack, [*TEXT_PIPELINE, "knowledge"]):
        await gateways.start()
        page = fake.attachment("hours.html", PAGE_HTML.encode(), "text/html")
        learnt = await _learn(world, world.admin, page, title="Bakery hours")
        assert ADDED.fullmatch(learnt.content), learnt.content

        await fake.send_message(
            world.channel, "When does the bakery open?", author=world.alice, mention_bot=True
        )
        await fake.wait_for(lambda: len(fake.bot_messages(world.channel)) == 1, timeout=20)
        await fake.wait_for(
            lambda: "-# Sources" in fake.bot_messages(world.channel)[0]["content"], timeout=20
        )
    [reply] = fake.bot_messages(world.channel)
    assert reply["content"] == "The bakery opens at seven [1].\n-# Sources: [1] Bakery hours"
    system = wire.calls(OPENAI_CHAT)[-1].messages[0]["content"]
    assert "[1] Bakery hours" in system and "The bakery opens at seven" in system
