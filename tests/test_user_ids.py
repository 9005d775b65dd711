"""One id space for every platform: a person is ``platform:id`` in events, tables, rate limits
and the history route, and an HTTP token reaches only HTTP users (issue 13, part 2)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import asyncpg
import httpx
import jwt
import pytest
from hypothesis import HealthCheck, assume, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from libra.contracts import (
    DeadLetter,
    Origin,
    TextReceived,
    TurnRejected,
    conversation_id,
    decode_event,
    encode_event,
    make,
    platform_of,
    raw_user,
    user_id,
)
from libra.ops.fakes.llm_wire import Behaviour, FakeLlmWire
from libra.ops.replay import Selection
from libra.runtime.config import Settings
from libra.runtime.database import migrations
from libra.runtime.eventlog import EventLog

from .helpers import eventually, stream_events
from .stack import TEXT_PIPELINE, answering_with, running

REPLY = "Noted."
SERVICE_KEY = "service-key-for-user-ids"
SECRET = "jwt-secret-for-user-ids-long-enough"
DISCORD = Origin(platform="discord", guild="1", channel="2")
IN_DISCORD = conversation_id("discord", "1", "2")


@pytest.fixture
async def wire():
    async with FakeLlmWire(reply=Behaviour.ok(REPLY)) as fake:
        yield fake


def _token(sub: str) -> dict[str, str]:
    claims = {"sub": sub, "exp": int(time.time()) + 600}
    return {"Authorization": f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}"}


def _old_discord_message(raw: str, text: str) -> TextReceived:
    """A message as the Discord gateway wrote it before ids were namespaced: the raw id."""
    return make(TextReceived, conversation=IN_DISCORD, user=raw, text=text, origin=DISCORD)


def _stack(settings: Settings, wire: FakeLlmWire, **extra: str) -> Settings:
    return answering_with(settings, wire, BFF_API_KEY=SERVICE_KEY, JWT_SECRET=SECRET, **extra)


async def _wait_http(http: httpx.AsyncClient) -> None:
    async def up() -> bool:
        try:
            return (await http.get("/api/health", timeout=1)).status_code < 600
        except httpx.HTTPError:
            return False

    await eventually(up, timeout=15)


async def _answered(pool: asyncpg.Pool, user: str, n: int) -> bool:
    sql = "SELECT count(*) FROM messages WHERE user_id = $1 AND role = 'assistant'"
    return await pool.fetchval(sql, user) >= n


def _said(response: httpx.Response) -> list[tuple[str, str]]:
    assert response.status_code == 200, response.text
    return [(m["role"], m["content"]) for m in response.json()["messages"]]


async def test_a_token_reads_only_its_own_platforms_history(settings, wire, pool, eventlog) -> None:
    s = _stack(settings, wire)
    async with (
        running(s, [*TEXT_PIPELINE, "http"]),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{s.http_port}", timeout=20) as http,
    ):
        await _wait_http(http)
        await eventlog.publish(_old_discord_message("123", "my locker code is 4711"))
        await eventually(lambda: _answered(pool, "discord:123", 1), timeout=20)
        mine = await http.post(
            "/api/chat/completions", json={"userId": "123", "message": "hi"}, headers=_token("123")
        )
        assert mine.status_code == 200, mine.text
        await eventually(lambda: _answered(pool, "http:123", 1), timeout=20)

        # The token whose sub is the Discord person's digits reads the HTTP user 123 alone.
        own = await http.get("/api/chat/history/123", headers=_token("123"))
        assert _said(own) == [("user", "hi"), ("assistant", REPLY)]
        named = await http.get("/api/chat/history/discord:123", headers=_token("123"))
        assert named.status_code == 403 and named.json()["error"] == "forbidden"
        # A token may be called "discord:123": it is still the HTTP user of that name.
        spoofed = await http.get("/api/chat/history/discord:123", headers=_token("discord:123"))
        assert _said(spoofed) == []
        # A service names another platform's person in full.
        service = {"X-API-Key": SERVICE_KEY}
        discord = await http.get("/api/chat/history/discord:123", headers=service)
        assert _said(discord) == [("user", "my locker code is 4711"), ("assistant", REPLY)]
        assert _said(await http.get("/api/chat/history/123", headers=service)) == _said(own)
        assert _said(await http.get("/api/chat/history/http:123", headers=service)) == _said(own)


async def test_http_and_discord_people_with_the_same_digits_have_their_own_rate_limits(
    settings, wire, eventlog: EventLog
) -> None:
    s = _stack(settings, wire, RATE_LIMIT_TURNS="2", RATE_LIMIT_WINDOW_SEC="300")
    full = [_old_discord_message("77", f"m{i}") for i in range(3)]
    async with (
        running(s, [*TEXT_PIPELINE, "http"]),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{s.http_port}", timeout=20) as http,
    ):
        await _wait_http(http)
        await eventlog.publish_many(full)

        async def decided() -> bool:
            turns = await stream_events(eventlog.js, "LIBRA", "libra.turn.>")
            return len({e.turn for e in turns}) >= len(full)

        await eventually(decided, timeout=20)
        http_user = await http.post(
            "/api/chat/completions", json={"userId": "77", "message": "hi"}, headers=_token("77")
        )
        assert http_user.status_code == 200, http_user.text
    decisions = await stream_events(eventlog.js, "LIBRA", "libra.turn.>")
    refused = [e for e in decisions if isinstance(e, TurnRejected)]
    assert [(e.user, e.reason) for e in refused] == [("discord:77", "rate_limited")]
    assert {e.user for e in decisions} == {"discord:77", "http:77"}


# --- the migration of rows written before -------------------------------------------------

_NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
_ROWS = [
    (
        "INSERT INTO conversations (id, platform, started_at, last_at) VALUES"
        " ('discord-1-2', 'discord', $1, $1), ('http-alice', 'http', $1, $1)"
    ),
    (
        "INSERT INTO messages (event_id, conversation, user_id, turn, role, content, at,"
        " stream_seq) VALUES ('m1', 'discord-1-2', '123', 't1', 'user', 'a', $1, 1),"
        " ('m2', 'http-alice', 'alice', 't2', 'user', 'b', $1, 2),"
        " ('m3', 'discord-1-2', 'discord:9', 't3', 'user', 'c', $1, 3),"
        " ('m4', 'http-bob', 'discord:5', 't4', 'user', 'd', $1, 4)"
    ),
    (
        "INSERT INTO turns (turn, conversation, user_id, platform) VALUES"
        " ('t1', 'discord-1-2', '123', 'discord'), ('t2', 'http-alice', 'alice', NULL),"
        " ('t5', 'console-me', 'me', NULL)"
    ),
    (
        "INSERT INTO memories (event_id, user_id, conversation, turn, content, embedder,"
        " embedding, at) VALUES ('k1', '123', 'discord-1-2', 't1', 'x', 'e',"
        " array_fill(0.5, ARRAY[1024])::real[]::vector, $1)"
    ),
    (
        "INSERT INTO memory_resets (event_id, user_id, conversation, at) VALUES"
        " ('r1', '123', NULL, $1), ('r2', 'alice', 'http-alice', $1)"
    ),
    (
        "INSERT INTO chat_channels (conversation, enabled, changed_by, event_id, at) VALUES"
        " ('discord-1-2', true, '42', 'c1', $1)"
    ),
    (
        "INSERT INTO settings (scope, key, value, changed_by, event_id, at) VALUES"
        " ('guild:1', 'model', 'gpt', '42', 's1', $1), ('guild:1', 'persona', 'p', '', 's2', $1)"
    ),
]
_AFTER = {
    "SELECT event_id, user_id FROM messages": {
        ("m1", "discord:123"),
        ("m2", "http:alice"),
        ("m3", "discord:9"),
        ("m4", "http:discord:5"),  # an HTTP user once named "discord:5" stays an HTTP user
    },
    "SELECT turn, user_id FROM turns": {
        ("t1", "discord:123"),
        ("t2", "http:alice"),
        ("t5", "console:me"),
    },
    "SELECT event_id, user_id FROM memories": {("k1", "discord:123")},
    "SELECT event_id, user_id FROM memory_resets": {("r1", "discord:123"), ("r2", "http:alice")},
    "SELECT conversation, changed_by FROM chat_channels": {("discord-1-2", "discord:42")},
    "SELECT key, changed_by FROM settings": {("model", "discord:42"), ("persona", "")},
}


async def test_the_migration_namespaces_old_rows_once(pool: asyncpg.Pool) -> None:
    [sql] = [sql for _, name, sql in migrations() if name == "namespaced_users"]
    async with pool.acquire() as conn:
        for insert in _ROWS:
            await conn.execute(insert, *([_NOW] if "$1" in insert else []))
        for _ in range(2):  # a second run changes nothing
            await conn.execute(sql)
            for query, expected in _AFTER.items():
                assert {tuple(r) for r in await conn.fetch(query)} == expected, query


# --- events in the log from before --------------------------------------------------------


def test_an_old_event_decodes_with_its_origins_platform() -> None:
    old = decode_event(encode_event(_old_discord_message("123", "hi")))
    assert old.user == "discord:123"
    assert decode_event(encode_event(old)) == old  # a namespaced id stays as it is
    http = Origin(platform="http")
    colon = make(TextReceived, conversation="http-x", user="discord:5", text="x", origin=http)
    assert decode_event(encode_event(colon)).user == "http:discord:5"
    nobody = make(TextReceived, conversation="http-x", user="", text="x", origin=http)
    assert decode_event(encode_event(nobody)).user == ""
    letter = make(DeadLetter, conversation="x", user="7", consumer="llm", subject="s", error="e")
    assert decode_event(encode_event(letter)).user == "7"  # no origin: nothing to go by


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    platform=st.sampled_from(["discord", "http", "console"]),
    raw=st.text(min_size=1, max_size=30).filter(lambda s: "\x00" not in s),
)
def test_every_id_reads_back_once_namespaced(platform: str, raw: str) -> None:
    assume(not raw.startswith(f"{platform}:"))  # an old id that reads as namespaced already
    said = make(
        TextReceived, conversation="c", user=raw, text="x", origin=Origin(platform=platform)
    )
    user = decode_event(encode_event(said)).user
    assert user == user_id(platform, raw)
    assert (platform_of(user), raw_user(user)) == (platform, raw)
    again = make(TextReceived, conversation="c", user=user, text="x", origin=said.origin)
    assert decode_event(encode_event(again)).user == user


def test_replay_picks_a_person_by_full_or_raw_id() -> None:
    discord = make(TextReceived, conversation="c", user="discord:1", text="x", origin=DISCORD)
    http = make(
        TextReceived, conversation="c", user="http:1", text="x", origin=Origin(platform="http")
    )
    assert Selection(user="discord:1").matches(discord)
    assert not Selection(user="discord:1").matches(http)
    assert Selection(user="1").matches(discord) and Selection(user="1").matches(http)


def test_user_ids_need_a_platform_and_an_id() -> None:
    with pytest.raises(ValueError):
        user_id("", "1")
    with pytest.raises(ValueError):
        user_id("a:b", "1")
    with pytest.raises(ValueError):
        user_id("http", "")
    assert platform_of("123") == "" and raw_user("123") == "123"
