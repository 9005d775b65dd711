"""`libra bench text`: orchestration overhead of a text turn, from ``text.received`` to the
first delta seen by the gateway.

Libra runs as production runs it: each group of components is a `libra run` process of its own
(admission, the llm processor, the projections with memory), on servers started from the real
nats.conf. The provider is a loopback fake of the OpenAI wire in another process, reached
through the official OpenAI SDK (the OpenAI-compatible path, so memory uses the local
embedder). The gateway's part is Libra's own ``converse``, as in the HTTP API.

Conversations are people: each sends a message, reads the reply, and writes the next one after
a think time (``--think`` seconds, ±50 %). Two overheads are reported per turn:

- ``overhead``: time to the first delta minus the provider call (request sent to first token,
  as the llm processor's chain measured it): Libra's event plumbing alone;
- ``overhead_with_sdk``: time to the first delta minus the fake's configured TTFT only, so the
  SDK's own cost of building and parsing the request counts too.

Beside each scenario, the same conversations at the same pace drive the bare chain (:mod:`.bare`:
the same synced publishes and pulls in bare nats-py, payloads of the sizes Libra's had) for as
long: ``overhead_bare_*`` and the ratios ``overhead_ratio_p50``/``_p99``. This machine's speed
drifts within a minute, so the two take turns, three windows each (``--seconds`` shared between
them, each starting with both chains idle), and ``overhead_ratio_p50_by_round`` shows each pair.

What each turn cost the machine, as each chain ran: ``cpu_ms_per_turn`` and
``bare_cpu_ms_per_turn``, milliseconds of CPU by process (the servers, each ``libra run``, this
process as the gateway, the fake provider) and in total, and ``cpu_ratio``. On a small machine a
turn's hops wait for cores the other turns' work holds, so this is where a ratio above 1 starts.

And where the overhead goes, at p50 and p99: ``publish`` (``text.received`` written, synced,
acked), ``admission`` (from there to ``turn.accepted`` seen at the gateway) and ``llm`` (from
there to the first delta, less the provider call), each beside the bare chain's same stage
(``publish_bare_p50_ms`` and so on).

``--local`` instead answers a few turns, one after another, with the embedded model and no
account (:mod:`.local`): the time to the first delta at the gateway and the tokens per second
of the stream, beside llama-cpp called directly from this process with the same prompts in the
same run (``bare_*``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Awaitable

from libra.contracts import (
    LlmCompleted,
    LlmDelta,
    LlmFailed,
    TextReceived,
    TurnAccepted,
    TurnRejected,
    new_id,
)
from libra.gateway.chat import converse
from libra.runtime.config import Settings
from libra.runtime.database import migrate
from libra.runtime.eventlog import EventLog

from . import bare
from .common import (
    bare_shape,
    consumers_settled,
    cpu_by_role,
    cpu_ms_per_turn,
    cpu_spent,
    fake_llm_provider,
    libra_processes,
    median,
    percentile,
    report,
    servers,
    stream_seqs,
)
from .local import BareLlama, Generation, local_env

__all__ = ["run_bench_text", "run_bench_text_local", "run_bench_text_moderation"]

# Measured windows per chain, taking turns, so that both see the machine as its speed drifts.
ROUNDS = 3
GROUPS = (
    ["turns", "ratelimit-view"],
    ["llm"],
    ["history", "sessions", "turns-projection", "memory"],
)
REPLY = (
    "Sure. An event log keeps every message, transcript and reply as an immutable fact, so the "
    "bot can replay a conversation, rebuild its memory and explain what happened when."
)


class _Tally:
    """One chain's measured windows: each turn's figures, and the windows' time and CPU."""

    def __init__(self, *, bare_chain: bool = False) -> None:
        self.bare_chain = bare_chain  # its processes: the bare workers, else Libra's
        self.overheads: list[float] = []
        self.with_sdk: list[float] = []
        self.stages: dict[str, list[float]] = {"publish": [], "admission": [], "llm": []}
        self.completed = self.failed = 0
        self.in_flight = self.peak = 0
        self.seconds = 0.0
        self.cpu_s: dict[str, float] = {}  # CPU seconds in the windows, by process (role)
        self.p50s: list[float] = []  # each window's overhead p50

    async def measure(self, window: Awaitable[object]) -> None:
        """Runs one measured window, adding its time and the CPU its chain's processes took in
        it (the servers it uses and the gateway, this process, included)."""
        cpu, began, first = cpu_by_role(), time.monotonic(), len(self.overheads)
        await window
        self.seconds += time.monotonic() - began
        for role, taken in cpu_spent(cpu, cpu_by_role()).items():
            if role.startswith("bare ") == self.bare_chain or role in ("gateway", "nats"):
                self.cpu_s[role] = self.cpu_s.get(role, 0.0) + taken
        self.p50s.append(percentile(self.overheads[first:], 50))

    @property
    def cpu(self) -> dict[str, float]:
        """Milliseconds of CPU per turn, by process and in total."""
        return cpu_ms_per_turn(self.cpu_s, self.completed)


