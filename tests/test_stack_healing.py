"""`libra up` heals: killed outright it starts again, and a server of its own that dies comes back.

Everything runs for real: `libra up` as a subprocess, its embedded NATS, PostgreSQL and Redis, and
the LLM vendors' wire faked on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import pytest

from libra.contracts import LlmCompleted, LlmFailed, TextReceived, TurnAccepted, TurnRejected
from libra.ops.embedded import (
    EmbeddedNats,
    EmbeddedPostgres,
    EmbeddedRedis,
    PortInUseError,
    free_port,
)
from libra.ops.fakes.llm_wire import OPENAI_CHAT, Behaviour, FakeLlmWire

from .helpers import eventually, postgres_folder, stream_events
from .test_up import Up, _env
from .test_up import _no_leftover_stacks as _no_leftover_stacks  # stops every Up of a test

REPLY = "Hello again, I am still here."


@pytest.fixture
async def wire():
    # Slow enough that replies are still being written when `libra up` is killed.
    async with FakeLlmWire(reply=Behaviour.ok(REPLY, ttft=0.5, tokens_per_sec=10)) as fake:
        yield fake


@pytest.fixture
def data() -> Iterator[Path]:
    """A folder for the data, outside pytest's tree so PostgreSQL can reach it (see helpers)."""
    folder = postgres_folder()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _up_env(data: Path, wire: FakeLlmWire) -> dict[str, str]:
    return _env(data / "data") | {
        "OPENAI_API_KEY": "sk-test-key",
        "OPENAI_BASE_URL": wire.env()["OPENAI_BASE_URL"],
        "LLM_CACHE_ENABLED": "0",
    }


def _http(env: dict[str, str]) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{env['HTTP_PORT']}", timeout=30)


async def _chat(http: httpx.AsyncClient, user: str, text: str = "Are you there?") -> dict:
    response = await http.post("/api/chat/completions", json={"userId": user, "message": text})
    assert response.status_code == 200, response.text
    return response.json()


async def _health(http: httpx.AsyncClient) -> dict[str, str]:
    try:
        return (await http.get("/api/health", timeout=5)).json()["services"]
    except (httpx.HTTPError, ValueError, KeyError):
        return {}


_PID_FILES = {
    "NATS": "nats/nats-server.pid",
    "Redis": "redis/redis.pid",
    "PostgreSQL": "postgres/postmaster.pid",
}


def _pid(path: Path) -> int:
    return int(path.read_text().split()[0])


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _lines(up: Up, pattern: str) -> list[str]:
    """The messages of its log lines that match ``pattern``."""
    found = []
    for line in up.log.splitlines():
        with contextlib.suppress(ValueError):  # not JSON, or a line still being written
            message = json.loads(line).get("msg", "")
            if re.search(pattern, message):
                found.append(message)
    return found


async def _turn_outcomes(url: str) -> tuple[list[str], Counter, Counter]:
    """The turns received so far, and how many decisions and replies each has in the log."""
    nc = await nats.connect(url)
    try:
        events = await stream_events(nc.jetstream(), "LIBRA")
    finally:
        await nc.close()
    turns = [e.id for e in events if isinstance(e, TextReceived)]
    decisions = Counter(e.turn for e in events if isinstance(e, TurnAccepted | TurnRejected))
    replies = Counter(e.turn for e in events if isinstance(e, LlmCompleted | LlmFailed))
    return turns, decisions, replies


