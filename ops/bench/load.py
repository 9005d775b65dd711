"""`libra bench load`: many people on both edges for minutes, optionally through one fault.

Libra runs as production runs it: each group of components is a ``libra run`` process (admission,
llm, projections with memory, the HTTP API, the Discord gateway) on servers started from the
real ``nats.conf``, PostgreSQL and Redis; the provider is a loopback fake of the OpenAI wire
(200 ms to the first token, then 400 tokens/s) and Discord is the loopback fake. Half the
conversations are HTTP API users (one person each, as the API's conversations are); the others
are Discord channels in chat mode shared by the remaining people. Each person writes, waits for
the reply, thinks ``--think`` s ±50 %, and writes again.

With ``--fault``, one dependency goes away a third of the way in: the embedded Redis, PostgreSQL
or NATS is stopped for ``--fault-seconds`` and started again on the same port and data, or the
llm process is SIGKILLed and started again. Lost turns (the person saw neither an answer nor a
readable refusal) and turns answered twice (two decisions or completions in the log, or two
Discord replies posted to one message) are counted from the people's side, the log and the fake
Discord.

Beside Libra's overhead (``text.received`` to the first delta, less the provider's TTFT, both
seen by one observer process), the same people at the same pace drive the bare chain
(:mod:`.bare`) for a while right before: ``overhead_bare_*`` and the ratios.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from libra.contracts import (
    LOG_STREAM,
    TextReceived,
    new_id,
)
from libra.runtime.config import Settings
from libra.runtime.database import migrate
from libra.runtime.eventlog import EventLog
from libra.runtime.projection import read_log

from ..embedded import free_port
from ..fakes.discord import FakeDiscord, FakeUser
from . import bare
from .common import (
    BenchServers,
    LibraProcess,
    bare_shape,
    consumers_settled,
    fake_llm_provider,
    percentile,
    report,
    rss_mb,
    servers,
    stream_seqs,
)
from .discord import chat_channels
from .people import DiscordReplies, Turn, discord_turn, http_turn, person

__all__ = ["LoadPlan", "run_bench_load"]

GROUPS = {
    "turns": ("turns", "ratelimit-view"),
    "llm": ("llm",),
    "projections": ("history", "sessions", "turns-projection", "memory"),
    "http": ("http",),
    "discord": ("discord",),
}
TTFT_S, TOKENS_PER_S = 0.2, 400.0
REPLY = (
    "Sure. An event log keeps every message, transcript and reply as an immutable fact, so the "
    "bot can replay a conversation, rebuild its memory and explain what happened when."
)


@dataclass(frozen=True)
class LoadPlan:
    users: int
    conversations: int
    seconds: float
    think: float
    fault: str | None = None
    fault_seconds: float = 30.0

    @property
    def http_users(self) -> int:
        return max(1, self.conversations // 2)

    @property
    def channels(self) -> int:
        return max(1, self.conversations - self.http_users)

    @property
    def bare_seconds(self) -> float:
        return min(60.0, max(5.0, self.seconds / 4))


@dataclass
class Run:
    """What one run needs at hand: servers, the fake Discord, the Libra processes."""

    plan: LoadPlan
    servers: BenchServers
    fake: FakeDiscord
    log: EventLog
    http_url: str
    channels: list[int]
    procs: dict[str, LibraProcess] = field(default_factory=dict)
    rss_start: dict[str, float] = field(default_factory=dict)


def _env(srv: BenchServers, fake: FakeDiscord, provider_url: str, http_port: int) -> dict:
    env = {
        **os.environ,
        "NATS_URL": srv.nats_url,
        "DATABASE_URL": srv.database_url,
        "REDIS_URL": srv.redis_url,
        "DISCORD_TOKEN": fake.token,
        "DISCORD_REST_URL": fake.rest_url,
        "DISCORD_GUILD_ID": "",
        "HTTP_PORT": str(http_port),
        "LLM_BASE_URL": provider_url,
        "LLM_CACHE_ENABLED": "0",
        "LOG_LEVEL": "WARNING",
        "LIBRA_METRICS_PORT": "0",
    }
    for key in (
        "OPENAI_API_KEY",
        "GROQ_API_KEY",
        "ANTHROPIC_API_KEY",
        "OLLAMA_URL",
        "LLM_PROVIDERS",
    ):
        env.pop(key, None)
    return env


@contextlib.asynccontextmanager
async def _libra(run: Run, env: dict[str, str]) -> AsyncIterator[None]:
    """Starts every group as a ``libra run`` process; stops them (they drain) at the end."""
    try:
        for name, names in GROUPS.items():
            run.procs[name] = LibraProcess(names, env, run.servers.folder)
        await asyncio.gather(*(p.start() for p in run.procs.values()))
        await run.fake.ready(1, timeout=60)
        await run.fake.wait_for(
            lambda: bool(run.fake.calls_to("GET", r"/applications/\d+/commands")), timeout=30
        )
        yield
    finally:
        await asyncio.gather(*(p.stop() for p in run.procs.values()))


class Observer:
    """The bare observer process (:mod:`.bare`): when each turn's events went by, both chains."""

    def __init__(self, url: str, folder: Path) -> None:
        self.url, self.out = url, folder / "observed.json"
        self.proc: subprocess.Popen | None = None

    async def start(self) -> None:
        command = bare.worker_command("observe", self.url, bare.Shape(), str(self.out))
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        await asyncio.to_thread(self.proc.stdout.readline)  # "observing"

    async def finish(self) -> dict[str, dict]:
        """Stops it and returns what it saw, by turn id."""
        assert self.proc is not None
        self.proc.terminate()
        await asyncio.to_thread(self.proc.wait, 30)
        return json.loads(self.out.read_text())

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _overheads(observed: dict[str, dict], chain: str, since: float, until: float) -> list[float]:
    """Milliseconds from ``text.received`` to the first delta, less the provider's TTFT."""
    return [
        (t["delta_at"] - t["received_at"]) * 1000 - t["ttft_ms"]
        for t in observed.values()
        if t["chain"] == chain
        and "delta_at" in t
        and "ttft_ms" in t
        and since <= t.get("received_at", -1.0) <= until
    ]


