"""`libra bench log`: the event log's figures, each beside bare nats-py doing the same work.

- publish: events made, encoded and published with ids and headers, acks awaited in windows of
  1,000 (Libra's ``publish_many``) against ``js.publish_async`` of the same bytes and headers;
  on the real ``nats.conf`` (every write synced) and on a copy with JetStream's default sync.
- hop: publish an event, a consumer turns it into one output, the output is seen by a core
  subscriber; Libra's consumer runtime against a bare ``fetch(1)`` / publish / ack loop.
- project: the history projection folding events into Postgres, against bare ``executemany``
  of the same message rows into the same table, 500 a transaction, on the same server. The
  bare side only inserts rows built beforehand; Libra also pulls the events from NATS, decodes
  them, builds the rows, upserts ``conversations``, takes the projection's lock, moves its
  checkpoint and acks every event (``project_note`` in the output says so).
- replay: reading the log back and decoding every event, against nats-py's ordered consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import asyncpg
import nats
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NotFoundError

from libra.contracts import (
    ConsumerSpec,
    LlmCompleted,
    Origin,
    TextReceived,
    TurnAccepted,
    derive,
    encode_event,
    make,
    new_id,
)
from libra.projections.history import HistoryProjection
from libra.runtime.config import Settings
from libra.runtime.consumer import ConsumerRunner
from libra.runtime.database import connect_pool, migrate
from libra.runtime.eventlog import EventLog
from libra.runtime.projection import ProjectionRunner, read_log

from .common import median, percentile, report, servers

__all__ = ["run_bench_log"]

ORIGIN = Origin(platform="bench", channel="1")
WINDOW = 1000
TEXT = "How does an event-sourced bot remember what we talked about yesterday?"
# The bare side's statement: one row at a time, as ``executemany`` sends it.
INSERT_MESSAGE = (
    "INSERT INTO messages (event_id, conversation, user_id, turn, role, content, modality,"
    " provider, model, at, stream_seq) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
    " ON CONFLICT (event_id) DO NOTHING"
)
# The projection's rounds vary most (±20 % here, round to round): two more for its median.
PROJECT_EXTRA_ROUNDS = 2
PROJECT_NOTE = (
    "bare: executemany of prebuilt message rows; libra also pulls from NATS, decodes, builds"
    " the rows, upserts conversations, locks, checkpoints and acks"
)


def _said(conversation: str, i: int) -> TextReceived:
    return make(
        TextReceived, conversation=conversation, user=f"u{i % 50}", text=TEXT, origin=ORIGIN
    )


async def _publish_libra(log: EventLog, n: int, conversation: str) -> float:
    started = time.perf_counter()
    await log.publish_many((_said(conversation, i) for i in range(n)), window=WINDOW)
    return n / (time.perf_counter() - started)


async def _publish_bare(js, n: int, conversation: str) -> float:
    payload = encode_event(_said(conversation, 0))
    subject = f"libra.text.received.{conversation}"
    ids = [new_id() for _ in range(n)]
    started = time.perf_counter()
    pending = []
    for i in range(n):
        pending.append(await js.publish_async(subject, payload, headers={"Nats-Msg-Id": ids[i]}))
        if len(pending) >= WINDOW:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    return n / (time.perf_counter() - started)


async def _publish_figures(url: str, n: int, rounds: int) -> tuple[list[float], list[float]]:
    log = await EventLog.connect(url, name="bench-publish")
    await log.provision(Settings(), consumers=())
    bare_nc = await nats.connect(url)
    bare_js = bare_nc.jetstream(publish_async_max_pending=4000)
    libra, bare = [], []
    try:
        for _ in range(rounds):
            bare.append(await _publish_bare(bare_js, n, "bench-bare"))
            libra.append(await _publish_libra(log, n, "bench-libra"))
    finally:
        await bare_nc.close()
        await log.close()
    return libra, bare


class _Relay:
    """The smallest processor: one output per input."""

    spec = ConsumerSpec(name="bench-hop", subjects=("libra.text.received.bench-hop",))

    async def handle(self, event) -> AsyncIterator[TurnAccepted]:
        yield derive(event, TurnAccepted, key="turn", text=event.text, origin=event.origin)


async def _bare_relay(js, stop: asyncio.Event) -> None:
    psub = await js.pull_subscribe("libra.text.received.bench-bare", durable="bench-bare")
    while not stop.is_set():
        try:
            [msg] = await psub.fetch(1, timeout=1.0)
        except (TimeoutError, nats.errors.TimeoutError):
            continue  # nothing pending: normal for fetch()
        await js.publish(
            "libra.turn.accepted.bench-bare", msg.data, headers={"Nats-Msg-Id": new_id()}
        )
        await msg.ack()


async def _hops(publish, nc, out_subject: str, count: int) -> list[float]:
    arrived: asyncio.Queue[float] = asyncio.Queue()

    async def seen(_msg) -> None:
        arrived.put_nowait(time.perf_counter())

    sub = await nc.subscribe(out_subject, cb=seen)
    times = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            await publish()
            times.append((await asyncio.wait_for(arrived.get(), 10) - started) * 1000)
    finally:
        await sub.unsubscribe()
    return times


async def _hop_figures(url: str, count: int) -> tuple[list[float], list[float]]:
    log = await EventLog.connect(url, name="bench-hop")
    await log.provision(Settings(), consumers=())
    runner = ConsumerRunner(log, _Relay(), concurrency=64)
    runner_task = asyncio.create_task(runner.run())
    bare_nc = await nats.connect(url)
    bare_js = bare_nc.jetstream()
    stop = asyncio.Event()
    bare_task = asyncio.create_task(_bare_relay(bare_js, stop))
    observer = await nats.connect(url)

    async def libra_one() -> None:
        await log.publish(_said("bench-hop", 0))

    async def bare_one() -> None:
        await bare_js.publish(
            "libra.text.received.bench-bare",
            encode_event(_said("bench-bare", 0)),
            headers={"Nats-Msg-Id": new_id()},
        )

    libra, bare = [], []
    try:
        await _hops(libra_one, observer, "libra.turn.accepted.bench-hop", 50)  # warm up
        await _hops(bare_one, observer, "libra.turn.accepted.bench-bare", 50)
        chunk = 200
        for _ in range(max(1, count // chunk)):  # interleaved, so both see the same noise
            bare += await _hops(bare_one, observer, "libra.turn.accepted.bench-bare", chunk)
            libra += await _hops(libra_one, observer, "libra.turn.accepted.bench-hop", chunk)
    finally:
        stop.set()
        await runner.stop()
        await asyncio.gather(runner_task, bare_task, return_exceptions=True)
        await observer.close()
        await bare_nc.close()
        await log.close()
    return libra, bare


def _history_events(n: int) -> list:
    events = []
    for i in range(n // 2):
        said = _said(f"bench-{i % 100}", i)
        turn = derive(said, TurnAccepted, key="turn", text=TEXT, origin=ORIGIN, received_at=said.at)
        events.append(turn)  # history folds the admitted turn, not text.received
        events.append(
            derive(
                turn,
                LlmCompleted,
                key="c",
                text="An answer of moderate length.",
                provider="bench",
                model="m",
                origin=ORIGIN,
            )
        )
    return events


async def _project_figures(
    url: str, database_url: str, n: int, rounds: int
) -> tuple[list[float], list[float]]:
    await migrate(database_url)
    pool = await connect_pool(database_url, max_size=4)
    log = await EventLog.connect(url, name="bench-project")
    await log.provision(Settings(), consumers=())
    libra, bare = [], []

    async def bare_round() -> None:
        await pool.execute("TRUNCATE messages, conversations, projection_checkpoints")
        with_seq = [(i + 1, e) for i, e in enumerate(_history_events(n))]
        bare.append(await _bare_project(pool, with_seq))

    async def libra_round() -> None:
        await pool.execute("TRUNCATE messages, conversations, projection_checkpoints")
        with contextlib.suppress(NotFoundError):
            await log.js.delete_consumer("LIBRA", "history")
        await log.js.purge_stream("LIBRA")
        await log.publish_many(_history_events(n))
        libra.append(await _libra_project(log, pool, n))

    try:
        for i in range(rounds):  # taking turns to go first, so that neither always follows
            for side in (bare_round, libra_round) if i % 2 == 0 else (libra_round, bare_round):
                await side()
    finally:
        await log.close()
        await pool.close()
    return libra, bare


async def _libra_project(log: EventLog, pool: asyncpg.Pool, n: int) -> float:
    last_seq = (await log.js.stream_info("LIBRA")).state.last_seq
    runner = ProjectionRunner(log, pool, HistoryProjection(), batch_size=500)
    started = time.perf_counter()
    task = asyncio.create_task(runner.run())
    # Told by the runner when the last event is committed: asking Postgres every few
    # milliseconds took CPU from the projection being measured.
    await runner.settled(last_seq)
    elapsed = time.perf_counter() - started
    await runner.stop()
    await task
    count = await pool.fetchval("SELECT count(*) FROM messages")
    if count != n:
        raise RuntimeError(f"the projection wrote {count} of {n} messages")
    return n / elapsed


async def _bare_project(pool: asyncpg.Pool, events: list) -> float:
    rows = [
        (
            e.id,
            e.conversation,
            e.user,
            e.turn,
            "user" if isinstance(e, TurnAccepted) else "assistant",
            e.text,
            "text",
            None,
            None,
            e.at,
            seq,
        )
        for seq, e in events
    ]
    started = time.perf_counter()
    async with pool.acquire() as conn:
        for i in range(0, len(rows), 500):
            async with conn.transaction():
                await conn.executemany(INSERT_MESSAGE, rows[i : i + 500])
    return len(rows) / (time.perf_counter() - started)


async def _replay_figures(url: str, n: int, rounds: int) -> tuple[list[float], list[float]]:
    log = await EventLog.connect(url, name="bench-replay")
    await log.provision(Settings(), consumers=())
    await log.js.purge_stream("LIBRA")
    await log.publish_many(_said("bench-replay", i) for i in range(n))
    libra, bare = [], []
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            count = 0
            async for _recorded in read_log(log, ["libra.text.received.>"], stream="LIBRA"):
                count += 1
            libra.append(count / (time.perf_counter() - started))
            bare.append(await _bare_replay(log, n))
    finally:
        await log.close()
    return libra, bare


async def _bare_replay(log: EventLog, n: int) -> float:
    js = log.nc.jetstream()
    started = time.perf_counter()
    sub = await js.subscribe(
        "libra.text.received.>",
        stream="LIBRA",
        ordered_consumer=True,
        config=ConsumerConfig(ack_policy=AckPolicy.NONE),
    )
    for _ in range(n):
        await sub.next_msg(timeout=10)
    elapsed = time.perf_counter() - started
    await sub.unsubscribe()
    return n / elapsed


async def run_bench_log(
    settings: Settings, *, events: int, hops: int, as_json: bool, rounds: int = 3
) -> dict:
    """Runs every figure of the log benchmark and prints them."""
    async with servers(settings, postgres=True) as srv:
        pub, pub_bare = await _publish_figures(srv.nats_url, max(events // 4, 1000), rounds)
        nosync, nosync_bare = await _publish_figures(srv.nats_nosync_url, events, rounds)
        hop, hop_bare = await _hop_figures(srv.nats_nosync_url, hops)
        project, project_bare = await _project_figures(
            srv.nats_nosync_url, srv.database_url, events, rounds + PROJECT_EXTRA_ROUNDS
        )
        replay, replay_bare = await _replay_figures(srv.nats_nosync_url, events, rounds)
    results: dict = {
        "publish_per_s": median(pub),
        "publish_bare_per_s": median(pub_bare),
        "publish_ratio": median(pub) / median(pub_bare),
        "publish_nosync_per_s": median(nosync),
        "publish_nosync_bare_per_s": median(nosync_bare),
        "publish_nosync_ratio": median(nosync) / median(nosync_bare),
        "hop_p50_ms": percentile(hop, 50),
        "hop_p99_ms": percentile(hop, 99),
        "hop_bare_p50_ms": percentile(hop_bare, 50),
        "hop_bare_p99_ms": percentile(hop_bare, 99),
        "hop_p50_ratio": percentile(hop, 50) / percentile(hop_bare, 50),
        "hop_p99_ratio": percentile(hop, 99) / percentile(hop_bare, 99),
        "project_per_s": median(project),
        "project_bare_per_s": median(project_bare),
        "project_ratio": median(project) / median(project_bare),
        "project_note": PROJECT_NOTE,
        "replay_per_s": median(replay),
        "replay_bare_per_s": median(replay_bare),
        "events": events,
        "hops": len(hop),
        "rounds": rounds,
        "project_rounds": rounds + PROJECT_EXTRA_ROUNDS,
    }
    report(
        results, as_json=as_json, title="libra bench log (medians of rounds; hop latencies p50/p99)"
    )
    return results
