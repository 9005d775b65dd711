"""The bare chain that the benchmarks set beside Libra: the same hops in bare nats-py.

``text.received`` published (synced, acked) → an admission worker pulls it and publishes
``turn.accepted`` (synced) → an llm worker pulls that, waits the provider's first-token time,
publishes the deltas (memory stream) at the provider's pace, then ``llm.completed`` (synced).
The streams are set as Libra's: file storage for the log (the real ``nats.conf`` syncs every
write), memory storage for deltas, a 2-minute duplicate window, explicit acks, ids in
``Nats-Msg-Id``. Payloads are JSON padded to the sizes Libra's events had in the same run. Each
worker is a process of its own, as Libra's components are, and imports nothing of Libra: run as
``python -m libra.ops.bench.bare ROLE NATS_URL SHAPE_JSON`` (ROLE: admission, llm, observe,
gateway). For Discord the gateway hops are there too: a gateway worker takes each message from a
core subject (the gateway's websocket), publishes its ``text.received`` and follows the turn as
Libra's gateway does, posts the reply to the loopback Discord's REST API on the first delta and
edits it with the whole reply at ``llm.completed``.

The observer records, for both chains, when it saw each turn's ``text.received``, first delta
and ``llm.completed`` (with the provider's TTFT), so that the two overheads are measured alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import aiohttp
import nats
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

__all__ = ["BareTurn", "Shape", "bare_converse", "chain", "provision", "worker_command"]

LOG, LIVE = "BARE", "BARE_LIVE"
CONCURRENCY = 256  # as Libra's turns and llm consumers


@dataclass(frozen=True)
class Shape:
    """What a turn of the bare chain looks like: payload sizes, deltas and provider pacing."""

    received_bytes: int = 400
    accepted_bytes: int = 450
    delta_bytes: int = 300
    completed_bytes: int = 900
    deltas: int = 5
    ttft_s: float = 0.0
    stream_s: float = 0.0  # first delta to the last

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def payload(turn: str, size: int, **fields: object) -> bytes:
    """A JSON object with the turn's id, padded to ``size`` bytes."""
    body = json.dumps({"turn": turn, **fields, "pad": ""}).encode()
    return body[:-2] + b"x" * max(0, size - len(body)) + b'"}'


async def provision(js) -> None:
    """Creates the bare chain's streams and consumers (as Libra's are configured)."""
    common = dict(retention=RetentionPolicy.LIMITS, discard=DiscardPolicy.OLD)
    await js.add_stream(
        StreamConfig(
            name=LOG,
            subjects=["bare.text.>", "bare.turn.>", "bare.llm.completed.>"],
            storage=StorageType.FILE,
            duplicate_window=120.0,
            **common,
        )
    )
    await js.add_stream(
        StreamConfig(
            name=LIVE,
            subjects=["bare.llm.delta.>"],
            storage=StorageType.MEMORY,
            max_age=300.0,
            duplicate_window=120.0,
            **common,
        )
    )
    for name, subject, ack_wait, max_deliver in (
        ("bare-admission", "bare.text.received.>", 10.0, 5),
        ("bare-llm", "bare.turn.accepted.>", 30.0, 3),
    ):
        await js.add_consumer(
            LOG,
            ConsumerConfig(
                durable_name=name,
                filter_subject=subject,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=ack_wait,
                max_deliver=max_deliver,
                max_ack_pending=1024,
                max_waiting=512,
            ),
        )


def worker_command(role: str, url: str, shape: Shape, *extra: str) -> list[str]:
    return [sys.executable, "-m", "libra.ops.bench.bare", role, url, shape.to_json(), *extra]