async def _turn(log: EventLog, n: int, ttft: float, tally: _Tally) -> None:
    started = time.perf_counter()
    first = published = accepted = None
    tally.in_flight += 1
    tally.peak = max(tally.peak, tally.in_flight)
    try:
        async for event in converse(
            log, platform="bench", user=f"person-{n}", text=f"Question {n}?"
        ):
            if isinstance(event, TextReceived):
                published = (time.perf_counter() - started) * 1000
            elif isinstance(event, TurnAccepted):
                accepted = (time.perf_counter() - started) * 1000
            elif isinstance(event, LlmDelta) and first is None:
                first = (time.perf_counter() - started) * 1000
            elif isinstance(event, LlmCompleted) and first is not None:
                tally.completed += 1
                tally.overheads.append(max(0.0, first - event.ttft_ms))
                tally.with_sdk.append(max(0.0, first - ttft * 1000))
                if published is not None and accepted is not None:
                    tally.stages["publish"].append(published)
                    tally.stages["admission"].append(accepted - published)
                    tally.stages["llm"].append(max(0.0, first - accepted - event.ttft_ms))
            elif isinstance(event, LlmFailed | TurnRejected):
                tally.failed += 1
    finally:
        tally.in_flight -= 1


async def _conversation(
    log: EventLog, n: int, ttft: float, think: float, until: float, tally: _Tally
) -> None:
    rng = random.Random(n)
    await asyncio.sleep(rng.uniform(0, think))  # people do not all start in the same second
    while time.monotonic() < until:
        await _turn(log, n, ttft, tally)
        await asyncio.sleep(rng.uniform(0.5 * think, 1.5 * think))


async def _scenario(
    env: dict[str, str],
    *,
    ttft: float,
    tokens_per_sec: float,
    conversations: int,
    think: float,
    seconds: float,
    rounds: int = ROUNDS,
    bare_too: bool = True,
) -> tuple[_Tally, _Tally]:
    """Libra's turns and the bare chain's, ``rounds`` measured windows each, taking turns (and
    starting each window with both idle): both see the machine as it drifts. Returns Libra's
    tally and the bare chain's (empty without ``bare_too``)."""
    with fake_llm_provider(REPLY, ttft=ttft, tokens_per_sec=tokens_per_sec) as provider_url:
        async with libra_processes({**env, "LLM_BASE_URL": provider_url}, GROUPS):
            log = await EventLog.connect(env["NATS_URL"], name="bench-text-gateway")
            try:
                # Warm, as a running Libra is: connections to Postgres, Redis and the provider
                # open for as many turns at once as the measured run will have.
                before = await stream_seqs(log)
                warm = _Tally()
                for i in range(10):
                    await _turn(log, 10_000 + i, ttft, warm)
                await asyncio.gather(
                    *(_turn(log, 20_000 + i, ttft, warm) for i in range(min(conversations, 32)))
                )
                shape = await bare_shape(log, before, ttft_s=ttft)
                async with contextlib.AsyncExitStack() as stack:
                    nc = None
                    if bare_too:
                        nc = await stack.enter_async_context(bare.chain(env["NATS_URL"], shape))
                    people = {"conversations": conversations, "think": think}
                    window = seconds / rounds
                    libra, plain = _Tally(), _Tally(bare_chain=True)
                    sides = [lambda: _libra_window(log, ttft, window, libra, **people)]
                    if nc is not None:
                        sides.append(lambda: _bare_window(nc, shape, window, plain, **people))
                    running = [name for group in GROUPS for name in group]
                    for r in range(rounds):
                        for side in sides if r % 2 == 0 else sides[::-1]:
                            # no window pays for work left from the one before (projections')
                            await consumers_settled(log, running, timeout=30.0)
                            await side()
                    return libra, plain
            finally:
                await log.close()


