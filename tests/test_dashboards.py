"""Grafana's dashboards: every SQL panel runs against projections filled by real events, and
every Prometheus panel names metrics that the components export."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import REGISTRY

from libra.contracts import (
    AsrTranscribed,
    AudioRef,
    LlmCompleted,
    Origin,
    ReplyDelivered,
    TtsSynthesized,
    TurnAccepted,
    VoiceCaptured,
    derive,
    make,
)
from libra.ops.eval.prices import store_prices
from libra.ops.fakes.llm_wire import OPENAI_CHAT, Behaviour, FakeLlmWire
from libra.runtime.config import Settings
from libra.runtime.eventlog import EventLog

from .helpers import eventually, stream_events, wait_http
from .stack import TEXT_PIPELINE, running

GRAFANA = Path(__file__).resolve().parent.parent / "ops" / "deploy" / "grafana"
BOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
DISCORD = Origin(platform="discord", guild="7", channel="8")
AUDIO = AudioRef(name="utt/x", format="pcm_s16le", sample_rate=16000, duration_ms=900, size=28800)


def _panels() -> list[tuple[str, dict]]:
    return [
        (path.name, panel) for path in BOARDS for panel in json.loads(path.read_text())["panels"]
    ]


def _sql_panels() -> list[tuple[str, dict]]:
    return [(name, p) for name, p in _panels() if p["datasource"]["uid"] == "libra-postgres"]


def _prom_panels() -> list[tuple[str, dict]]:
    return [(name, p) for name, p in _panels() if p["datasource"]["uid"] == "libra-prometheus"]


_INTERVAL = re.compile(r"^'?(\d+)([smhd])'?$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(interval: str) -> int:
    match = _INTERVAL.match(interval.strip())
    assert match, f"an interval Grafana understands: {interval!r}"
    return int(match.group(1)) * _SECONDS[match.group(2)]


def expand_macros(sql: str, start: datetime, end: datetime) -> str:
    """Expands Grafana's PostgreSQL macros as Grafana does; any other macro fails the test."""

    def time_filter(m: re.Match) -> str:
        return f"{m.group(1)} BETWEEN '{start.isoformat()}' AND '{end.isoformat()}'"

    def time_group(m: re.Match) -> str:
        column, interval = (part.strip() for part in m.group(2).split(",", 1))
        n = _seconds(interval)
        grouped = f"floor(extract(epoch from {column})/{n})*{n}"
        return f'{grouped} AS "time"' if m.group(1) == "Alias" else grouped

    sql = re.sub(r"\$__timeFilter\(([^)]+)\)", time_filter, sql)
    sql = re.sub(r"\$__timeGroup(Alias)?\(([^)]+)\)", time_group, sql)
    assert "$" not in sql, f"a macro or variable the test does not know: {sql}"
    return sql


def test_the_four_dashboards_are_there_and_well_formed() -> None:
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "libra.yml").read_text())
    uids = {source["uid"]: source["type"] for source in sources["datasources"]}
    titles = set()
    for path in BOARDS:
        board = json.loads(path.read_text())
        titles.add(board["title"])
        ids = [panel["id"] for panel in board["panels"]]
        assert len(ids) == len(set(ids)), path.name
        for panel in board["panels"]:
            assert uids[panel["datasource"]["uid"]] == panel["datasource"]["type"]
            assert panel["targets"] and all(
                t["datasource"] == panel["datasource"] for t in panel["targets"]
            )
    assert titles == {
        "Libra — System Overview",
        "Libra — API Performance",
        "Libra — LLM Usage",
        "Libra — Voice Pipeline",
    }
    assert expand_macros(
        "SELECT $__timeGroupAlias(at, '5m') WHERE $__timeFilter(at)",
        datetime(2025, 1, 1, tzinfo=UTC),
        datetime(2025, 1, 2, tzinfo=UTC),
    ) == (
        'SELECT floor(extract(epoch from at)/300)*300 AS "time" WHERE at BETWEEN'
        " '2025-01-01T00:00:00+00:00' AND '2025-01-02T00:00:00+00:00'"
    )


def _settings(settings: Settings, wire: FakeLlmWire, port: int) -> Settings:
    return Settings.from_env(
        {
            "NATS_URL": settings.nats_url,
            "DATABASE_URL": settings.database_url,
            "REDIS_URL": settings.redis_url,
            "OPENAI_API_KEY": "sk-test-key",
            "OPENAI_BASE_URL": wire.env()["OPENAI_BASE_URL"],
            "LLM_RETRIES": "0",
            "LLM_CACHE_ENABLED": "0",
            "RATE_LIMIT_TURNS": "3",
            "HTTP_PORT": str(port),
        }
    )