def _cast(run: Run, until: float, turns: list[Turn], replies: DiscordReplies, session, tag: str):
    """Every person of the plan, as coroutines that take turns until ``until``."""
    plan = run.plan
    people = []
    for i in range(plan.http_users):
        user = f"{tag}-{i}"

        async def http_one(user: str = user) -> Turn:
            return await http_turn(session, run.http_url, user, f"Question from {user}?")

        people.append(http_one)
    authors = [run.fake.user(f"{tag}-d{i}") for i in range(plan.users - plan.http_users)]
    for i, author in enumerate(authors):
        channel = run.channels[i % len(run.channels)]

        async def discord_one(channel: int = channel, author: FakeUser = author) -> Turn:
            text = f"How are you today, {author.name}?"
            return await discord_turn(run.fake, replies, channel, author, text)

        people.append(discord_one)
    return [
        person(one, think=plan.think, until=until, rng=random.Random(n), turns=turns)
        for n, one in enumerate(people)
    ]


async def _warm(run: Run, replies: DiscordReplies, session) -> None:
    """A few turns on each edge: connections open, code paths taken, as a running Libra's are."""
    author = run.fake.user("warm")
    for round_ in range(3):
        await asyncio.gather(
            *(
                http_turn(session, run.http_url, f"warm-{round_}-{i}", "Hello?")
                for i in range(min(16, run.plan.http_users))
            ),
            *(
                discord_turn(run.fake, replies, channel, author, "Hello?")
                for channel in run.channels[:16]
            ),
        )


async def _inject(run: Run, at_s: float) -> dict:
    """The planned fault, ``at_s`` seconds from now; returns when and for how long."""
    plan = run.plan
    await asyncio.sleep(at_s)
    began = time.monotonic()
    if plan.fault == "kill-llm":
        run.procs["llm"].kill()
        await run.procs["llm"].start()
        run.rss_start["llm"] = rss_mb(run.procs["llm"].pid)  # a new process from here
    else:
        server = run.servers.embedded[plan.fault]
        await server.stop()
        await asyncio.sleep(plan.fault_seconds)
        await server.start()
    return {"fault_at_s": at_s, "fault_down_s": time.monotonic() - began}


