"""A 3-node NATS cluster carrying the log at 3 replicas: a server and an llm processor die in
the middle of the traffic, and every accepted turn is still answered exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from libra.contracts import (
    CONSUMERS,
    LlmCompleted,
    LlmFailed,
    Origin,
    TextReceived,
    TurnAccepted,
    make,
)
from libra.ops.embedded import EmbeddedNats, free_port, nats_conf_path
from libra.ops.fakes.llm_wire import Behaviour, FakeLlmWire
from libra.processors.llm.chain import ProviderChain
from libra.processors.llm.context import PromptBuilder
from libra.processors.llm.processor import LlmProcessor
from libra.processors.turns.admission import TurnsProcessor
from libra.processors.turns.ratelimit import RateLimiter
from libra.runtime.config import Settings
from libra.runtime.consumer import ConsumerRunner
from libra.runtime.eventlog import EventLog

from .helpers import eventually, stream_events

CLUSTER_CONF = Path(__file__).resolve().parent.parent / "ops" / "deploy" / "nats" / "cluster.conf"
TURNS = 90
# A crashed instance's messages come back after the ack wait: short, to keep the test short.
LLM = msgspec.structs.replace(CONSUMERS["llm"], ack_wait_s=4.0)


@contextlib.asynccontextmanager
async def cluster(folder: Path) -> AsyncIterator[list[EmbeddedNats]]:
    """Three nodes on loopback with the deployment's cluster.conf and the repository's users."""
    conf = folder / "conf"
    conf.mkdir()
    shutil.copy(nats_conf_path(), conf / "nats.conf")
    shutil.copy(CLUSTER_CONF, conf / "cluster.conf")
    routes = [free_port() for _ in range(3)]
    listed = ", ".join(f"nats-route://127.0.0.1:{port}" for port in routes)
    nodes: list[EmbeddedNats] = []
    for i, route in enumerate(routes):
        nodes.append(
            EmbeddedNats(
                folder / f"n{i}",
                port=free_port(),
                config=conf / "cluster.conf",
                name=f"n{i}",
                passwords=nodes[0].passwords if nodes else None,
                environment={
                    "LIBRA_NATS_CLUSTER_LISTEN": f"127.0.0.1:{route}",
                    "LIBRA_NATS_ROUTES": f"[{listed}]",
                },
            )
        )
    try:
        await asyncio.gather(*(node.start() for node in nodes))
        yield nodes
    finally:
        await asyncio.gather(*(node.stop() for node in nodes))


def _urls(nodes: list[EmbeddedNats], user: str) -> str:
    return ",".join(node.url_for(user) for node in nodes)


async def _provisioned(log: EventLog) -> bool:
    try:  # the cluster elects its JetStream meta leader first
        await log.provision(Settings(libra_stream_replicas=3), consumers=[LLM])
    except Exception:
        return False
    info = await log.js.stream_info("LIBRA")
    return info.config.num_replicas == 3 and len(info.cluster.replicas or []) == 2


async def _publish(log: EventLog, event: TextReceived) -> None:
    """Publishes until the cluster acks: during a leader election a publish may time out, and
    the same id again is dropped as a copy if the first one made it after all."""
    while True:
        try:
            await log.publish(event)
            return
        except Exception:
            await asyncio.sleep(0.2)


def _llm(log: EventLog, wire: FakeLlmWire) -> ConsumerRunner:
    settings = Settings.from_env(
        {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": wire.env()["OPENAI_BASE_URL"]}
    )
    processor = LlmProcessor(ProviderChain.from_settings(settings), PromptBuilder(None, None))
    processor.spec = LLM
    return ConsumerRunner(log, processor, concurrency=32)


def _redelivered() -> float:
    return REGISTRY.get_sample_value("libra_consumer_redelivered_total", {"consumer": "llm"}) or 0


async def _answered(admin: EventLog, n: int) -> bool:
    done = await stream_events(admin.js, "LIBRA", "libra.llm.>")
    return len({e.causation for e in done}) >= n


async def test_every_turn_completes_once_when_a_server_and_a_processor_die(
    tmp_path: Path, redis_url: str
) -> None:
    redelivered_before = _redelivered()
    redis = aioredis.from_url(redis_url)
    async with (
        cluster(tmp_path) as nodes,
        FakeLlmWire(reply=Behaviour.ok("An answer.", ttft=0.4)) as wire,
    ):
        admin = await EventLog.connect(_urls(nodes, "admin"), name="test-admin")
        await eventually(lambda: _provisioned(admin), timeout=30, every=0.5)
        logs = {
            name: await EventLog.connect(_urls(nodes, user), name=name)
            for name, user in (("turns", "turns"), ("llm-1", "llm"), ("llm-2", "llm"))
        }
        limiter = RateLimiter(redis, limit=1000, window_s=10)
        runners = {
            "turns": ConsumerRunner(logs["turns"], TurnsProcessor(redis, limiter)),
            "llm-1": _llm(logs["llm-1"], wire),
            "llm-2": _llm(logs["llm-2"], wire),
        }
        tasks = {name: asyncio.create_task(runner.run()) for name, runner in runners.items()}
        leader = (await admin.js.stream_info("LIBRA")).cluster.leader
        try:
            for i in range(TURNS):
                said = make(
                    TextReceived,
                    conversation=f"http-p{i % 30}",
                    user=f"p{i % 30}",
                    text=f"question {i}",
                    origin=Origin(platform="http"),
                )
                await _publish(admin, said)
                if i == TURNS // 3:  # mid-traffic: the log's leader and an llm instance die
                    next(node for node in nodes if node.name == leader).kill()
                    await logs["llm-1"].nc.close()  # gone without acking what it held
                    tasks["llm-1"].cancel()
                await asyncio.sleep(0.04)
            await eventually(lambda: _answered(admin, TURNS), timeout=40, every=0.5)
        finally:
            for name in ("turns", "llm-2"):
                await runners[name].stop()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            for log in logs.values():
                with contextlib.suppress(Exception):
                    await log.close()
        accepted = await stream_events(admin.js, "LIBRA", "libra.turn.>")
        replies = await stream_events(admin.js, "LIBRA", "libra.llm.>")
        assert (await admin.js.stream_info("LIBRA")).cluster.leader != leader
        await admin.close()
    await redis.aclose()

    assert len(accepted) == TURNS and all(isinstance(e, TurnAccepted) for e in accepted)
    assert not [e for e in replies if isinstance(e, LlmFailed)]
    completed = Counter(e.causation for e in replies if isinstance(e, LlmCompleted))
    assert set(completed) == {e.id for e in accepted}
    assert set(completed.values()) == {1}  # exactly once, each
    # What the dead instance held came back to the other one.
    assert _redelivered() > redelivered_before