async def _libra_window(
    log: EventLog, ttft: float, seconds: float, tally: _Tally, *, conversations: int, think: float
) -> None:
    async def drive() -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(
            *(_conversation(log, i, ttft, think, until, tally) for i in range(conversations))
        )

    await tally.measure(drive())


async def _bare_window(
    nc, shape: bare.Shape, seconds: float, tally: _Tally, *, conversations: int, think: float
) -> None:
    """The bare chain's turns, with the scenario's people and pace."""
    js = nc.jetstream()

    async def conversation(n: int) -> None:
        rng = random.Random(n)
        await asyncio.sleep(rng.uniform(0, think))
        while time.monotonic() < until:
            turn = await bare.bare_converse(nc, js, f"bare-{n}", new_id(), shape)
            tally.overheads.append(max(0.0, turn.first_ms - turn.ttft_ms))
            tally.stages["publish"].append(turn.published_ms)
            tally.stages["admission"].append(turn.accepted_ms - turn.published_ms)
            tally.stages["llm"].append(max(0.0, turn.first_ms - turn.accepted_ms - turn.ttft_ms))
            tally.completed += 1
            await asyncio.sleep(rng.uniform(0.5 * think, 1.5 * think))

    until = time.monotonic() + seconds
    await tally.measure(asyncio.gather(*(conversation(n) for n in range(conversations))))


def _figures(prefix: str, tally: _Tally, plain: _Tally) -> dict:
    p50, p99 = percentile(tally.overheads, 50), percentile(tally.overheads, 99)
    bare50, bare99 = percentile(plain.overheads, 50), percentile(plain.overheads, 99)
    cpu, bare_cpu = tally.cpu, plain.cpu
    return {
        f"{prefix}overhead_p50_ms": p50,
        f"{prefix}overhead_p99_ms": p99,
        f"{prefix}overhead_bare_p50_ms": bare50,
        f"{prefix}overhead_bare_p99_ms": bare99,
        f"{prefix}overhead_ratio_p50": p50 / bare50,
        f"{prefix}overhead_ratio_p99": p99 / bare99,
        f"{prefix}overhead_with_sdk_p50_ms": percentile(tally.with_sdk, 50),
        f"{prefix}overhead_with_sdk_p99_ms": percentile(tally.with_sdk, 99),
        f"{prefix}overhead_ratio_p50_by_round": [
            ours / theirs for ours, theirs in zip(tally.p50s, plain.p50s, strict=True)
        ],
        f"{prefix}turns_per_s": tally.completed / tally.seconds,
        f"{prefix}turns": tally.completed,
        f"{prefix}failed": tally.failed,
        f"{prefix}peak_in_flight": tally.peak,
        f"{prefix}cpu_ms_per_turn": cpu,
        f"{prefix}bare_cpu_ms_per_turn": bare_cpu,
        f"{prefix}cpu_ratio": cpu["total"] / bare_cpu["total"],
        **{
            f"{prefix}{stage}{side}_p{q}_ms": percentile(of.stages[stage], q)
            for stage in tally.stages
            for side, of in (("", tally), ("_bare", plain))
            for q in (50, 99)
        },
    }