async def _libra_phase(run: Run, replies: DiscordReplies, session) -> tuple[list[Turn], dict]:
    plan = run.plan
    turns: list[Turn] = []
    began = time.monotonic()
    fault = asyncio.create_task(_inject(run, plan.seconds / 3)) if plan.fault else None
    await asyncio.gather(*_cast(run, began + plan.seconds, turns, replies, session, "load"))
    figures = {"elapsed_s": time.monotonic() - began}
    if fault is not None:
        figures.update(await fault)
    running = [name for names in GROUPS.values() for name in names]
    figures["lag_after_s"] = await consumers_settled(run.log, running, every_s=0.2)
    return turns, figures


async def _bare_phase(run: Run, shape: bare.Shape) -> int:
    """The same people at the same pace on the bare chain; returns the turns taken."""
    async with bare.chain(run.servers.nats_url, shape) as nc:
        return await _bare_people(nc, run.plan, shape)


async def _bare_people(nc, plan: LoadPlan, shape: bare.Shape) -> int:
    js = nc.jetstream()
    until = time.monotonic() + plan.bare_seconds
    count = 0

    async def one(n: int) -> None:
        nonlocal count
        rng = random.Random(n)
        # the same conversations as the Libra run: one per HTTP user, the rest share channels
        conversation = f"bare-{n if n < plan.http_users else plan.http_users + n % plan.channels}"
        await asyncio.sleep(rng.uniform(0, plan.think))
        while time.monotonic() < until:
            await bare.bare_converse(nc, js, conversation, new_id(), shape)
            count += 1
            await asyncio.sleep(rng.uniform(0.5 * plan.think, 1.5 * plan.think))

    await asyncio.gather(*(one(n) for n in range(plan.users)))
    return count


async def _log_counts(log: EventLog) -> dict:
    """Per turn in the log: decisions (accepted/rejected) and answers (completed/failed)."""
    said: set[str] = set()
    seen: Counter[tuple[str, str]] = Counter()  # (turn, event type)
    subjects = [
        "libra.text.received.>",
        "libra.turn.accepted.>",
        "libra.turn.rejected.>",
        "libra.llm.completed.>",
        "libra.llm.failed.>",
    ]
    async for _, event in read_log(log, subjects, stream=LOG_STREAM):
        if isinstance(event, TextReceived):
            said.add(event.id)
        else:
            seen[event.turn, event.__struct_config__.tag] += 1

    def count(turn: str, *types: str) -> int:
        return sum(seen[turn, t] for t in types)

    doubled = [
        t
        for t in said
        if count(t, "turn.accepted", "turn.rejected") > 1
        or count(t, "llm.completed", "llm.failed") > 1
    ]
    ended = ("turn.rejected", "llm.completed", "llm.failed")
    return {
        "duplicated_in_log": len(doubled),
        "unanswered_in_log": sum(1 for t in said if not count(t, *ended)),
        "duplicated_in_log_examples": "; ".join(
            f"{t}: " + ", ".join(f"{k}x{n}" for (turn, k), n in seen.items() if turn == t)
            for t in doubled[:3]
        ),
    }


def _people_figures(turns: list[Turn], elapsed: float) -> dict:
    outcomes = Counter(t.outcome for t in turns)
    waits = [t.wait_s for t in turns if t.wait_s is not None]
    errors = outcomes["refused"] + outcomes["lost"]
    return {
        "turns": len(turns),
        "turns_per_s": outcomes["answered"] / elapsed,
        "answered": outcomes["answered"],
        "refused": outcomes["refused"],
        "rate_limited": outcomes["rate_limited"],
        "lost": outcomes["lost"],
        "errors": errors,
        "error_rate": errors / max(1, len(turns)),
        "longest_wait_s": max(waits, default=float("nan")),
        "wait_p99_s": percentile(waits, 99),
    }


def _rss_figures(run: Run, turns: int) -> dict:
    figures: dict = {}
    growth = []
    for name, proc in run.procs.items():
        start, end = run.rss_start[name], rss_mb(proc.pid)
        figures[f"rss_{name}_start_mb"] = start
        figures[f"rss_{name}_end_mb"] = end
        growth.append((end - start) / max(1, turns) * 10_000)
    figures["rss_growth_mb_per_10k_turns"] = max(growth)
    return figures