async def test_up_killed_outright_starts_again_with_no_manual_step(
    data: Path, wire: FakeLlmWire
) -> None:
    env = _up_env(data, wire)
    up = Up(env, data)
    await asyncio.to_thread(up.wait_ready, 30.0)
    admin_url = up.admin_nats_url  # read from stack.json while it is there
    folder = Path(env["LIBRA_DATA_DIR"])
    servers = [_pid(folder / path) for path in _PID_FILES.values()]
    async with _http(env) as http:
        assert (await _chat(http, "warm-up"))["content"] == REPLY
        load = [asyncio.create_task(_chat(http, f"user-{i}")) for i in range(12)]
        # Killed as the OOM killer would: the main process alone, replies half written.
        await eventually(lambda: _calls_at_least(wire, 1 + 6), timeout=20)
        os.kill(up.proc.pid, signal.SIGKILL)
        await asyncio.to_thread(up.proc.wait)
        results = await asyncio.gather(*load, return_exceptions=True)
    assert any(isinstance(r, BaseException) for r in results), "nothing was in flight"

    again = Up(env, data)
    await asyncio.to_thread(again.wait_ready, 60.0)
    restarted = time.monotonic()
    assert not any(_alive(pid) for pid in servers)  # stopped with it, or by `libra up` again
    assert json.loads((folder / "stack.json").read_text())["pid"] == again.proc.pid
    async with _http(env) as http:
        assert (await _chat(http, "after-the-kill"))["content"] == REPLY

    async def every_turn_settled() -> bool:
        turns, decisions, replies = await _turn_outcomes(admin_url)
        return all(decisions[t] and replies[t] for t in turns)

    with contextlib.suppress(AssertionError):  # the assertion below says what is missing
        await eventually(every_turn_settled, timeout=10 - (time.monotonic() - restarted))
    turns, decisions, replies = await _turn_outcomes(admin_url)
    unsettled = [t for t in turns if not (decisions[t] and replies[t])]
    assert not unsettled, f"{len(unsettled)} of {len(turns)} turns unsettled 10 s after the restart"
    assert all(decisions[t] == 1 and replies[t] == 1 for t in turns), (decisions, replies)
    assert await asyncio.to_thread(again.terminate, 15.0) == 0


async def _calls_at_least(wire: FakeLlmWire, n: int) -> bool:
    return wire.count(OPENAI_CHAT) >= n


async def test_a_server_that_dies_is_restarted_and_libra_recovers(
    data: Path, wire: FakeLlmWire
) -> None:
    env = _up_env(data, wire)
    folder = Path(env["LIBRA_DATA_DIR"])
    up = Up(env, data)
    await asyncio.to_thread(up.wait_ready, 30.0)
    redis_pid, postgres_pid = folder / _PID_FILES["Redis"], folder / _PID_FILES["PostgreSQL"]
    async with _http(env) as http:
        assert (await _chat(http, "before"))["content"] == REPLY
        await _kill_and_see_it_back(up, http, "Redis", "redis", redis_pid)
        await _kill_and_see_it_back(up, http, "PostgreSQL", "database", postgres_pid)

        # While someone else holds its port, it stays down, said so, and is tried again.
        port = int(env["LIBRA_REDIS_PORT"])
        with await _squat_after_kill(port, redis_pid):
            await eventually(lambda: _said(up, "embedded Redis .* did not start again"))
            assert f"127.0.0.1:{port}: the port is in use" in _lines(up, "did not start")[0]
            assert (await _health(http))["redis"] == "down"
        await eventually(lambda: _said(up, "embedded Redis .*restarted in", 2), timeout=10)
        await eventually(lambda: _all_ok(http), timeout=10)
        assert (await _chat(http, "after-the-squatter"))["content"] == REPLY

    # A service manager stops the servers with Libra: none is started again as Libra stops.
    last = [_pid(redis_pid), _pid(postgres_pid)]
    restarts = len(_lines(up, "restarted in"))
    up.proc.send_signal(signal.SIGTERM)
    os.kill(last[0], signal.SIGKILL)
    assert await asyncio.to_thread(up.proc.wait, 20) == 0
    assert not any(_alive(pid) for pid in last)  # its own stop stops the restarted ones
    assert len(_lines(up, "restarted in")) == restarts


async def _squat_after_kill(port: int, pid_file: Path) -> socket.socket:
    """Kills the server and takes its port; if `libra up` was quicker, kills it again."""
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(ProcessLookupError):
            os.kill(_pid(pid_file), signal.SIGKILL)
        squatter = socket.socket()
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for _ in range(50):  # the port is free once the killed process has exited
            try:
                squatter.bind(("127.0.0.1", port))
            except OSError:
                await asyncio.sleep(0.005)
                continue
            squatter.listen()
            return squatter
        squatter.close()
        assert time.monotonic() < deadline, "never got the port between a kill and a restart"