async def run_bench_text(
    settings: Settings, *, conversations: int, think: float, seconds: float, as_json: bool
) -> dict:
    """Runs the instant and the slow provider scenario, and a saturation run, and prints them."""
    results: dict = {"conversations": conversations, "think_s": think, "seconds": seconds}
    async with servers(settings, postgres=True, redis=True) as urls:
        await migrate(urls.database_url)
        env = {
            **os.environ,
            "NATS_URL": urls.nats_url,
            "DATABASE_URL": urls.database_url,
            "REDIS_URL": urls.redis_url,
            "LLM_CACHE_ENABLED": "0",
            "LOG_LEVEL": "WARNING",
            # a bench person talks faster than a person may: the limit is lifted, the
            # admission script still runs for every turn
            "RATE_LIMIT_TURNS": "1000000",
        }
        for key in (
            "OPENAI_API_KEY",
            "GROQ_API_KEY",
            "ANTHROPIC_API_KEY",
            "OLLAMA_URL",
            "LLM_PROVIDERS",
        ):
            env.pop(key, None)
        for prefix, ttft, tps in (("", 0.0, 0.0), ("slow_", 0.2, 400.0)):
            people = {"conversations": conversations, "think": think, "seconds": seconds}
            tally, plain = await _scenario(env, ttft=ttft, tokens_per_sec=tps, **people)
            results.update(_figures(prefix, tally, plain))
        tally, _ = await _scenario(
            env,
            ttft=0.0,
            tokens_per_sec=0.0,
            conversations=64,
            think=0.0,
            seconds=min(seconds, 10.0),
            rounds=1,
            bare_too=False,
        )
        results["max_turns_per_s"] = tally.completed / tally.seconds
    report(
        results,
        as_json=as_json,
        title="libra bench text (overhead: first delta at the gateway minus the provider call; "
        "slow_: provider with 200 ms TTFT then 400 tokens/s; max: 64 conversations, no think time; "
        f"bare: the same chain in bare nats-py; {ROUNDS} windows of each, taking turns)",
    )
    return results


QUESTION = "What is an event log good for?"


async def _local_turn(log: EventLog, n: int) -> tuple[Generation, TurnAccepted]:
    """One turn on the embedded model: its times at the gateway, as a bare generation's are."""
    started = time.perf_counter()
    first = 0.0
    accepted: TurnAccepted | None = None
    async for event in converse(log, platform="bench", user=f"local-{n}", text=QUESTION):
        if isinstance(event, TurnAccepted):
            accepted = event
        elif isinstance(event, LlmDelta) and not first:
            first = time.perf_counter() - started
        elif isinstance(event, LlmCompleted) and accepted is not None:
            end = time.perf_counter() - started
            return Generation(first, first, end, event.text, event.completion_tokens), accepted
        elif isinstance(event, LlmFailed | TurnRejected):
            raise RuntimeError(f"turn {n} was not answered: {event}")
    raise RuntimeError(f"turn {n} ended without a reply")


async def run_bench_text_local(settings: Settings, *, turns: int, as_json: bool) -> dict:
    """Runs ``turns`` text turns on the embedded model, then the same prompts on bare llama-cpp."""
    plain: list[Generation] = []
    async with servers(settings, postgres=True, redis=True) as urls:
        await migrate(urls.database_url)
        env = local_env(
            os.environ,
            NATS_URL=urls.nats_url,
            DATABASE_URL=urls.database_url,
            REDIS_URL=urls.redis_url,
        )
        async with libra_processes(env, GROUPS):
            log = await EventLog.connect(urls.nats_url, name="bench-text-local-gateway")
            try:
                answered = [await _local_turn(log, n) for n in range(turns + 1)][1:]  # 1 warm-up
            finally:
                await log.close()
    libra = [generation for generation, _ in answered]
    llama = await asyncio.to_thread(BareLlama)
    for i, (_, turn) in enumerate([answered[0], *answered]):
        messages = await BareLlama.messages(turn)
        generation = await asyncio.to_thread(llama.generate, messages, whole=True)
        if i:  # the first one loads the model
            plain.append(generation)
    results = {
        "turns": turns,
        **_local_figures("", libra),
        **_local_figures("bare_", plain),
    }
    results["ttft_overhead_p50_ms"] = results["ttft_p50_ms"] - results["bare_ttft_p50_ms"]
    results["tokens_per_s_ratio"] = results["tokens_per_s_p50"] / results["bare_tokens_per_s_p50"]
    report(
        results,
        as_json=as_json,
        title="libra bench text --local (the embedded model, no account: first delta at the "
        "gateway and the stream's tokens/s; bare: llama-cpp directly, same prompts, same run)",
    )
    return results


def _local_figures(prefix: str, generations: list[Generation]) -> dict[str, float]:
    ttft = [g.first_token_s * 1000 for g in generations]
    return {
        f"{prefix}ttft_p50_ms": percentile(ttft, 50),
        f"{prefix}ttft_p99_ms": percentile(ttft, 99),
        f"{prefix}tokens_per_s_p50": median([g.tokens_per_s for g in generations]),
        f"{prefix}tokens_p50": median([g.tokens for g in generations]),
    }


