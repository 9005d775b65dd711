"""`libra replay`: recorded inputs run again through one processor, beside live traffic.

The inputs are read back from the log (an ephemeral consumer without acks, as projections
rebuild) and handed to the processor's ``handle()``, built from the current code and settings;
the live consumers never see them. What it produces goes to the stream ``LIBRA_REPLAY`` on
``replay.<run>.<domain>.<event>.<conversation>``: outside ``libra.>``, so no component and no
gateway (Discord included) reacts to it, while ``nats sub 'replay.>'`` shows it. State a
processor writes is kept apart too: the llm processor runs without the response cache (a replay
must ask the model again), and admission decides against an empty rate limit of its own in a
scratch Redis, in the recorded order per user, with the recorded times.

Outputs keep the ids the processor derives from its input, so a replayed output has the id of
the recorded one it stands for: ``--compare`` pairs them by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from libra.contracts import (
    LOG_STREAM,
    AnyEvent,
    Event,
    LlmDelta,
    encode_event,
    id_time,
    is_id,
    new_id,
    raw_user,
    safe_token,
    subject_of,
)
from libra.runtime.config import Settings, parse_duration
from libra.runtime.consumer import Processor
from libra.runtime.eventlog import EventLog
from libra.runtime.projection import Recorded, read_log

from .components import Resources, asr_processor, llm_processor, turns_processor
from .embedded import EmbeddedRedis, free_port
from .stack import resolve_urls

__all__ = [
    "REPLAYABLE",
    "REPLAY_STREAM",
    "ReplayResult",
    "ReplaySink",
    "Replayable",
    "Replayed",
    "Selection",
    "compare_lines",
    "ensure_replay_stream",
    "parse_moment",
    "recorded_outputs",
    "replay",
    "replay_events",
    "replay_stream_config",
    "selected",
]

REPLAY_STREAM = "LIBRA_REPLAY"
# Stream order follows event time up to the publishers' clock skew: past `until` plus this much,
# nothing more of the window can come.
_CLOCK_SKEW = timedelta(minutes=1)
_BEFORE_TURN = timedelta(seconds=5)


@dataclass(frozen=True)
class Replayable:
    """A processor that can be replayed: how to build it, and where its recorded outputs are."""

    build: Callable[[Resources], Awaitable[Processor]]
    outputs: tuple[str, ...]
    # Inputs with the same key run in recorded order (admission's rate limit is per user).
    lane: Callable[[AnyEvent], str] | None = None
    # Writes state that must not touch the live one: given a Redis of its own for the run.
    scratch_redis: bool = False


REPLAYABLE: dict[str, Replayable] = {
    "turns": Replayable(turns_processor, ("libra.turn.>",), lambda e: e.user, scratch_redis=True),
    "llm": Replayable(llm_processor, ("libra.llm.completed.>", "libra.llm.failed.>")),
    "asr": Replayable(asr_processor, ("libra.asr.transcribed.>",)),
}


def parse_moment(value: str, *, now: datetime | None = None) -> datetime:
    """Returns the UTC time that ``value`` names: ISO 8601, or how long ago (``90s``, ``2h``)."""
    try:
        return (now or datetime.now(UTC)) - timedelta(seconds=parse_duration(value))
    except ValueError:
        moment = datetime.fromisoformat(value)
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Selection:
    """Which recorded inputs to replay; every criterion given must hold."""

    turns: frozenset[str] = frozenset()
    conversation: str = ""
    user: str = ""  # "discord:123": that person; "123": that id on any platform
    subject: str = ""
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 0

    def __post_init__(self) -> None:
        unknown = [turn for turn in self.turns if not is_id(turn)]
        if unknown:
            raise ValueError(f"not turn ids: {', '.join(unknown)}")

    def filters(self, inputs: Iterable[str]) -> list[str]:
        """The consumer's filter subjects: the processor's inputs, narrowed where possible."""
        if self.subject:
            return [self.subject]
        if self.conversation:
            return [f"{s.rsplit('.', 1)[0]}.{self.conversation}" for s in inputs]
        return list(inputs)

    @property
    def start(self) -> datetime | None:
        """Where reading the log starts: ``since``, or just before the first turn named."""
        if self.turns:
            first = min(id_time(turn) for turn in self.turns) - _BEFORE_TURN
            return max(first, self.since) if self.since else first
        return self.since

    def matches(self, event: AnyEvent) -> bool:
        return (
            (not self.turns or event.turn in self.turns or event.id in self.turns)
            and (not self.user or self.user in (event.user, raw_user(event.user)))
            and (self.since is None or event.at >= self.since)
            and (self.until is None or event.at <= self.until)
        )

    def past(self, event: AnyEvent) -> bool:
        """Whether the log is past the window, so that reading can stop."""
        return self.until is not None and event.at > self.until + _CLOCK_SKEW


@dataclass
class Replayed:
    """One input and what the processor made of it this time."""

    seq: int
    input: AnyEvent
    outputs: list[Event] = field(default_factory=list)
    error: str = ""
    ms: float = 0.0


@dataclass
class ReplayResult:
    run: str
    inputs: int = 0
    outputs: int = 0
    errors: int = 0
    seconds: float = 0.0
    replayed: list[Replayed] = field(default_factory=list)

    @property
    def per_s(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0


def replay_stream_config(settings: Settings) -> StreamConfig:
    """Returns the config of ``LIBRA_REPLAY``: every replay's outputs, kept for a short while."""
    return StreamConfig(
        name=REPLAY_STREAM,
        description="Outputs of `libra replay` runs, on replay.<run>.>; never read by components",
        subjects=["replay.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=settings.libra_replay_max_age,
        duplicate_window=min(120.0, settings.libra_replay_max_age),
        num_replicas=settings.libra_stream_replicas,
    )


async def ensure_replay_stream(log: EventLog, settings: Settings) -> None:
    """Creates or updates ``LIBRA_REPLAY``; safe to repeat."""
    await log.ensure_stream(replay_stream_config(settings))


class ReplaySink:
    """Publishes a run's outputs under ``replay.<run>.``, acks awaited in windows."""

    def __init__(self, js: JetStreamContext, run: str, *, window: int = 1000) -> None:
        self.js, self.run, self.window = js, run, window
        self.prefix = f"replay.{run}."
        self._pending: list[asyncio.Future] = []

    def subject(self, event: Event) -> str:
        return self.prefix + subject_of(event).removeprefix("libra.")

    async def publish(self, event: Event) -> None:
        self._pending.append(
            await self.js.publish_async(
                self.subject(event),
                encode_event(event),
                # The event keeps its id (so that it pairs with the recorded output); the
                # message id has the run in it, or a second run would be dropped as a copy.
                headers={"Nats-Msg-Id": f"{self.run}.{event.id}"},
            )
        )
        if len(self._pending) >= self.window:
            await self.flush()

    async def flush(self) -> None:
        pending, self._pending = self._pending, []
        await asyncio.gather(*pending)


async def _handle(processor: Processor, item: Replayed, sink: ReplaySink | None) -> None:
    started = time.perf_counter()
    try:
        produced = processor.handle(item.input)
        if isinstance(produced, AsyncIterator):
            async for out in produced:
                item.outputs.append(out)
                if sink is not None:
                    await sink.publish(out)
        else:
            for out in await produced:
                item.outputs.append(out)
                if sink is not None:
                    await sink.publish(out)
    except Exception as exc:  # one input that fails is reported, and the run goes on
        item.error = f"{type(exc).__name__}: {exc}"
    item.ms = (time.perf_counter() - started) * 1000


async def replay_events(
    log: EventLog,
    processor: Processor,
    selection: Selection,
    *,
    run: str,
    sink: ReplaySink | None,
    concurrency: int = 8,
    lane: Callable[[AnyEvent], str] | None = None,
    keep: bool = False,
) -> ReplayResult:
    """Runs the selected inputs through ``processor`` with ``concurrency`` at once.

    Inputs in one ``lane`` run one after another in log order. ``keep`` keeps every input
    with its outputs in the result (for ``--compare``); otherwise only the counts.
    """
    result = ReplayResult(run=run)
    workers = max(1, concurrency)
    queues: list[asyncio.Queue[Replayed | None]] = [
        asyncio.Queue(maxsize=256) for _ in range(workers if lane else 1)
    ]

    async def work(queue: asyncio.Queue[Replayed | None]) -> None:
        while (item := await queue.get()) is not None:
            await _handle(processor, item, sink)
            result.outputs += len(item.outputs)
            result.errors += bool(item.error)
            if keep:
                result.replayed.append(item)

    tasks = [asyncio.create_task(work(queues[i % len(queues)])) for i in range(workers)]
    started = time.perf_counter()
    try:
        await _feed(log, processor, selection, queues, lane, result)
        for i in range(workers):
            await queues[i % len(queues)].put(None)
        await asyncio.gather(*tasks)
        if sink is not None:
            await sink.flush()
    finally:
        for task in tasks:
            task.cancel()
    result.seconds = time.perf_counter() - started
    result.replayed.sort(key=lambda item: item.seq)
    return result


async def _feed(
    log: EventLog,
    processor: Processor,
    selection: Selection,
    queues: list[asyncio.Queue[Replayed | None]],
    lane: Callable[[AnyEvent], str] | None,
    result: ReplayResult,
) -> None:
    async for seq, event in selected(log, selection, processor.spec.subjects):
        queue = queues[hash(lane(event)) % len(queues)] if lane else queues[0]
        await queue.put(Replayed(seq, event))
        result.inputs += 1


async def selected(
    log: EventLog, selection: Selection, inputs: Sequence[str]
) -> AsyncIterator[Recorded]:
    """Yields the recorded events on ``inputs`` that the selection picks, in log order."""
    checked = [_subject_matcher(s) for s in inputs] if selection.subject else []
    count = 0
    async for recorded in read_log(
        log, selection.filters(inputs), stream=LOG_STREAM, start_time=selection.start
    ):
        event = recorded.event
        if selection.past(event):
            return
        if not selection.matches(event):
            continue
        if checked and not any(match(subject_of(event)) for match in checked):
            continue  # --subject named something outside these inputs
        yield recorded
        count += 1
        if count == selection.limit:
            return


def _subject_matcher(pattern: str) -> Callable[[str], bool]:
    """Returns a test of whether a subject matches a NATS ``pattern`` (``*`` and ``>``)."""
    wanted = pattern.split(".")

    def match(subject: str) -> bool:
        tokens = subject.split(".")
        for i, token in enumerate(wanted):
            if token == ">":
                return len(tokens) > i
            if i >= len(tokens) or token not in ("*", tokens[i]):
                return False
        return len(tokens) == len(wanted)

    return match


async def recorded_outputs(
    log: EventLog, inputs: Sequence[AnyEvent], outputs: Iterable[str], *, conversation: str = ""
) -> dict[str, list[AnyEvent]]:
    """Returns the log's events on ``outputs`` caused by ``inputs``, by the input's id."""
    if not inputs:
        return {}
    wanted = {event.id for event in inputs}
    start = min(event.at for event in inputs) - _BEFORE_TURN
    found: dict[str, list[AnyEvent]] = {}
    subjects = Selection(conversation=conversation).filters(outputs)
    async for _, event in read_log(log, subjects, stream=LOG_STREAM, start_time=start):
        if event.causation in wanted:
            found.setdefault(event.causation, []).append(event)
    return found


def _tag(event: Event) -> str:
    return type(event).__struct_config__.tag


def _quote(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return f"«{text if len(text) <= width else text[: width - 1] + '…'}»"


def _text_change(old: str, new: str) -> str:
    if old == new:
        return "text the same"
    a, b = old.split(), new.split()
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    changes = [op for op in matcher.get_opcodes() if op[0] != "equal"]
    added = sum(j2 - j1 for _, _, _, j1, j2 in changes)
    removed = sum(i2 - i1 for _, i1, i2, _, _ in changes)
    return (
        f"text {matcher.ratio():.0%} alike (+{added} −{removed} words, {len(a)} → {len(b)}):"
        f" {_quote(old)} → {_quote(new)}"
    )


_FACTS = ("engine", "language", "modality", "reason", "error")


def _both(old: AnyEvent, new: Event, name: str) -> bool:
    return hasattr(old, name) and hasattr(new, name)


def _differences(old: AnyEvent, new: Event) -> list[str]:
    lines = [f"was {_tag(old)}"] if type(old) is not type(new) else []
    if _both(old, new, "text"):
        lines.append(_text_change(old.text, new.text))
    lines += [
        f"{name} {getattr(old, name)} → {getattr(new, name)}"
        for name in _FACTS
        if _both(old, new, name) and getattr(old, name) != getattr(new, name)
    ]
    if _both(old, new, "provider"):
        lines.append(f"model {old.provider}/{old.model} → {new.provider}/{new.model}")
        lines.append(
            f"tokens {old.prompt_tokens}+{old.completion_tokens}"
            f" → {new.prompt_tokens}+{new.completion_tokens}"
            f"   latency first {old.ttft_ms:.0f} → {new.ttft_ms:.0f} ms,"
            f" total {old.total_ms:.0f} → {new.total_ms:.0f} ms"
        )
    elif _both(old, new, "latency_ms"):
        lines.append(f"latency {old.latency_ms:.0f} → {new.latency_ms:.0f} ms")
    return lines


def compare_lines(item: Replayed, recorded: list[AnyEvent]) -> list[str]:
    """Says, for one input, what the replay produced against what the log recorded."""
    said = getattr(item.input, "text", "")
    lines = [
        f"{_tag(item.input)} {item.input.id}  {item.input.conversation}  {item.input.user or '-'}"
        + (f"  {_quote(said)}" if said else "")
    ]
    if item.error:
        lines.append(f"  replay failed after {item.ms:.0f} ms: {item.error}")
    now = {e.id: e for e in item.outputs if not isinstance(e, LlmDelta)}
    before = {e.id: e for e in recorded}
    for event_id in [*before, *(i for i in now if i not in before)]:
        old, new = before.get(event_id), now.get(event_id)
        if new is None:
            lines.append(f"  {_tag(old)}: recorded, not produced this time")
        elif old is None:
            lines.append(f"  {_tag(new)}: new this time, nothing recorded")
        else:
            first, *rest = _differences(old, new) or ["the same"]
            lines.append(f"  {_tag(new)}: {first}")
            lines.extend(f"    {line}" for line in rest)
    if not now and not before and not item.error:
        lines.append("  no outputs, then or now")
    return lines


@contextlib.asynccontextmanager
async def _scratch_redis() -> AsyncIterator[str]:
    """A Redis of the run's own, gone when it ends."""
    with tempfile.TemporaryDirectory(prefix="libra-replay-") as folder:
        server = EmbeddedRedis(Path(folder), port=free_port())
        await server.start()
        try:
            yield server.url
        finally:
            await server.stop()


async def replay(
    settings: Settings,
    name: str,
    selection: Selection,
    *,
    compare: bool = False,
    concurrency: int = 8,
    run: str = "",
    say: Callable[[str], None] = print,
) -> ReplayResult:
    """Replays the selected inputs through processor ``name``; says what happened."""
    target = REPLAYABLE[name]
    run = safe_token(run) if run else new_id()
    urls = resolve_urls(settings)
    log = await EventLog.connect(urls.nats_url, name="libra-replay")
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(log.close)
        redis_url = urls.redis_url
        if target.scratch_redis:
            redis_url = await stack.enter_async_context(_scratch_redis())
        quiet = msgspec.structs.replace(settings, llm_cache_enabled=False)
        resources = Resources(quiet, log, urls.database_url, redis_url)
        stack.push_async_callback(resources.close)
        processor = await target.build(resources)
        await ensure_replay_stream(log, settings)
        result = await replay_events(
            log,
            processor,
            selection,
            run=run,
            sink=ReplaySink(log.js, run),
            concurrency=concurrency,
            lane=target.lane,
            keep=compare,
        )
        if compare:
            inputs = [item.input for item in result.replayed]
            recorded = await recorded_outputs(
                log, inputs, target.outputs, conversation=selection.conversation
            )
            for item in result.replayed:
                for line in compare_lines(item, recorded.get(item.input.id, [])):
                    say(line)
    say(
        f"replayed {result.inputs} input(s) through {name} in {result.seconds:.2f} s"
        f" ({result.per_s:,.1f}/s): {result.outputs} output(s) on replay.{run}.>"
        f" in {REPLAY_STREAM}, {result.errors} error(s)"
    )
    return result
