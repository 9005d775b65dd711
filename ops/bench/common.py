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
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from libra.contracts import (
    LIVE_STREAM,
    LOG_STREAM,
    LlmCompleted,
    LlmDelta,
    TextReceived,
    TurnAccepted,
    encode_event,
)
from libra.runtime.config import Settings
from libra.runtime.eventlog import EventLog
from libra.runtime.projection import read_log

from ..embedded import (
    EmbeddedNats,
    EmbeddedPostgres,
    EmbeddedRedis,
    _stop_process,
    _tail,
    free_port,
    nats_conf_path,
)
from .bare import Shape

__all__ = [
    "BenchServers",
    "LibraProcess",
    "bare_shape",
    "consumers_settled",
    "cpu_by_role",
    "cpu_ms_per_turn",
    "cpu_seconds",
    "cpu_spent",
    "fake_llm_provider",
    "libra_processes",
    "percentile",
    "report",
    "rss_mb",
    "servers",
    "stream_seqs",
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
    folder: Path
    # the embedded servers by name (nats, postgres, redis), for benchmarks that stop one
    embedded: dict[str, EmbeddedNats | EmbeddedPostgres | EmbeddedRedis] = field(
        default_factory=dict
    )


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
                folder=folder,
                embedded={
                    name: server
                    for name, server in (("nats", nats), ("postgres", pg), ("redis", rd))
                    if server is not None
                },
            )
        finally:
            for server in reversed(started):
                await server.stop()


def report(results: dict[str, Any], *, as_json: bool, title: str) -> None:
    """Prints the figures: one JSON object with --json, else a readable table."""
    if as_json:
        print(json.dumps(results, sort_keys=True))
        return
    print(title)
    for key, value in _flat(results):
        shown = f"{value:,.2f}" if isinstance(value, float) else str(value)
        print(f"  {key:<40} {shown:>14}")


