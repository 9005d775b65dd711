"""`libra bench discord`: from a MESSAGE_CREATE to the first message POST, many channels at once.

The gateway runs as production runs it, ``libra run discord`` in a process of its own, against
the loopback Discord (``ops/fakes/discord.py``) and the real servers (NATS with the real
``nats.conf``, PostgreSQL, Redis), beside the real turns and llm processors (each a ``libra run``
process too) whose provider answers instantly: a loopback fake of the OpenAI wire, reached
through the official SDK. This process plays Discord. Every channel is in chat mode and gets a
message every ``interval`` seconds (open loop, phases spread), within Discord's five messages per
five seconds per channel. The latency of a message is measured by the fake alone: from the
moment it sends the MESSAGE_CREATE frame to the arrival of the POST that replies to it.

Right after, the same channels on the same schedule drive the bare chain (:mod:`.bare`) with its
gateway worker: each message goes to it on a core subject, and the latency runs to the arrival of
its POST at the same fake: ``first_post_bare_*`` and the ratios.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from libra.contracts import (
    Origin,
    SessionChat,
    conversation_id,
    make,
    new_id,
)
from libra.runtime.config import Settings
from libra.runtime.database import migrate
from libra.runtime.eventlog import EventLog

from ..fakes.discord import FakeDiscord
from . import bare
from .common import (
    bare_shape,
    fake_llm_provider,
    libra_processes,
    percentile,
    report,
    servers,
    stream_seqs,
)

__all__ = ["chat_channels", "run_bench_discord"]

ANSWER = "An instant answer from a loopback fake of the OpenAI wire."
PROCESSORS = (["turns"], ["llm"])
NOTE = "real turns and llm processors, provider answering instantly (fake OpenAI wire)"


def _gateway_env(urls, fake: FakeDiscord) -> dict[str, str]:
    return {
        **os.environ,
        "NATS_URL": urls.nats_url,
        "DATABASE_URL": urls.database_url,
        "REDIS_URL": urls.redis_url,
        "DISCORD_TOKEN": fake.token,
        "DISCORD_REST_URL": fake.rest_url,
        "DISCORD_GUILD_ID": "",
        "LOG_LEVEL": "WARNING",
        "LOG_FORMAT": "console",
        "LIBRA_METRICS_PORT": "0",
    }


@contextlib.asynccontextmanager
async def _gateway_process(
    urls, fake: FakeDiscord, folder: Path, env: dict[str, str]
) -> AsyncIterator[None]:
    """``libra run discord`` in a process of its own, until the block ends."""
    log_file = folder / "gateway.log"
    with log_file.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "libra.ops",
            "run",
            "discord",
            env=env,
            stdout=out,
            stderr=out,
        )
        try:
            await fake.ready(1, timeout=60)
            await fake.wait_for(
                lambda: bool(fake.calls_to("GET", r"/applications/\d+/commands")), timeout=30
            )
            yield
        except TimeoutError:
            tail = log_file.read_text()[-3000:]
            raise RuntimeError(f"the gateway did not start; its log ends:\n{tail}") from None
        finally:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()


async def _first_posts(fake: FakeDiscord, sent: dict[int, float], *, timeout: float) -> list[float]:
    """Milliseconds from each message's sending (perf_counter) to the first POST replying to it."""
    wanted = {str(m) for m in sent}
    deadline = time.monotonic() + timeout
    first: dict[str, float] = {}
    seen = 0
    while True:
        calls = fake.calls
        for call in calls[seen:]:
            if call.method != "POST" or not call.path.endswith("/messages") or not call.body:
                continue
            replied = (call.body.get("message_reference") or {}).get("message_id")
            if replied in wanted and replied not in first:
                first[replied] = call.at
        seen = len(calls)
        if len(first) == len(wanted) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    return [(first[str(m)] - at) * 1000 for m, at in sent.items() if str(m) in first]


def _schedule(channels: list[int], rounds: int, interval: float) -> list[tuple[float, int]]:
    """``rounds`` messages in each channel, one every ``interval`` s, phases spread."""
    start = time.perf_counter() + 0.2
    return sorted(
        (start + phase + k * interval, channel)
        for channel, phase in ((c, random.uniform(0, interval)) for c in channels)
        for k in range(rounds)
    )


async def _send_bare(
    nc, fake: FakeDiscord, channels: list[int], rounds: int, interval: float
) -> dict[int, float]:
    """As :func:`_send_all`, to the bare gateway worker; returns when each message was sent."""
    sent: dict[int, float] = {}
    for at, channel in _schedule(channels, rounds, interval):
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        message = fake.snowflake()
        said = {"turn": new_id(), "channel": str(channel), "message": str(message)}
        sent[message] = time.perf_counter()
        await nc.publish(f"bare.discord.in.bare-{channel}", json.dumps(said).encode())
    return sent