async def _speak(log: EventLog, n: int) -> None:
    """A spoken turn as the voice gateway and the asr processor write it; turns and llm do
    the rest, then the tts and the gateway finish it."""
    now = datetime.now(UTC)
    captured = make(
        VoiceCaptured,
        conversation="discord-7-8",
        user=f"speaker{n}",
        audio=AUDIO,
        origin=DISCORD,
        speech_ended_at=now - timedelta(milliseconds=30),
    )
    await log.publish(captured)
    heard = derive(
        captured,
        AsrTranscribed,
        key="asr",
        text=f"What time is it, number {n}?",
        language="en",
        confidence=0.9,
        engine="whisper",
        audio_ms=900,
        latency_ms=180.0 + n,
        origin=DISCORD,
    )
    await log.publish(heard)

    async def answered() -> list[TurnAccepted]:
        done = await stream_events(log.js, "LIBRA", "libra.llm.completed.discord-7-8")
        return [e for e in done if isinstance(e, LlmCompleted) and e.turn == captured.id]

    await eventually(answered, timeout=20)
    [accepted] = [
        e
        for e in await stream_events(log.js, "LIBRA", "libra.turn.accepted.discord-7-8")
        if e.turn == captured.id
    ]
    clip = derive(
        accepted,
        TtsSynthesized,
        key="tts/0",
        audio=AUDIO,
        index=0,
        text="It is noon.",
        engine="espeak",
        ttfb_ms=40.0,
        final=True,
        origin=DISCORD,
    )
    await log.publish(clip)
    await log.publish(derive(clip, ReplyDelivered, key="delivered", clips=1, origin=DISCORD))


async def _chat(port: int) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as http:
        for user, message in (("ann", "Hello!"), ("ben", "How are you?")):
            r = await http.post("/api/chat/completions", json={"userId": user, "message": message})
            assert r.status_code == 200
        statuses = [
            (
                await http.post("/api/chat/completions", json={"userId": "cy", "message": f"m{i}"})
            ).status_code
            for i in range(4)
        ]
        assert statuses == [200, 200, 200, 429]
        assert (await http.get("/api/health")).status_code == 200


async def _filled(pool) -> bool:
    row = await pool.fetchrow(
        "SELECT count(*) FILTER (WHERE first_audio_at IS NOT NULL AND delivered_at IS NOT NULL"
        " AND completed_at IS NOT NULL) AS spoken,"
        " count(*) FILTER (WHERE status = 'rejected') AS rejected,"
        " count(*) FILTER (WHERE status = 'failed') AS failed,"
        " count(*) FILTER (WHERE platform = 'http' AND first_delta_at IS NOT NULL) AS typed"
        " FROM turns"
    )
    return row["spoken"] == 2 and row["rejected"] == 1 and row["failed"] == 1 and row["typed"] >= 5


async def test_every_panel_query_runs_on_real_projections(settings, eventlog, pool) -> None:
    from libra.ops.embedded import free_port

    port = free_port()
    async with FakeLlmWire(reply=Behaviour.ok("Hello! Happy to help.")) as wire:
        s = _settings(settings, wire, port)
        async with running(s, [*TEXT_PIPELINE, "http"]):
            await wait_http(port)
            await _chat(port)
            wire.queue(OPENAI_CHAT, Behaviour.error(500))
            async with httpx.AsyncClient(timeout=20) as http:
                failed = await http.post(
                    f"http://127.0.0.1:{port}/api/chat/completions",
                    json={"userId": "dee", "message": "Anyone there?"},
                )
            assert failed.json()["error"] == "server"
            for n in range(2):
                await _speak(eventlog, n)
            await eventually(lambda: _filled(pool), timeout=20)
        await store_prices(s.database_url)  # as `libra migrate` does

    start, end = datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC) + timedelta(hours=1)
    sql_panels = _sql_panels()
    assert len(sql_panels) >= 12
    for board, panel in sql_panels:
        for target in panel["targets"]:
            sql = expand_macros(target["rawSql"], start, end)
            try:
                rows = await pool.fetch(sql)
            except Exception as exc:
                pytest.fail(f"{board} / {panel['title']}: {exc}\n{sql}")
            assert rows, f"{board} / {panel['title']} is empty although the data is there"
            assert all(any(v is not None for v in dict(r).values()) for r in rows)

    costs = await pool.fetch(expand_macros(_panel("Usage and cost by day", sql_panels), start, end))
    assert [(r["provider"], r["model"]) for r in costs] == [("openai", "gpt-4o-mini")]
    assert costs[0]["est_usd"] is not None and costs[0]["replies"] == 7


def _panel(title: str, panels: list[tuple[str, dict]]) -> str:
    return next(p["targets"][0]["rawSql"] for _, p in panels if p["title"].startswith(title))


_METRIC = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*[{\[]")
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def exported_names() -> set[str]:
    """Every series name this process's registry can export, observed yet or not."""
    names = set()
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


async def test_prometheus_panels_name_exported_metrics(settings, eventlog) -> None:
    async with (
        FakeLlmWire() as wire,
        running(_settings(settings, wire, 0), [*TEXT_PIPELINE, "http"]),
    ):
        pass  # built and run: every module that defines a metric is loaded
    exported = exported_names()
    panels = _prom_panels()
    assert len(panels) >= 15
    for board, panel in panels:
        for target in panel["targets"]:
            used = set(_METRIC.findall(target["expr"]))
            assert used, f"{board} / {panel['title']}: no metric in {target['expr']}"
            missing = used - exported
            assert not missing, f"{board} / {panel['title']}: {sorted(missing)} not exported"
    assert {"http_requests_total", "llm_tokens_used_total", "redis_cache_hit_rate"} <= exported
    assert {"voice_processing_duration_seconds_bucket", "libra_consumer_pending"} <= exported
