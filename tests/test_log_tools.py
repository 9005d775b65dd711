"""`libra tail` and `libra trace` against a real log."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import aiohttp
import msgspec

from libra.contracts import (
    LlmCompleted,
    LlmDelta,
    ReplyDelivered,
    TurnAccepted,
    derive,
    new_id,
)
from libra.ops.embedded import EmbeddedNats
from libra.runtime.eventlog import EventLog

from .factories import ORIGIN, text
from .helpers import eventually


def _env(nats_url: str) -> dict[str, str]:
    return os.environ | {"NATS_URL": nats_url, "LOG_FORMAT": "console"}


def _turn_chain(turn: str = ""):
    said = text(conversation="http-alice", message="what is the log?")
    if turn:
        said = msgspec.structs.replace(said, id=turn, turn=turn)
    turn = derive(said, TurnAccepted, key="turn", text=said.text, origin=ORIGIN)
    deltas = [
        derive(turn, LlmDelta, key=f"d{i}", index=i, text=f"piece {i} ", origin=ORIGIN)
        for i in range(5)
    ]
    done = derive(
        turn,
        LlmCompleted,
        key="c",
        text="".join(d.text for d in deltas),
        provider="openai",
        model="m",
        origin=ORIGIN,
    )
    delivered = derive(done, ReplyDelivered, key="delivered", message_ids=("1",), origin=ORIGIN)
    return [said, turn, *deltas, done, delivered]


def _subscribed(server: EmbeddedNats, name: str, subject: str):
    """A check that the server's monitor lists a connection ``name`` subscribed to ``subject``."""

    async def check() -> bool:
        url = f"{server.monitor_url}/connz?subs=1"
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            connections = (await response.json()).get("connections") or []
        return any(
            c.get("name") == name and subject in (c.get("subscriptions_list") or [])
            for c in connections
        )

    return check


async def test_tail_prints_live_events_from_both_streams(
    eventlog: EventLog, nats_server: EmbeddedNats
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "libra.ops",
        "tail",
        "--count",
        "9",
        env=_env(nats_server.url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # The subscription is a core one: it sees what comes after it.
    await eventually(_subscribed(nats_server, "libra-tail", "libra.>"), timeout=20)
    chain = _turn_chain()
    await eventlog.publish_many(chain)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    lines = out.decode().splitlines()
    assert proc.returncode == 0, err.decode()
    assert len(lines) == 9
    assert (
        "text.received" in lines[0] and "what is the log?" in lines[0] and "http-alice" in lines[0]
    )
    assert sum("llm.delta" in line for line in lines) == 5  # LIBRA_LIVE too
    assert "reply.delivered" in lines[-1]


async def test_trace_prints_the_causal_chain_with_timings(eventlog: EventLog, nats_server) -> None:
    chain = _turn_chain()
    for event in chain:
        await eventlog.publish(event)
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "libra.ops", "trace", chain[0].id],
        env=_env(nats_server.url),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"turn {chain[0].id}" in lines[0] and "(9 events)" in lines[0]
    order = [
        next(
            t
            for t in (
                "text.received",
                "turn.accepted",
                "llm.delta",
                "llm.completed",
                "reply.delivered",
            )
            if t in line
        )
        for line in lines[1:]
        if "more deltas" not in line
    ]
    assert order[:2] == ["text.received", "turn.accepted"]
    assert order[-2:] == ["llm.completed", "reply.delivered"]
    assert any("3 more deltas" in line for line in lines)
    assert all(" ms" in line for line in lines[1:] if "more deltas" not in line)


async def test_trace_of_unknown_turn_is_a_clear_error(eventlog: EventLog, nats_server) -> None:
    for bad, message in (("nope", "is not a turn id"), (text().id, "no events of turn")):
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "libra.ops", "trace", bad],
            env=_env(nats_server.url),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 1 and message in result.stderr
        assert "Traceback" not in result.stderr


def _trace(nats_url: str, turn: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "libra.ops", "trace", turn],
        env=_env(nats_url) | {"LOG_FORMAT": "json"},
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_trace_takes_what_tail_shows_or_the_id_s_start(
    eventlog: EventLog, nats_server
) -> None:
    chain = _turn_chain()
    await eventlog.publish_many(chain)
    turn = chain[0].id
    for piece in (turn[-8:], turn[-8:].lower(), turn[:20]):
        result = await asyncio.to_thread(_trace, nats_server.url, piece)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"turn {turn}") and "(9 events)" in result.stdout
        # A command for people: no log line in what it prints, none on a clean close.
        assert result.stderr == "" and "{" not in result.stdout


async def test_trace_of_an_ambiguous_or_unknown_piece_says_so(
    eventlog: EventLog, nats_server
) -> None:
    now_ms = time.time_ns() // 1_000_000
    first, second = (_turn_chain(new_id(at_ms=now_ms)) for _ in range(2))
    await eventlog.publish_many([*first, *second])
    shared = first[0].id[:10]  # the same millisecond
    cases = (
        (shared, "matches 2 turns"),
        ("ZZZZZZZZ", "no turn of the last 24 hours starts or ends with ZZZZZZZZ"),
        ("tail-id!", "is not a turn id"),
    )
    for piece, message in cases:
        result = await asyncio.to_thread(_trace, nats_server.url, piece)
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert first[0].id in _trace(nats_server.url, shared).stderr


async def test_tail_stopped_with_ctrl_c_ends_quietly(nats_server: EmbeddedNats) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "libra.ops",
        "tail",
        env=_env(nats_server.url) | {"LOG_FORMAT": "json"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    await eventually(_subscribed(nats_server, "libra-tail", "libra.>"), timeout=20)
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0 and out == b"" and err == b"", err.decode()
