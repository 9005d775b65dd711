"""The `libra` command line."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import click
import msgspec

from libra.runtime.config import ConfigError, Settings
from libra.runtime.logs import configure_logging

from .stack import resolve_urls

__all__ = ["main"]


def _settings(data_dir: str | None = None) -> Settings:
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if data_dir:
        settings = msgspec.structs.replace(settings, libra_data_dir=str(Path(data_dir).resolve()))
    configure_logging(fmt=settings.log_format, level=settings.log_level, secrets=settings.secrets())
    return settings


def _run(coro) -> None:
    """Runs a command's coroutine; Ctrl-C and SIGTERM cancel it and let it clean up."""
    try:
        asyncio.run(coro)
    except KeyboardInterrupt:
        sys.exit(130)


async def wait_for_signal() -> None:
    """Returns on SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Libra: an event-sourced Discord bot you talk to by text and by voice."""


@main.command()
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    help="Where the embedded servers keep their data.",
)
def up(data_dir: str | None) -> None:
    """Start the whole stack: embedded servers (unless *_URL is set) and every component."""
    from .up import run_up

    settings = _settings(data_dir)
    _run(run_up(settings))


@main.command(name="run")
@click.argument("names", nargs=-1, required=True)
def run_components(names: tuple[str, ...]) -> None:
    """Run the named components against existing servers (how production runs)."""
    from .up import run_components as run

    settings = _settings()
    _run(run(settings, list(names)))


@main.command(name="env")
@click.option("--data-dir", type=click.Path(file_okay=False))
def print_env(data_dir: str | None) -> None:
    """Print where the servers listen, as NAME=URL lines (eval-able in a shell)."""
    urls = resolve_urls(_settings(data_dir))
    for name, url in urls.as_env().items():
        click.echo(f"{name}={url}")


@main.command()
@click.option("--data-dir", type=click.Path(file_okay=False))
def migrate(data_dir: str | None) -> None:
    """Apply the database migrations that are not applied yet."""
    from libra.runtime.database import migrate as apply

    url = resolve_urls(_settings(data_dir)).database_url
    applied = asyncio.run(apply(url))
    click.echo(f"applied {len(applied)} migration(s)" + (f": {applied}" if applied else ""))


@main.command()
@click.argument("subject_filter", default="libra.>")
@click.option("--raw", is_flag=True, help="Print subjects and raw JSON instead of summaries.")
@click.option("--count", default=0, help="Exit after this many events (0: run until Ctrl-C).")
@click.option("--data-dir", type=click.Path(file_okay=False))
def tail(subject_filter: str, raw: bool, count: int, data_dir: str | None) -> None:
    """Print live events as readable lines (SUBJECT_FILTER: e.g. 'llm.>' or 'libra.text.>')."""
    from .tail import tail as run_tail

    url = resolve_urls(_settings(data_dir)).nats_url

    async def go() -> None:
        task = asyncio.create_task(run_tail(url, subject_filter, raw=raw, limit=count))
        stop = asyncio.create_task(wait_for_signal())
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        task.cancel()
        stop.cancel()

    _run(go())


@main.command()
@click.argument("turn")
@click.option("--data-dir", type=click.Path(file_okay=False))
def trace(turn: str, data_dir: str | None) -> None:
    """Print the causal chain of one turn from the log, with the time each stage took."""
    from libra.runtime.eventlog import EventLog

    from .trace import TraceError, collect_turn, format_trace

    url = resolve_urls(_settings(data_dir)).nats_url

    async def go() -> None:
        log = await EventLog.connect(url, name="libra-trace")
        try:
            click.echo(format_trace(await collect_turn(log, turn)))
        except TraceError as exc:
            raise click.ClickException(str(exc)) from None
        finally:
            await log.close()

    asyncio.run(go())


@main.group()
def projections() -> None:
    """Projections: the read models folded from the log."""


@projections.command()
@click.argument("name")
@click.option("--data-dir", type=click.Path(file_okay=False))
def rebuild(name: str, data_dir: str | None) -> None:
    """Drop a projection's rows and fold the whole log into it again."""
    from .up import rebuild_projection

    settings = _settings(data_dir)
    count = asyncio.run(rebuild_projection(settings, name))
    click.echo(f"rebuilt {name} from {count} events")


@main.group()
def bench() -> None:
    """Benchmarks: each measures Libra beside the bare client in the same run."""


@bench.command(name="log")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--events", default=20000, show_default=True, help="Events per throughput figure.")
@click.option("--hops", default=2000, show_default=True, help="Round trips for the hop latency.")
def bench_log(as_json: bool, events: int, hops: int) -> None:
    """The log: publish, one hop through the consumer runtime, projection, replay."""
    from .bench.log import run_bench_log

    settings = _settings()
    asyncio.run(run_bench_log(settings, events=events, hops=hops, as_json=as_json))
