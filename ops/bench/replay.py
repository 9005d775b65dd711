"""`libra bench replay`: how fast `libra replay` reads the log back and re-processes it.

- noop: the replay engine (read the log, decode, select, hand each input to a processor on
  bounded workers) with a handler that does nothing, beside a bare read of the same events with
  nats-py (a pull consumer fetching in batches, nothing decoded): the ceiling of reading.
- echo: the same with a handler that makes one output per input, published to LIBRA_REPLAY.
- llm: the real llm processor against a loopback provider that takes ``ttft`` to its first
  token, at ``concurrency`` inputs at once: replay goes at the provider's pace, bounded.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from libra.contracts import (
    CONSUMERS,
    LOG_STREAM,
    AnyEvent,
    Event,
    LlmFailed,
    Origin,
    TextReceived,
    TurnAccepted,
    derive,
    make,
)
from libra.processors.llm.chain import ProviderChain
from libra.processors.llm.context import PromptBuilder
from libra.processors.llm.processor import LlmProcessor
from libra.runtime.config import Settings
from libra.runtime.eventlog import EventLog

from ..replay import ReplaySink, Selection, ensure_replay_stream, replay_events
from .common import fake_llm_provider, median, report, servers

__all__ = ["recorded_turns", "run_bench_replay"]

ORIGIN = Origin(platform="bench", channel="1")
REPLY = " ".join(["word"] * 20)


class _Noop:
    """Takes every accepted turn and makes nothing of it."""

    spec = CONSUMERS["llm"]

    async def handle(self, event: AnyEvent) -> list[Event]:
        return []


class _Echo:
    """One output per input: the cost of publishing what a replay produces."""

    spec = CONSUMERS["llm"]

    async def handle(self, event: AnyEvent) -> list[Event]:
        return [derive(event, LlmFailed, key="completed", error="echo", message="", origin=ORIGIN)]


def recorded_turns(n: int, conversations: int = 200) -> Iterator[TurnAccepted]:
    """Accepted turns as the log records them, spread over ``conversations``."""
    for i in range(n):
        said = make(
            TextReceived,
            conversation=f"bench-{i % conversations}",
            user=f"u{i % conversations}",
            text=f"Question number {i}: what should I cook tonight?",
            origin=ORIGIN,
        )
        yield derive(said, TurnAccepted, key="turn", text=said.text, origin=ORIGIN)


async def _bare_read(url: str, n: int) -> float:
    nc = await nats.connect(url)
    js = nc.jetstream()
    started = time.perf_counter()
    sub = await js.pull_subscribe(
        "libra.turn.accepted.>",
        stream=LOG_STREAM,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, mem_storage=True
        ),
    )
    seen = 0
    while seen < n:
        seen += len(await sub.fetch(2048, timeout=5))
    elapsed = time.perf_counter() - started
    await sub.unsubscribe()
    await nc.close()
    return n / elapsed


async def _replayed(log: EventLog, processor, *, sink: bool, concurrency: int) -> float:
    result = await replay_events(
        log,
        processor,
        Selection(),
        run="bench",
        sink=ReplaySink(log.js, f"bench{time.monotonic_ns()}") if sink else None,
        concurrency=concurrency,
    )
    return result.per_s


async def _llm_figure(log: EventLog, turns: int, concurrency: int, ttft: float) -> float:
    with fake_llm_provider(REPLY, ttft=ttft) as base_url:
        settings = Settings.from_env(
            {"OPENAI_API_KEY": "sk-bench", "OPENAI_BASE_URL": base_url, "LLM_RETRIES": "0"}
        )
        chain = ProviderChain.from_settings(settings)
        processor = LlmProcessor(chain, PromptBuilder(None, None))
        try:
            result = await replay_events(
                log,
                processor,
                Selection(limit=turns),
                run="bench-llm",
                sink=ReplaySink(log.js, "bench-llm"),
                concurrency=concurrency,
            )
        finally:
            await chain.aclose()
    if result.errors:
        raise RuntimeError(f"{result.errors} of {result.inputs} llm replays failed")
    return result.per_s


async def run_bench_replay(
    settings: Settings,
    *,
    events: int,
    rounds: int,
    turns: int,
    concurrency: int,
    ttft: float,
    as_json: bool,
) -> dict:
    """Measures replay against a bare read of the same events, and at a provider's pace."""
    async with servers(settings) as srv:
        log = await EventLog.connect(srv.nats_nosync_url, name="bench-replay")
        try:
            await log.provision(Settings(), consumers=())
            await ensure_replay_stream(log, Settings())
            await log.publish_many(recorded_turns(events))
            noop, echo, bare = [], [], []
            for _ in range(rounds):  # interleaved, so that each sees the same noise
                bare.append(await _bare_read(srv.nats_nosync_url, events))
                noop.append(await _replayed(log, _Noop(), sink=False, concurrency=concurrency))
                echo.append(await _replayed(log, _Echo(), sink=True, concurrency=concurrency))
            llm = await _llm_figure(log, turns, concurrency, ttft)
        finally:
            await log.close()
    results: dict = {
        "replay_noop_per_s": median(noop),
        "replay_bare_read_per_s": median(bare),
        "replay_noop_ratio": median(noop) / median(bare),
        "replay_echo_per_s": median(echo),
        "replay_llm_per_s": llm,
        "replay_llm_bound_per_s": concurrency / ttft,
        "events": events,
        "llm_turns": turns,
        "llm_ttft_s": ttft,
        "concurrency": concurrency,
        "rounds": rounds,
    }
    report(results, as_json=as_json, title="libra bench replay (medians of rounds)")
    return results
