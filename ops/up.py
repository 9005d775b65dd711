"""`libra up`, `libra run` and projection rebuilds: start servers, provision, run components."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Callable

from nats.js.errors import NotFoundError

from libra.contracts import LOG_STREAM
from libra.runtime.compute import lower_priority
from libra.runtime.config import ConfigError, Settings
from libra.runtime.database import connect_pool, migrate
from libra.runtime.eventlog import EventLog
from libra.runtime.logs import configure_logging
from libra.runtime.metrics import serve_metrics
from libra.runtime.projection import rebuild
from libra.runtime.redact import keep_secret, redact

from .components import BACKGROUND, COMPONENTS, PROJECTIONS, Resources, Supervisor
from .embedded import ServerStartError
from .eval.prices import store_prices
from .stack import DataDirBusyError, ExposedError, Stack, StackUrls, resolve_urls

__all__ = ["models_line", "prepare", "rebuild_projection", "run_components", "run_up"]

log = logging.getLogger("libra.up")


def _stop_signal() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _say(text: str) -> None:
    print(text, flush=True)


def _announce(stack: Stack, urls: StackUrls) -> None:
    _say(f"Libra data directory: {stack.data_dir}")
    env = urls.as_env()
    rows = [
        ("NATS", env["NATS_URL"], stack.nats),
        ("PostgreSQL", env["DATABASE_URL"], stack.postgres),
        ("Redis", env["REDIS_URL"], stack.redis),
    ]
    for name, url, embedded in rows:
        where = f"embedded, log {embedded.log}" if embedded is not None else "external"
        _say(f"  {name:<11} {redact(url)}  ({where})")
    if urls.nats_monitor_url:
        _say(f"  {'monitoring':<11} {urls.nats_monitor_url}")
    _say("  `libra env` prints these with their passwords.")


async def models_line(settings: Settings) -> str:
    """Says in one line which recogniser, language model and voice Libra uses, and where from
    (each a fallback order), as the asr, llm and tts components build them."""
    from libra.processors.asr.processor import build_engines as recognisers
    from libra.processors.asr.whisper import WhisperEngine
    from libra.processors.llm.providers import build_targets
    from libra.processors.llm.providers.embedded import LABEL
    from libra.processors.tts.processor import build_engines as voices

    def hears() -> list[str]:
        return [
            e.label if isinstance(e, WhisperEngine) else f"{e.name} {e.model}"
            for e in recognisers(settings)
        ]

    def speaks() -> list[str]:
        return [
            "espeak-ng" if e.name == "espeak" else f"{e.name} {e.model}" for e in voices(settings)
        ]

    thinks: list[str] = []
    try:
        targets = build_targets(settings)
    except ConfigError as exc:
        thinks.append(f"nothing ({exc})")
    else:
        for target in targets:
            name = target.provider.name
            thinks.append(LABEL if name == "embedded" else f"{name} {target.model}")
        for provider in {id(t.provider): t.provider for t in targets}.values():
            await provider.close()  # only their names were wanted
    return (
        f"Libra hears with {_in_order(hears)}; thinks with {', then '.join(thinks)};"
        f" speaks with {_in_order(speaks)}."
    )


def _in_order(labels: Callable[[], list[str]]) -> str:
    try:
        return ", then ".join(labels())
    except ConfigError as exc:  # the component will refuse to start with the same words
        return f"nothing ({exc})"


def _keep_secret(settings: Settings, stack: Stack) -> None:
    """Adds the embedded servers' passwords to what logs and events leave out."""
    secrets = stack.secrets()
    keep_secret(*secrets)
    configure_logging(
        fmt=settings.log_format, level=settings.log_level, secrets=[*settings.secrets(), *secrets]
    )