def _overhead_figures(observed: dict, libra_window: tuple[float, float]) -> dict:
    libra = _overheads(observed, "libra", *libra_window)
    plain = _overheads(observed, "bare", 0.0, float("inf"))
    p50, p99 = percentile(libra, 50), percentile(libra, 99)
    bare50, bare99 = percentile(plain, 50), percentile(plain, 99)
    return {
        "overhead_p50_ms": p50,
        "overhead_p99_ms": p99,
        "overhead_bare_p50_ms": bare50,
        "overhead_bare_p99_ms": bare99,
        "overhead_ratio_p50": p50 / bare50,
        "overhead_ratio_p99": p99 / bare99,
        "overhead_turns": len(libra),
        "overhead_bare_turns": len(plain),
    }


async def _measure(run: Run, observer: Observer) -> dict:
    replies = DiscordReplies(run.fake, REPLY.split()[0])  # a first post holds the first piece
    watcher = asyncio.create_task(replies.run())
    connector = aiohttp.TCPConnector(limit=0)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            before = await stream_seqs(run.log)
            await _warm(run, replies, session)
            shape = await bare_shape(run.log, before, ttft_s=TTFT_S)
            bare_turns = await _bare_phase(run, shape)
            run.rss_start = {name: rss_mb(p.pid) for name, p in run.procs.items()}
            began = time.perf_counter()
            turns, figures = await _libra_phase(run, replies, session)
            window = (began, time.perf_counter())
    finally:
        watcher.cancel()
    figures.update(_people_figures(turns, figures["elapsed_s"]))
    figures.update(_rss_figures(run, len(turns)))
    figures.update(await _log_counts(run.log))
    doubled = replies.duplicated
    figures["duplicated_posts"] = len(doubled)
    figures["duplicated_posts_examples"] = "; ".join(
        f"{m}: {doubled[m]!r}" for m in list(doubled)[:3]
    )
    figures["duplicated"] = figures["duplicated_in_log"] + len(doubled)
    figures.update(_overhead_figures(await observer.finish(), window))
    figures["bare_turns"] = bare_turns
    return figures


async def run_bench_load(settings: Settings, *, plan: LoadPlan, as_json: bool) -> dict:
    """Runs the load (and the fault) and prints the figures."""
    async with servers(settings, postgres=True, redis=True) as srv, FakeDiscord() as fake:
        if plan.fault not in (None, "kill-llm") and plan.fault not in srv.embedded:
            raise RuntimeError(f"--fault {plan.fault}: the server is external, not embedded")
        await migrate(srv.database_url)
        log = await EventLog.connect(srv.nats_url, name="bench-load")
        try:
            await log.provision(Settings())
            channels = await chat_channels(log, fake, plan.channels, guild_name="load")
            with fake_llm_provider(REPLY, ttft=TTFT_S, tokens_per_sec=TOKENS_PER_S) as provider:
                http_port = free_port()
                run = Run(
                    plan,
                    srv,
                    fake,
                    log,
                    f"http://127.0.0.1:{http_port}/api/chat/completions",
                    channels,
                )
                observer = Observer(srv.nats_url, srv.folder)
                await observer.start()
                try:
                    async with _libra(run, _env(srv, fake, provider, http_port)):
                        results = await _measure(run, observer)
                finally:
                    observer.close()
        finally:
            await log.close()
    results.update(
        users=plan.users,
        conversations=plan.conversations,
        seconds=plan.seconds,
        think_s=plan.think,
        fault=plan.fault or "none",
    )
    report(results, as_json=as_json, title=_title(plan))
    return results


def _title(plan: LoadPlan) -> str:
    fault = f", fault {plan.fault}" if plan.fault else ""
    return (
        f"libra bench load ({plan.users} people in {plan.conversations} conversations, "
        f"{plan.seconds:.0f} s{fault}; overhead: text.received to the first delta less the "
        f"provider's TTFT; bare: the same chain in bare nats-py, {plan.bare_seconds:.0f} s before)"
    )