async def _first_delta_ms(log: EventLog, n: int, text: str) -> float:
    """One turn's time from sending the message to the first delta at the gateway."""
    started = time.perf_counter()
    async for event in converse(log, platform="bench", user=f"moderated-{n}", text=text):
        if isinstance(event, LlmDelta):
            return (time.perf_counter() - started) * 1000
        if isinstance(event, LlmFailed | TurnRejected):
            raise RuntimeError(f"turn {n} was not answered: {event}")
    raise RuntimeError(f"turn {n} ended without a reply")


async def _first_deltas(env: dict[str, str], turns: int) -> list[float]:
    """``turns`` turns one after another (after 3 to warm up), on Libra run as in production."""
    async with libra_processes(env, GROUPS):
        log = await EventLog.connect(env["NATS_URL"], name="bench-text-moderation-gateway")
        try:
            times = [await _first_delta_ms(log, n, f"Question {n}?") for n in range(turns + 3)]
        finally:
            await log.close()
    return times[3:]


async def _classifier_ms(base_url: str, turns: int) -> list[float]:
    """The classifier's own time: the SDK's call to the same fake, from this process."""
    from libra.processors.moderation.openai import OpenAIModeration

    engine = OpenAIModeration(api_key="sk-bench", timeout=10, base_url=base_url)
    times = []
    try:
        for n in range(turns + 3):
            began = time.perf_counter()
            await engine.check(f"Question {n}?")
            times.append((time.perf_counter() - began) * 1000)
    finally:
        await engine.close()
    return times[3:]


async def run_bench_text_moderation(
    settings: Settings, *, turns: int, latency_s: float = 0.05, as_json: bool
) -> dict:
    """Moderation's added latency to the first delta: ``turns`` turns with the classifier off
    (the word list only), then on (OpenAI's endpoint on a loopback fake answering after
    ``latency_s``), beside the classifier's own time measured bare in the same run."""
    from libra.ops.fakes.llm_wire import Behaviour, FakeLlmWire

    async with (
        servers(settings, postgres=True, redis=True) as urls,
        FakeLlmWire(reply=Behaviour.ok(REPLY), moderation_latency=latency_s, record=False) as wire,
    ):
        await migrate(urls.database_url)
        base = f"{wire.url}/v1"
        env = {
            **{k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")},
            "NATS_URL": urls.nats_url,
            "DATABASE_URL": urls.database_url,
            "REDIS_URL": urls.redis_url,
            "LLM_CACHE_ENABLED": "0",
            "LOG_LEVEL": "WARNING",
            "RATE_LIMIT_TURNS": "1000000",
            "LLM_BASE_URL": base,
            "LLM_PROVIDERS": "",
        }
        off = await _first_deltas({**env, "MODERATION_ENGINES": "words"}, turns)
        classifier = {
            **env,
            "MODERATION_ENGINES": "openai",
            "OPENAI_API_KEY": "sk-bench",
            "OPENAI_BASE_URL": base,
        }
        # the input checked (admission), then the input and the reply's first sentence
        on = await _first_deltas({**classifier, "MODERATION_OUTPUT": "off"}, turns)
        both = await _first_deltas({**classifier, "MODERATION_OUTPUT": "on"}, turns)
        bare_ms = await _classifier_ms(base, turns)
    results: dict = {"turns": turns, "classifier_latency_ms": latency_s * 1000}
    for q in (50, 99):
        bare = percentile(bare_ms, q)
        results[f"first_delta_off_p{q}_ms"] = percentile(off, q)
        results[f"classifier_bare_p{q}_ms"] = bare
        for name, times in (("input", on), ("both", both)):
            added = percentile(times, q) - percentile(off, q)
            results[f"first_delta_{name}_p{q}_ms"] = percentile(times, q)
            results[f"added_{name}_p{q}_ms"] = added
            results[f"added_{name}_ratio_p{q}"] = added / bare
        # With the reply checked, a turn waits for two checks in series (the input, then the
        # reply's first sentence, which the model writes only once the input is admitted):
        # the classifier's own time on that path is two calls.
        results[f"added_both_per_check_ratio_p{q}"] = results[f"added_both_p{q}_ms"] / (2 * bare)
    report(
        results,
        as_json=as_json,
        title="libra bench text --moderation (added: first delta with the classifier on minus "
        "off, for the input alone and for the input and the reply; classifier_bare: the SDK's "
        "call to the same fake, same run; per_check: against the two calls a checked reply "
        "waits for; target ratio < 1.2)",
    )
    return results