def _flat(results: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested figures as dotted names, for the table."""
    rows: list[tuple[str, Any]] = []
    for key, value in results.items():
        if isinstance(value, dict):
            rows.extend(_flat(value, f"{prefix}{key}."))
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


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
) -> AsyncIterator[list[subprocess.Popen]]:
    """Runs each group of components as a `libra run` process, as production does; returns
    once every one says it is ready (the processes, in the groups' order), and stops them
    (SIGTERM, they drain) at the end."""
    procs: list[subprocess.Popen] = []
    with contextlib.ExitStack() as files:
        # what each process says on stderr, shown if it fails to start
        errors = [files.enter_context(tempfile.TemporaryFile()) for _ in groups]
        try:
            for names, stderr in zip(groups, errors, strict=True):
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "libra.ops", "run", *names],
                        env=env,
                        stdout=subprocess.PIPE,
                        stderr=stderr,
                        text=True,
                    )
                )
            for names, proc, stderr in zip(groups, procs, errors, strict=True):
                line = await asyncio.to_thread(proc.stdout.readline)
                while line and "Libra is ready" not in line:
                    line = await asyncio.to_thread(proc.stdout.readline)
                if not line:
                    stderr.seek(0)
                    said = stderr.read().decode(errors="replace")[-3000:]
                    raise RuntimeError(
                        f"`libra run {' '.join(names)}` exited with {proc.wait()}:\n{said}"
                    )
            yield procs
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(30)


def _cpu_times(procs: Iterable[psutil.Process]) -> dict[int, float]:
    """Each process's CPU time (user + system) by pid; one gone meanwhile is left out."""
    taken: dict[int, float] = {}
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        taken[proc.pid] = times.user + times.system
    return taken


def cpu_seconds(pids: Mapping[str, int]) -> dict[str, dict[int, float]]:
    """Each named process's CPU time (user + system) and its descendants', by pid."""
    taken: dict[str, dict[int, float]] = {}
    for name, pid in pids.items():
        try:
            root = psutil.Process(pid)
            family = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        taken[name] = _cpu_times(family)
    return taken


def cpu_spent(
    before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]
) -> dict[str, float]:
    """Seconds of CPU each named process family took between two :func:`cpu_seconds`."""
    return {
        name: sum(t - before.get(name, {}).get(pid, 0.0) for pid, t in now.items())
        for name, now in after.items()
    }


def cpu_by_role() -> dict[str, dict[int, float]]:
    """As :func:`cpu_seconds`, for this process and all it started, named by what each is:
    ``gateway`` (this process), ``nats``, ``postgres``, ``redis``, ``libra run NAMES``, ``bare
    ROLE`` (a bare chain's worker), ``provider (fake)``. :func:`cpu_spent` between two says
    where a window's CPU went, the servers' included."""
    me = psutil.Process()
    roles: dict[str, list[psutil.Process]] = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            role = "gateway" if proc.pid == me.pid else _role(proc.name(), proc.cmdline())
        except psutil.Error:  # gone meanwhile
            continue
        roles.setdefault(role, []).append(proc)
    return {role: _cpu_times(procs) for role, procs in roles.items()}


def _role(name: str, cmdline: list[str]) -> str:
    for server in ("nats", "postgres", "redis"):
        if name.startswith(server):
            return server
    if "libra.ops" in cmdline and "run" in cmdline:
        return "libra run " + " ".join(cmdline[cmdline.index("run") + 1 :])
    if "libra.ops.bench.bare" in cmdline:
        return f"bare {cmdline[cmdline.index('libra.ops.bench.bare') + 1]}"
    if any("multiprocessing" in part for part in cmdline):
        return "provider (fake)"
    return name


def cpu_ms_per_turn(spent: Mapping[str, float], turns: int) -> dict[str, float]:
    """Milliseconds of CPU per turn by role, from seconds spent (:func:`cpu_spent`), and their
    total first."""
    per_turn = {role: seconds * 1000 / max(1, turns) for role, seconds in spent.items()}
    return {
        "total": sum(per_turn.values()),
        **dict(sorted(per_turn.items(), key=lambda kv: -kv[1])),
    }


async def consumers_settled(
    log: EventLog, names: Iterable[str], *, timeout: float = 120.0, every_s: float = 0.05
) -> float:
    """Seconds until the named consumers have nothing pending or unacknowledged (``timeout``
    at most); a server coming back meanwhile is waited for."""
    running = set(names)
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        with contextlib.suppress(Exception):  # the server may still be coming back
            infos = [
                info
                for stream in (LOG_STREAM, LIVE_STREAM)
                for info in await log.js.consumers_info(stream)
                if info.config.durable_name in running
            ]
            if all(i.num_pending == 0 and i.num_ack_pending == 0 for i in infos):
                return time.monotonic() - began
        await asyncio.sleep(every_s)
    return float(timeout)


def rss_mb(pid: int) -> float:
    """A process's resident memory in MiB (Linux; NaN where /proc is not there)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class LibraProcess:
    """One ``libra run NAMES`` process, its output in a file: started, killed, started again."""

    def __init__(self, names: Sequence[str], env: dict[str, str], folder: Path) -> None:
        self.names = list(names)
        self.env = env
        self.output = folder / f"{'+'.join(self.names)}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout: float = 120.0) -> None:
        """Starts it and returns once it says it is ready."""
        with self.output.open("ab") as out:
            start_at = out.tell()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "libra.ops", "run", *self.names],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while b"Libra is ready" not in self.output.read_bytes()[start_at:]:
            if self.proc.poll() is not None or loop.time() > deadline:
                tail = _tail(self.output, 40)
                raise RuntimeError(f"`libra run {' '.join(self.names)}` did not start:\n{tail}")
            await asyncio.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    async def stop(self) -> None:
        """SIGTERM (it drains its in-flight work), then SIGKILL after 30 s."""
        await _stop_process(self.proc, timeout=30.0)


async def stream_seqs(log: EventLog) -> dict[str, int]:
    """The last sequence of the log and of the live stream: where a calibration starts."""
    return {s: (await log.js.stream_info(s)).state.last_seq for s in (LOG_STREAM, LIVE_STREAM)}


async def bare_shape(log: EventLog, since: dict[str, int], *, ttft_s: float) -> Shape:
    """The bare chain's payload sizes, deltas and pacing, as Libra's turns had them after
    ``since`` (from :func:`stream_seqs`)."""
    sizes: dict[type, list[int]] = {}
    completed: list[LlmCompleted] = []
    for stream, subjects in (
        (LOG_STREAM, ["libra.text.received.>", "libra.turn.accepted.>", "libra.llm.completed.>"]),
        (LIVE_STREAM, ["libra.llm.delta.>"]),
    ):
        async for _, event in read_log(log, subjects, stream=stream, start_seq=since[stream] + 1):
            sizes.setdefault(type(event), []).append(len(encode_event(event)))
            if isinstance(event, LlmCompleted) and event.first_delta_at is not None:
                completed.append(event)

    def size(kind: type) -> int:
        return int(median(sizes.get(kind, [400])))

    return Shape(
        received_bytes=size(TextReceived),
        accepted_bytes=size(TurnAccepted),
        delta_bytes=size(LlmDelta),
        completed_bytes=size(LlmCompleted),
        deltas=int(median([c.deltas for c in completed] or [1])),
        ttft_s=ttft_s,
        stream_s=median([(c.at - c.first_delta_at).total_seconds() for c in completed] or [0.0]),
    )