async def _pull(js, durable: str, handle) -> None:
    """Fetches in batches and handles up to CONCURRENCY messages at once, until cancelled."""
    sub = await js.pull_subscribe_bind(durable, LOG)
    slots = asyncio.Semaphore(CONCURRENCY)
    tasks: set[asyncio.Task] = set()

    async def one(msg) -> None:
        try:
            await handle(msg)
        finally:
            slots.release()

    while True:
        try:
            msgs = await sub.fetch(64, timeout=1.0)
        except (TimeoutError, nats.errors.TimeoutError):
            continue
        for msg in msgs:
            await slots.acquire()
            task = asyncio.create_task(one(msg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)


async def _admission(js, shape: Shape) -> None:
    async def handle(msg) -> None:
        turn = json.loads(msg.data)["turn"]
        conversation = msg.subject.rsplit(".", 1)[1]
        await js.publish(
            f"bare.turn.accepted.{conversation}",
            payload(turn, shape.accepted_bytes),
            headers={"Nats-Msg-Id": f"{turn}/accepted"},
        )
        await msg.ack()

    await _pull(js, "bare-admission", handle)


async def _llm(js, shape: Shape) -> None:
    gap = shape.stream_s / max(1, shape.deltas - 1)

    async def handle(msg) -> None:
        turn = json.loads(msg.data)["turn"]
        conversation = msg.subject.rsplit(".", 1)[1]
        asked = time.perf_counter()
        await asyncio.sleep(shape.ttft_s)  # the provider's first token
        ttft_ms = (time.perf_counter() - asked) * 1000
        for index in range(shape.deltas):
            if index:
                await asyncio.sleep(gap)
            await js.publish(
                f"bare.llm.delta.{conversation}",
                payload(turn, shape.delta_bytes, index=index),
                headers={"Nats-Msg-Id": f"{turn}/delta/{index}"},
            )
        await js.publish(
            f"bare.llm.completed.{conversation}",
            payload(turn, shape.completed_bytes, ttft_ms=ttft_ms),
            headers={"Nats-Msg-Id": f"{turn}/completed"},
        )
        await msg.ack()

    await _pull(js, "bare-llm", handle)


class _Observed:
    """Per turn, which chain it is on and when each event was seen (perf_counter s)."""

    def __init__(self) -> None:
        self.turns: dict[str, dict] = {}

    def seen(self, msg) -> None:
        now = time.perf_counter()
        prefix, _domain, kind, _conversation = msg.subject.split(".", 3)
        data = json.loads(msg.data)
        turn = self.turns.setdefault(data["turn"], {"chain": prefix})
        if kind == "delta":
            if data.get("index") == 0:
                turn["delta_at"] = now
        else:
            turn.setdefault(f"{kind}_at", now)
        if kind == "completed":
            turn["ttft_ms"] = data.get("ttft_ms") or 0.0


async def _observe(url: str) -> dict[str, dict]:
    """Records every turn of both chains until SIGTERM; returns them by turn id."""
    observed = _Observed()

    async def seen(msg) -> None:
        with contextlib.suppress(ValueError, KeyError):
            observed.seen(msg)

    nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.5)
    for prefix in ("libra", "bare"):
        for subject in ("text.received", "turn.accepted", "llm.delta", "llm.completed"):
            await nc.subscribe(f"{prefix}.{subject}.>", cb=seen)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("observing", flush=True)
    await stop.wait()
    await nc.close()
    return observed.turns


class BareTurn(NamedTuple):
    """One bare turn's times (ms) from its start, as the bench times Libra's stages."""

    published_ms: float  # ``text.received`` acked
    accepted_ms: float  # ``turn.accepted`` seen
    first_ms: float  # the first delta seen
    ttft_ms: float  # the provider's part, as the llm worker measured it


async def bare_converse(nc, js, conversation: str, turn: str, shape: Shape) -> BareTurn:
    """Publishes a bare ``text.received`` and follows its turn as Libra's ``converse`` does (one
    core subscription per domain, filtered by turn)."""
    done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    seen_at: dict[str, float] = {}
    marker = f'"turn": "{turn}"'.encode()

    async def seen(msg) -> None:
        if marker not in msg.data:
            return
        kind = msg.subject.split(".", 3)[2]
        seen_at.setdefault(kind, time.perf_counter())
        if kind == "completed" and not done.done():
            done.set_result(json.loads(msg.data)["ttft_ms"])

    # timed from before subscribing, as Libra's turn is from before ``converse`` subscribes
    started = time.perf_counter()
    subs = [
        await nc.subscribe(f"bare.{domain}.*.{conversation}", cb=seen) for domain in ("turn", "llm")
    ]
    try:
        await js.publish(
            f"bare.text.received.{conversation}",
            payload(turn, shape.received_bytes),
            headers={"Nats-Msg-Id": turn},
        )
        published = time.perf_counter()
        ttft_ms = await asyncio.wait_for(done, 60)

        def since(at: float | None) -> float:
            return (at - started) * 1000 if at is not None else float("nan")

        return BareTurn(
            since(published), since(seen_at.get("accepted")), since(seen_at.get("delta")), ttft_ms
        )
    finally:
        for sub in subs:
            await sub.unsubscribe()