async def run_up(settings: Settings) -> None:
    """Starts and watches the embedded servers, provisions the log and schema, runs it all."""
    stop = _stop_signal()
    stack = Stack(settings)
    try:
        urls = await stack.start()
    except (ServerStartError, DataDirBusyError, ExposedError) as exc:
        print(f"libra up: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    _keep_secret(settings, stack)
    # A stop signal ends the watch at once: servers that stop with Libra are not restarted.
    stack.supervise(until=stop)
    try:
        _announce(stack, urls)
        _say(await models_line(settings))
        await _serve(settings, urls, list(COMPONENTS), stop, provision=True)
    finally:
        await stack.stop()
        _say("Libra stopped.")


async def run_components(settings: Settings, names: list[str]) -> None:
    """Runs the named components against the servers the environment names; a process of read
    models alone yields the CPU to the ones a turn waits on (``BACKGROUND_NICE``)."""
    if set(names) <= BACKGROUND:
        lower_priority(settings.background_nice)
    stop = _stop_signal()
    if settings.libra_metrics_port:
        serve_metrics(settings.libra_metrics_port, settings.libra_host)
    await _serve(settings, resolve_urls(settings), names, stop, provision=False)


async def prepare(log_: EventLog, settings: Settings, database_url: str) -> list[int]:
    """Provisions the log, applies the migrations and loads the price table (`libra migrate`);
    returns the migrations it applied."""
    await log_.provision(settings)
    applied = await migrate(database_url)
    await store_prices(database_url)
    return applied


async def _provisioned(log_: EventLog) -> bool:
    try:
        await log_.js.stream_info(LOG_STREAM)
    except NotFoundError:
        return False
    return True


async def _serve(
    settings: Settings, urls: StackUrls, names: list[str], stop: asyncio.Event, *, provision: bool
) -> None:
    log_ = await EventLog.connect(urls.nats_url, name="libra")
    resources = Resources(
        settings, log_, urls.database_url, urls.redis_url, read_database_url=urls.reader_url
    )
    supervisor = Supervisor(resources, names)
    try:
        # A component's own NATS user may not provision: `libra migrate` did, as admin.
        if provision or not await _provisioned(log_):
            await prepare(log_, settings, urls.owner_url)
        await supervisor.start()
        await supervisor.wait_built()
        # Everything loaded so far (SDKs, models) lives as long as the process: keep it out of
        # the collector's way, or full collections pause the event loop for tens of ms.
        gc.freeze()
        _say(_ready_line(supervisor))
        await stop.wait()
        _say("Stopping: finishing in-flight work…")
    finally:
        try:
            await supervisor.stop()
        finally:  # the pools close before `libra up` stops PostgreSQL, whatever stop raised
            await resources.close()
            with contextlib.suppress(Exception):
                await log_.close()


def _ready_line(supervisor: Supervisor) -> str:
    """Names what runs, and what is off for want of a setting."""
    off = "".join(f" ({name} is off: set {need})" for name, need in supervisor.off.items())
    return f"Libra is ready: {', '.join(supervisor.started)}.{off} Ctrl-C stops it."


async def rebuild_projection(settings: Settings, name: str) -> int:
    """Rebuilds one projection from the log; returns how many events it applied."""
    known = [*PROJECTIONS, "ratelimit-view", "knowledge"]
    if name not in known:
        raise SystemExit(f"unknown projection {name!r}; known: {', '.join(known)}")
    urls = resolve_urls(settings)
    log_ = await EventLog.connect(urls.nats_url, name="libra-rebuild")
    if name == "ratelimit-view":
        return await _rebuild_rate_limits(settings, log_, urls.redis_url)
    pool = await connect_pool(urls.owner_url)  # a rebuild empties tables: the owner's right
    try:
        await migrate(urls.owner_url)
        if name == "knowledge":  # it reads the documents bucket, and embeds
            from libra.projections.knowledge import knowledge_projection

            return await rebuild(log_, pool, await knowledge_projection(settings, log_))
        return await rebuild(log_, pool, PROJECTIONS[name]())
    finally:
        await pool.close()
        await log_.close()


async def _rebuild_rate_limits(settings: Settings, log_: EventLog, redis_url: str) -> int:
    import redis.asyncio as aioredis

    from libra.processors.turns.ratelimit import RateLimiter
    from libra.processors.turns.view import rebuild_rate_limits

    client = aioredis.from_url(redis_url)
    limiter = RateLimiter(
        client, limit=settings.rate_limit_turns, window_s=settings.rate_limit_window_sec
    )
    try:
        return await rebuild_rate_limits(log_, limiter)
    finally:
        await client.aclose()
        await log_.close()