async def _bare_latencies(
    url: str, shape: bare.Shape, fake: FakeDiscord, chat: list[int], rounds: int, interval: float
) -> list[float]:
    async with bare.chain(url, shape, discord=(fake.rest_url, fake.token)) as nc:
        warm = await _send_bare(nc, fake, chat, 1, interval)
        await _first_posts(fake, warm, timeout=30)
        await asyncio.sleep(max(0.0, 5.0 - interval))  # let the rate windows pass
        sent = await _send_bare(nc, fake, chat, rounds, interval)
        return await _first_posts(fake, sent, timeout=30)


async def _send_all(
    fake: FakeDiscord, channels: list[int], rounds: int, interval: float
) -> dict[int, float]:
    """Sends ``rounds`` messages in each channel, one every ``interval`` s, phases spread;
    returns when the fake sent each one's MESSAGE_CREATE."""
    person = fake.user("bench")
    sent: dict[int, float] = {}
    for at, channel in _schedule(channels, rounds, interval):
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        message = await fake.send_message(channel, "How are you today?", author=person)
        sent[int(message["id"])] = fake.dispatched_at[int(message["id"])]
    return sent


async def chat_channels(
    log: EventLog, fake: FakeDiscord, count: int, *, guild_name: str = "bench"
) -> list[int]:
    """A server with ``count`` channels, every one in chat mode (in the log, as /chat on does)."""
    guild = fake.add_guild(guild_name)
    channels = [fake.add_channel(guild, f"chat-{i}") for i in range(count)]
    await log.publish_many(
        make(
            SessionChat,
            conversation=conversation_id("discord", guild, channel),
            user="bench",
            enabled=True,
            origin=Origin(platform="discord", guild=str(guild), channel=str(channel)),
        )
        for channel in channels
    )
    return channels


async def run_bench_discord(
    settings: Settings,
    *,
    channels: int,
    rounds: int,
    interval: float,
    as_json: bool,
) -> dict:
    """Measures MESSAGE_CREATE → first POST with ``channels`` channels active, and prints it."""
    async with servers(settings, postgres=True, redis=True) as srv, FakeDiscord() as fake:
        await migrate(srv.database_url)
        log = await EventLog.connect(srv.nats_url, name="bench-discord")
        await log.provision(Settings(), consumers=())
        env = {**_gateway_env(srv, fake), "RATE_LIMIT_TURNS": "1000000", "LLM_CACHE_ENABLED": "0"}
        for key in ("OPENAI_API_KEY", "GROQ_API_KEY", "ANTHROPIC_API_KEY", "OLLAMA_URL"):
            env.pop(key, None)
        try:
            chat = await chat_channels(log, fake, channels)
            with (
                fake_llm_provider(ANSWER) as provider_url,
                tempfile.TemporaryDirectory(prefix="libra-bench-discord-") as folder,
            ):
                env["LLM_BASE_URL"] = provider_url
                async with (
                    libra_processes(env, PROCESSORS),
                    _gateway_process(srv, fake, Path(folder), env),
                ):
                    before = await stream_seqs(log)
                    warm = await _send_all(fake, chat, 1, interval)
                    await _first_posts(fake, warm, timeout=30)
                    shape = await bare_shape(log, before, ttft_s=0.0)
                    await asyncio.sleep(max(0.0, 5.0 - interval))  # let the rate windows pass
                    started = time.perf_counter()
                    sent = await _send_all(fake, chat, rounds, interval)
                    latencies = await _first_posts(fake, sent, timeout=30)
                    elapsed = time.perf_counter() - started
            plain = await _bare_latencies(srv.nats_url, shape, fake, chat, rounds, interval)
        finally:
            await log.close()
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    bare50, bare99 = percentile(plain, 50), percentile(plain, 99)
    results: dict = {
        "first_post_p50_ms": p50,
        "first_post_p99_ms": p99,
        "first_post_bare_p50_ms": bare50,
        "first_post_bare_p99_ms": bare99,
        "first_post_ratio_p50": p50 / bare50,
        "first_post_ratio_p99": p99 / bare99,
        "bare_answered": len(plain),
        "first_post_max_ms": max(latencies, default=float("nan")),
        "channels": channels,
        "messages": len(sent),
        "answered": len(latencies),
        "messages_per_s": len(sent) / elapsed,
        "nats": "real nats.conf (every write synced)",
        "processors": NOTE,
    }
    report(
        results,
        as_json=as_json,
        title=f"libra bench discord (MESSAGE_CREATE to first POST; {NOTE})",
    )
    return results