@contextlib.asynccontextmanager
async def chain(
    url: str, shape: Shape, *, discord: tuple[str, str] | None = None
) -> AsyncIterator[nats.NATS]:
    """The bare chain's streams and workers, warmed as the Libra run was (a few turns one by
    one, then a burst); yields a connection to drive it with :func:`bare_converse`. With
    ``discord`` (REST URL, bot token), a gateway worker too."""
    nc = await nats.connect(url)
    await provision(nc.jetstream())
    commands = [worker_command(role, url, shape) for role in ("admission", "llm")]
    if discord is not None:
        commands.append(worker_command("gateway", url, shape, *discord))
    workers = [subprocess.Popen(c, stdout=subprocess.PIPE, text=True) for c in commands]
    try:
        for worker in workers:
            await asyncio.to_thread(worker.stdout.readline)  # "ready"
        js = nc.jetstream()
        for i in range(10):
            await bare_converse(nc, js, f"bare-warm-{i}", f"warm-{time.time_ns()}", shape)
        await asyncio.gather(
            *(
                bare_converse(nc, js, f"bare-warm-{i}", f"warm-{i}-{time.time_ns()}", shape)
                for i in range(32)
            )
        )
        yield nc
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            await asyncio.to_thread(worker.wait, 30)
        await nc.close()


async def _reply(nc, js, http: aiohttp.ClientSession, rest_url: str, shape: Shape, msg) -> None:
    """One Discord message: its ``text.received`` published, the reply posted and edited."""
    said = json.loads(msg.data)
    turn, channel, conversation = said["turn"], said["channel"], msg.subject.rsplit(".", 1)[1]
    marker = f'"turn": "{turn}"'.encode()
    first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def seen(reply) -> None:
        if marker in reply.data:
            for future, kind in ((first, ".delta."), (done, ".completed.")):
                if kind in reply.subject and not future.done():
                    future.set_result(None)

    subs = [await nc.subscribe(f"bare.{d}.*.{conversation}", cb=seen) for d in ("turn", "llm")]
    try:
        await js.publish(
            f"bare.text.received.{conversation}",
            payload(turn, shape.received_bytes),
            headers={"Nats-Msg-Id": turn},
        )
        await asyncio.wait_for(first, 60)
        body = {"content": "A reply.", "message_reference": {"message_id": said["message"]}}
        async with http.post(f"{rest_url}/channels/{channel}/messages", json=body) as posted:
            message = (await posted.json())["id"]
        await asyncio.wait_for(done, 60)
        url = f"{rest_url}/channels/{channel}/messages/{message}"
        async with http.patch(url, json={"content": "A reply, whole."}):
            pass
    finally:
        for sub in subs:
            await sub.unsubscribe()


async def _gateway(nc, js, shape: Shape, rest_url: str, token: str) -> None:
    tasks: set[asyncio.Task] = set()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bot {token}"}) as http:

        async def arrived(msg) -> None:
            task = asyncio.create_task(_reply(nc, js, http, rest_url, shape, msg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        await nc.subscribe("bare.discord.in.>", cb=arrived)
        await nc.flush()
        print("ready", flush=True)  # after subscribing: a core subject keeps nothing
        await asyncio.Event().wait()


async def _work(role: str, url: str, shape: Shape, *extra: str) -> None:
    nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.5)
    js = nc.jetstream()
    if role == "gateway":
        await _gateway(nc, js, shape, *extra)
        return
    print("ready", flush=True)
    await {"admission": _admission, "llm": _llm}[role](js, shape)


if __name__ == "__main__":
    role, url, shape, *extra = sys.argv[1:]
    with contextlib.suppress(KeyboardInterrupt):
        if role == "observe":
            Path(extra[0]).write_text(json.dumps(asyncio.run(_observe(url))))
        else:
            asyncio.run(_work(role, url, Shape(**json.loads(shape)), *extra))
