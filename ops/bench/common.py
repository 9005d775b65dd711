"""What the benchmarks share: servers in a temporary directory, statistics, reporting."""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from libra.runtime.config import Settings

from ..embedded import EmbeddedNats, EmbeddedPostgres, EmbeddedRedis, free_port, nats_conf_path

__all__ = [
    "BenchServers",
    "fake_llm_provider",
    "libra_processes",
    "percentile",
    "report",
    "servers",
]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank; the benchmarks report p50 and p99."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class BenchServers:
    nats_url: str
    nats_nosync_url: str
    database_url: str
    redis_url: str


def _nosync_conf(folder: Path) -> Path:
    """The real nats.conf with JetStream's default sync (every 2 min) instead of ``always``."""
    text = nats_conf_path().read_text()
    assert "sync_interval: always" in text, "nats.conf no longer syncs every write"
    path = folder / "nats-nosync.conf"
    path.write_text(text.replace("sync_interval: always", "sync_interval: 2m"))
    return path


@contextlib.asynccontextmanager
async def servers(
    settings: Settings, *, postgres: bool = False, redis: bool = False
) -> AsyncIterator[BenchServers]:
    """Starts what the settings leave unset, in a temporary directory, with the real nats.conf."""
    with tempfile.TemporaryDirectory(prefix="libra-bench-") as tmp:
        folder = Path(tmp)
        started = []
        nats = None if settings.nats_url else EmbeddedNats(folder / "sync", port=free_port())
        nosync = EmbeddedNats(folder / "nosync", port=free_port(), config=_nosync_conf(folder))
        pg = (
            EmbeddedPostgres(folder, port=free_port())
            if postgres and not settings.database_url
            else None
        )
        rd = EmbeddedRedis(folder, port=free_port()) if redis and not settings.redis_url else None
        try:
            for server in (nats, nosync, pg, rd):
                if server is not None:
                    await server.start()
                    started.append(server)
            yield BenchServers(
                nats_url=settings.nats_url or nats.url,
                nats_nosync_url=nosync.url,
                database_url=settings.database_url or (pg.url if pg else ""),
                redis_url=settings.redis_url or (rd.url if rd else ""),
            )
        finally:
            for server in reversed(started):
                await server.stop()


def report(results: dict[str, float | int | str], *, as_json: bool, title: str) -> None:
    """Prints the figures: one JSON object with --json, else a readable table."""
    if as_json:
        print(json.dumps(results, sort_keys=True))
        return
    print(title)
    for key, value in results.items():
        shown = f"{value:,.2f}" if isinstance(value, float) else str(value)
        print(f"  {key:<32} {shown:>14}")


def _serve_fake_llm(port: int, text: str, ttft: float, tokens_per_sec: float, ready) -> None:
    from libra.ops.fakes.llm_wire import Behaviour, FakeLlmWire

    async def main() -> None:
        reply = Behaviour.ok(text, ttft=ttft, tokens_per_sec=tokens_per_sec)
        await FakeLlmWire(port=port, reply=reply, record=False).start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


@contextlib.contextmanager
def fake_llm_provider(
    text: str, *, ttft: float = 0.0, tokens_per_sec: float = 0.0
) -> Iterator[str]:
    """A loopback fake of the OpenAI wire in a process of its own; yields its /v1 base URL.

    Its own process, so that its CPU is not taken from the Libra process being measured.
    """
    port = free_port()
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(
        target=_serve_fake_llm, args=(port, text, ttft, tokens_per_sec, ready), daemon=True
    )
    proc.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("the fake provider did not start")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.join(5)


@contextlib.asynccontextmanager
async def libra_processes(
    env: dict[str, str], groups: Sequence[Sequence[str]]
) -> AsyncIterator[None]:
    """Runs each group of components as a `libra run` process, as production does; returns
    once every one says it is ready, and stops them (SIGTERM, they drain) at the end."""
    procs = []
    try:
        for names in groups:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "libra.ops", "run", *names],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
            )
        for proc in procs:
            line = await asyncio.to_thread(proc.stdout.readline)
            while line and "Libra is ready" not in line:
                line = await asyncio.to_thread(proc.stdout.readline)
            if not line:
                raise RuntimeError(f"`libra run` exited with {proc.wait()}")
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