async def _kill_and_see_it_back(
    up: Up, http: httpx.AsyncClient, title: str, service: str, pid_file: Path
) -> None:
    """Kills a server; health says it is down until the log says it is back, then all is well."""
    back = f"embedded {title} .*restarted in"
    times = len(_lines(up, back)) + 1
    old = _pid(pid_file)
    os.kill(old, signal.SIGKILL)
    killed = time.monotonic()

    async def down_or_back() -> bool:  # the window may be too short to see
        return (await _health(http)).get(service) == "down" or await _said(up, back, times)

    await eventually(down_or_back, timeout=10)
    await eventually(lambda: _said(up, back, times), timeout=10)
    said = _lines(up, back)[-1]
    assert re.fullmatch(rf"embedded {title} was killed by SIGKILL; restarted in [\d.]+ s", said)
    assert float(said.split()[-2]) < 5
    assert _pid(pid_file) != old and not _alive(old)
    await eventually(lambda: _all_ok(http), timeout=10)
    assert time.monotonic() - killed < 10
    assert (await _chat(http, f"after-{service}"))["content"] == REPLY


async def _said(up: Up, pattern: str, times: int = 1) -> bool:
    return len(_lines(up, pattern)) >= times


async def _all_ok(http: httpx.AsyncClient) -> bool:
    services = await _health(http)
    return bool(services) and all(v == "ok" for v in services.values())


async def test_servers_left_running_on_the_same_data_are_stopped_first(data: Path) -> None:
    """What an earlier Libra killed outright left behind, the next one stops before starting."""
    folder = data / "data"
    earlier = [
        EmbeddedNats(folder, port=free_port()),
        EmbeddedRedis(folder, port=free_port()),
        EmbeddedPostgres(folder, port=free_port()),
    ]
    again = [
        EmbeddedNats(folder, port=earlier[0].port, monitor_port=earlier[0].monitor_port),
        EmbeddedRedis(folder, port=earlier[1].port),
        EmbeddedPostgres(folder, port=earlier[2].port),
    ]
    leftovers: list[int] = []
    try:
        for server in earlier:
            await server.start()
        leftovers = [
            earlier[0].proc.pid,
            earlier[1].proc.pid,
            await _postgres_by_pg_ctl(earlier[2]),
        ]
        for server in again:
            await server.start()
            assert server.exit_status() is None
        for server in earlier[:2]:
            await asyncio.to_thread(server.proc.wait, 5)  # our children: reaped, not zombies
        assert not any(_alive(pid) for pid in leftovers)
    finally:
        for server in again + earlier:
            await server.stop()
        for pid in leftovers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


async def _postgres_by_pg_ctl(postgres: EmbeddedPostgres) -> int:
    """Restarts ``postgres`` as Libra did before it ran it as its child: through pg_ctl, as a
    daemon that no signal stops with Libra. Returns its pid."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns about XDG_RUNTIME_DIR, which it needs not
        import pgserver

    await postgres.stop()
    await asyncio.to_thread(
        pgserver.pg_ctl,
        ["-w", "-o", f"-h 127.0.0.1 -p {postgres.port} -k ''", "-l", str(postgres.log), "start"],
        pgdata=postgres.dir,
        user=postgres.user,
    )
    return _pid(postgres.dir / "postmaster.pid")


async def test_a_port_held_by_another_program_is_never_taken(data: Path) -> None:
    """A stale pid file naming someone else's process: that process is left alone."""
    redis = EmbeddedRedis(data, port=free_port())
    listener = (
        "import socket, time; s = socket.socket(); "
        f"s.bind(('127.0.0.1', {redis.port})); s.listen(); print('ok', flush=True); time.sleep(60)"
    )
    redis.dir.mkdir(parents=True)
    other = subprocess.Popen(
        [sys.executable, "-c", listener], stdout=subprocess.PIPE, text=True, cwd=redis.dir
    )
    try:
        assert other.stdout.readline() == "ok\n"
        redis.pid_file.write_text(f"{other.pid}\n")
        with pytest.raises(PortInUseError, match=f"127.0.0.1:{redis.port}: the port is in use"):
            await redis.start()
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
