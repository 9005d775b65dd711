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
@click.option("--user", default="", help="Who you are (default: your login name).")
@click.option("--data-dir", type=click.Path(file_okay=False))
def chat(user: str, data_dir: str | None) -> None:
    """Talk with the running stack in this terminal."""
    import getpass

    from libra.gateway.console import chat_loop
    from libra.runtime.eventlog import EventLog

    url = resolve_urls(_settings(data_dir)).nats_url

    async def go() -> None:
        log = await EventLog.connect(url, name="libra-chat")
        try:
            await chat_loop(log, user=user or getpass.getuser())
        finally:
            await log.close()

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


@bench.command(name="text")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--conversations", default=200, show_default=True, help="Conversations at once.")
@click.option(
    "--think",
    default=5.0,
    show_default=True,
    help="Seconds a person takes to write the next message (±50%).",
)
@click.option("--seconds", default=30.0, show_default=True, help="Measured time per scenario.")
def bench_text(as_json: bool, conversations: int, think: float, seconds: float) -> None:
    """Text turns: orchestration overhead to the first delta, and turns/s sustained."""
    from .bench.text import run_bench_text

    settings = _settings()
    asyncio.run(
        run_bench_text(
            settings, conversations=conversations, think=think, seconds=seconds, as_json=as_json
        )
    )


@bench.command(name="log")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--events", default=20000, show_default=True, help="Events per throughput figure.")
@click.option("--hops", default=2000, show_default=True, help="Round trips for the hop latency.")
def bench_log(as_json: bool, events: int, hops: int) -> None:
    """The log: publish, one hop through the consumer runtime, projection, replay."""
    from .bench.log import run_bench_log

    settings = _settings()
    asyncio.run(run_bench_log(settings, events=events, hops=hops, as_json=as_json))


@bench.command(name="discord")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--channels", default=100, show_default=True, help="Channels active at once.")
@click.option("--rounds", default=10, show_default=True, help="Messages per channel.")
@click.option(
    "--interval", default=1.25, show_default=True, help="Seconds between a channel's messages."
)
def bench_discord(as_json: bool, channels: int, rounds: int, interval: float) -> None:
    """The Discord gateway: MESSAGE_CREATE to the first message POST, on a loopback Discord."""
    from .bench.discord import run_bench_discord

    settings = _settings()
    asyncio.run(
        run_bench_discord(
            settings, channels=channels, rounds=rounds, interval=interval, as_json=as_json
        )
    )


@bench.command(name="voice-transport")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--seconds", default=60.0, show_default=True, help="Length of the run.")
@click.option("--speakers", default=10, show_default=True, help="People talking at once.")
def bench_voice_transport(as_json: bool, seconds: float, speakers: int) -> None:
    """The voice transport: receive latency, send jitter, CPU per speaker (loopback fake)."""
    from .bench.voice_transport import run_bench_voice_transport

    _settings()
    asyncio.run(run_bench_voice_transport(seconds=seconds, speakers=speakers, as_json=as_json))
