"""What the benchmarks share: servers in a temporary directory, statistics, reporting."""

from __future__ import annotations

import contextlib
import json
import statistics
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from libra.runtime.config import Settings

from ..embedded import EmbeddedNats, EmbeddedPostgres, EmbeddedRedis, free_port, nats_conf_path

__all__ = ["BenchServers", "percentile", "report", "servers"]


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
