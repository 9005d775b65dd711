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


def _settings(data_dir: str | None = None, *, interactive: bool = False) -> Settings:
    """The settings, with logging set up. ``interactive``: a command whose output is for a
    person (chat, tail, trace) logs warnings and errors only, unless LOG_LEVEL asks for debug,
    so that no info line ("nats disconnected") lands in the middle of what it prints."""
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if data_dir:
        settings = msgspec.structs.replace(settings, libra_data_dir=str(Path(data_dir).resolve()))
    level = settings.log_level
    if interactive and level.upper() == "INFO":
        level = "WARNING"
    configure_logging(fmt=settings.log_format, level=level, secrets=settings.secrets())
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
    """Apply the database migrations not applied yet, load the LLM price table, and provision
    the log's streams, bucket and consumers (NATS_URL logs in as the admin user, DATABASE_URL as
    the database's owner)."""
    from libra.runtime.eventlog import EventLog

    from .up import prepare

    settings = _settings(data_dir)
    urls = resolve_urls(settings)

    async def go() -> list[int]:
        log = await EventLog.connect(urls.nats_url, name="libra-migrate")
        try:
            return await prepare(log, settings, urls.owner_url)
        finally:
            await log.close()

    applied = asyncio.run(go())
    click.echo(f"applied {len(applied)} migration(s)" + (f": {applied}" if applied else ""))


@main.command()
@click.argument("subject_filter", default="libra.>")
@click.option("--raw", is_flag=True, help="Print subjects and raw JSON instead of summaries.")
@click.option("--count", default=0, help="Exit after this many events (0: run until Ctrl-C).")
@click.option("--data-dir", type=click.Path(file_okay=False))
def tail(subject_filter: str, raw: bool, count: int, data_dir: str | None) -> None:
    """Print live events as readable lines (SUBJECT_FILTER: e.g. 'llm.>' or 'libra.text.>')."""
    from .tail import tail as run_tail

    url = resolve_urls(_settings(data_dir, interactive=True)).nats_url

    async def go() -> None:
        task = asyncio.create_task(run_tail(url, subject_filter, raw=raw, limit=count))
        stop = asyncio.create_task(wait_for_signal())
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        task.cancel()
        stop.cancel()
        # Waited for: a tail cancelled mid-drain would leave asyncio an error to print.
        await asyncio.gather(task, stop, return_exceptions=True)

    _run(go())


@main.command()
@click.option("--user", default="", help="Who you are (default: your login name).")
@click.option("--data-dir", type=click.Path(file_okay=False))
def chat(user: str, data_dir: str | None) -> None:
    """Talk with the running stack in this terminal."""
    import getpass

    from libra.gateway.console import chat_loop
    from libra.runtime.eventlog import EventLog

    url = resolve_urls(_settings(data_dir, interactive=True)).nats_url

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
    """Print the causal chain of one turn from the log, with the time each stage took (TURN: its
    id, or its first or last characters, such as the 8 that `libra tail` shows)."""
    from libra.runtime.eventlog import EventLog

    from .trace import TraceError, collect_turn, format_trace

    url = resolve_urls(_settings(data_dir, interactive=True)).nats_url

    async def go() -> None:
        log = await EventLog.connect(url, name="libra-trace")
        try:
            click.echo(format_trace(await collect_turn(log, turn)))
        except TraceError as exc:
            raise click.ClickException(str(exc)) from None
        finally:
            await log.close()

    asyncio.run(go())


def _selection_options(command):
    """Adds the options that pick recorded inputs (`libra replay`, `libra eval`)."""
    options = [
        click.option("--turn", "turns", multiple=True, help="A turn's id (repeatable)."),
        click.option("--conversation", default="", help="One conversation, e.g. discord-1-2."),
        click.option(
            "--user", default="", help="One person's inputs: discord:123 (or 123 on any platform)."
        ),
        click.option("--subject", default="", help="A subject filter, e.g. 'libra.*.*.http-*'."),
        click.option("--since", default="", help="From: ISO 8601 time, or how long ago (30m, 2d)."),
        click.option("--until", default="", help="Up to: ISO 8601 time, or how long ago."),
        click.option("--limit", default=0, help="At most this many inputs (0: all)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _selection(turns, conversation, user, subject, since, until, limit):
    from .replay import Selection, parse_moment

    try:
        return Selection(
            turns=frozenset(turns),
            conversation=conversation,
            user=user,
            subject=subject,
            since=parse_moment(since) if since else None,
            until=parse_moment(until) if until else None,
            limit=limit,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command(name="replay")
@click.argument("processor")
@_selection_options
@click.option("--compare", is_flag=True, help="Print what changed against the recorded outputs.")
@click.option("--concurrency", default=8, show_default=True, help="Inputs handled at once.")
@click.option("--run", default="", help="The run's token in replay.<run>.> (default: a new id).")
@click.option("--data-dir", type=click.Path(file_okay=False))
def replay_command(
    processor: str, compare: bool, concurrency: int, run: str, data_dir: str | None, **selected
) -> None:
    """Run recorded inputs again through one PROCESSOR (llm, turns, asr), as the code and
    settings are now; its outputs go to replay.<run>.> in LIBRA_REPLAY, never to libra.>."""
    from .replay import REPLAYABLE, replay

    if processor not in REPLAYABLE:
        raise click.BadParameter(f"known: {', '.join(REPLAYABLE)}", param_hint="PROCESSOR")
    settings = _settings(data_dir)
    selection = _selection(**selected)
    _run(
        replay(
            settings,
            processor,
            selection,
            compare=compare,
            concurrency=concurrency,
            run=run,
            say=click.echo,
        )
    )


@main.command(name="eval")
@_selection_options
@click.option(
    "--plan",
    "plan_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="TOML file of [[candidates]] and an optional [judge] (see ops/eval/plan.py).",
)
@click.option(
    "--candidate",
    "candidates",
    multiple=True,
    help="provider:model, or name=provider:model (repeatable).",
)
@click.option("--system-prompt", default="", help="The system prompt of the --candidate ones.")
@click.option("--temperature", type=float, default=None, help="Their temperature.")
@click.option("--judge", default="", help="provider:model of a model that compares the answers.")
@click.option("--concurrency", type=int, default=None, help="Answers in flight at once [4].")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("libra-eval"),
    show_default=True,
    help="Where results and reports go; run again with the same one to resume.",
)
@click.option("--data-dir", type=click.Path(file_okay=False))
def eval_command(
    plan_file: Path | None,
    candidates: tuple[str, ...],
    system_prompt: str,
    temperature: float | None,
    judge: str,
    concurrency: int | None,
    out: Path,
    data_dir: str | None,
    **selected,
) -> None:
    """Answer recorded turns with candidate configurations (provider, model, system prompt,
    temperature) and report them side by side: Markdown, HTML and CSV."""
    from .eval.plan import Candidate, load_plan
    from .eval.run import run_eval

    settings = _settings(data_dir)
    extra = tuple(
        Candidate.parse(spec, system_prompt=system_prompt, temperature=temperature)
        for spec in candidates
    )
    try:
        plan = load_plan(
            plan_file,
            extra=extra,
            judge=Candidate.parse(judge) if judge else None,
            concurrency=concurrency,
        )
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        done = asyncio.run(run_eval(settings, plan, _selection(**selected), out))
    except ConfigError as exc:  # a candidate's provider without its key
        raise click.UsageError(str(exc)) from None
    except KeyboardInterrupt:
        click.echo(f"stopped; what was answered is kept in {out}: run the same command to go on")
        sys.exit(130)
    click.echo(
        f"{done.turns} turn(s) × {len(plan.candidates)} candidate(s): {done.answered} answered"
        f" in {done.seconds:.1f} s ({done.answers_per_s:.1f}/s), {done.skipped} done before,"
        f" {done.judged} judged"
    )
    for path in done.reports:
        click.echo(f"  {path}")


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
def dead() -> None:
    """Dead letters: what a consumer gave up on, and re-driving it once the cause is gone."""


@dead.command(name="list")
@click.option("--consumer", default="", help="One consumer's letters, e.g. turns.")
@click.option("--since", default="", help="From: ISO 8601 time, or how long ago (30m, 2d).")
@click.option("--data-dir", type=click.Path(file_okay=False))
def dead_list(consumer: str, since: str, data_dir: str | None) -> None:
    """Print the dead letters in the log, oldest first."""
    from .dead import dead_letters

    async def go(log) -> None:
        for letter, retried in await dead_letters(log, consumer=consumer, since=_moment(since)):
            mark = " (retried)" if retried else ""
            click.echo(
                f"{letter.id} {letter.at:%Y-%m-%d %H:%M:%S} {letter.consumer} seq"
                f" {letter.stream_seq} {letter.subject}{mark}: {letter.error[:200]!r}"
            )

    _run(_with_log(data_dir, "libra-dead", go))


@dead.command(name="retry")
@click.argument("ids", nargs=-1)
@click.option("--consumer", default="", help="One consumer's letters, e.g. turns.")
@click.option("--since", default="", help="From: ISO 8601 time, or how long ago (30m, 2d).")
@click.option("--data-dir", type=click.Path(file_okay=False))
def dead_retry(ids: tuple[str, ...], consumer: str, since: str, data_dir: str | None) -> None:
    """Re-drive dead letters (IDS, or every one selected) to the consumer that gave up, once."""
    from .dead import retry_dead_letters

    async def go(log) -> None:
        done = await retry_dead_letters(log, consumer=consumer, since=_moment(since), ids=ids)
        for letter, reason in done.skipped:
            click.echo(f"skipped {letter.id} ({letter.consumer}): {reason}")
        click.echo(f"re-driven {len(done.retried)} dead letter(s)")

    _run(_with_log(data_dir, "libra-dead", go))


def _moment(value: str):
    from .replay import parse_moment

    try:
        return parse_moment(value) if value else None
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


async def _with_log(data_dir: str | None, name: str, work) -> None:
    from libra.runtime.eventlog import EventLog

    log = await EventLog.connect(resolve_urls(_settings(data_dir)).nats_url, name=name)
    try:
        await work(log)
    finally:
        await log.close()


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
@click.option(
    "--local",
    is_flag=True,
    help="The embedded model, no account: first token and tokens/s beside bare llama-cpp.",
)
@click.option(
    "--moderation",
    is_flag=True,
    help="Moderation's added latency to the first delta, beside the classifier's own time.",
)
@click.option(
    "--turns", default=5, show_default=True, help="Turns measured with --local or --moderation."
)
def bench_text(
    as_json: bool,
    conversations: int,
    think: float,
    seconds: float,
    local: bool,
    moderation: bool,
    turns: int,
) -> None:
    """Text turns: orchestration overhead to the first delta, and turns/s sustained."""
    from .bench.text import run_bench_text, run_bench_text_local, run_bench_text_moderation

    settings = _settings()
    if moderation:
        asyncio.run(run_bench_text_moderation(settings, turns=turns, as_json=as_json))
        return
    if local:
        asyncio.run(run_bench_text_local(settings, turns=turns, as_json=as_json))
        return
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


@bench.command(name="replay")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--events", default=50000, show_default=True, help="Events read back per figure.")
@click.option("--rounds", default=3, show_default=True, help="Rounds of the read figures.")
@click.option("--turns", default=200, show_default=True, help="Turns replayed through the llm.")
@click.option("--concurrency", default=16, show_default=True, help="Inputs handled at once.")
@click.option("--ttft", default=0.2, show_default=True, help="The provider's first-token time (s).")
def bench_replay(
    as_json: bool, events: int, rounds: int, turns: int, concurrency: int, ttft: float
) -> None:
    """Replay: reading back and re-processing the log, beside a bare read of the same events."""
    from .bench.replay import run_bench_replay

    settings = _settings()
    asyncio.run(
        run_bench_replay(
            settings,
            events=events,
            rounds=rounds,
            turns=turns,
            concurrency=concurrency,
            ttft=ttft,
            as_json=as_json,
        )
    )


@bench.command(name="eval")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--turns", default=200, show_default=True, help="Recorded turns answered.")
@click.option("--concurrency", default=16, show_default=True, help="Answers in flight at once.")
@click.option("--ttft", default=0.2, show_default=True, help="The provider's first-token time (s).")
def bench_eval(as_json: bool, turns: int, concurrency: int, ttft: float) -> None:
    """Eval: answers per second with candidates concurrent, against one at a time."""
    from .bench.eval import run_bench_eval

    settings = _settings()
    asyncio.run(
        run_bench_eval(settings, turns=turns, concurrency=concurrency, ttft=ttft, as_json=as_json)
    )


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


@bench.command(name="load")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--minutes", default=5.0, show_default=True, help="Length of the loaded run.")
@click.option("--users", default=500, show_default=True, help="People talking.")
@click.option("--conversations", default=100, show_default=True, help="HTTP users and channels.")
@click.option(
    "--think", default=20.0, show_default=True, help="Seconds a person thinks between turns (±50%)."
)
@click.option(
    "--fault",
    type=click.Choice(["redis", "postgres", "nats", "kill-llm"]),
    help="Stop one server (or SIGKILL the llm process) a third of the way in, then restart it.",
)
@click.option(
    "--fault-seconds",
    default=30.0,
    show_default=True,
    help="How long the stopped server stays down (at most a quarter of the run).",
)
def bench_load(
    as_json: bool,
    minutes: float,
    users: int,
    conversations: int,
    think: float,
    fault: str | None,
    fault_seconds: float,
) -> None:
    """Load and soak on both edges: turns/s, overhead, RSS, lag; lost and doubled turns."""
    from .bench.load import LoadPlan, run_bench_load

    seconds = minutes * 60
    plan = LoadPlan(
        users=users,
        conversations=conversations,
        seconds=seconds,
        think=think,
        fault=fault,
        fault_seconds=min(fault_seconds, seconds / 4),
    )
    asyncio.run(run_bench_load(_settings(), plan=plan, as_json=as_json))


@bench.command(name="voice-transport")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--seconds", default=60.0, show_default=True, help="Length of the run.")
@click.option("--speakers", default=10, show_default=True, help="People talking at once.")
@click.option(
    "--intelligibility/--no-intelligibility",
    default=True,
    show_default=True,
    help="Word error of speech under 5% and 15% loss, with and without concealment (Whisper).",
)
def bench_voice_transport(
    as_json: bool, seconds: float, speakers: int, intelligibility: bool
) -> None:
    """The voice transport: receive latency, send jitter, CPU per speaker, DAVE key changes,
    speech under packet loss (loopback fake)."""
    from .bench.voice_transport import run_bench_voice_transport

    _settings()
    asyncio.run(
        run_bench_voice_transport(
            seconds=seconds, speakers=speakers, intelligibility=intelligibility, as_json=as_json
        )
    )


@bench.command(name="ws")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--turns", default=20, show_default=True, help="Spoken turns timed, each way.")
@click.option("--sockets", default=200, show_default=True, help="Sockets streaming at once.")
@click.option("--seconds", default=20.0, show_default=True, help="Length of the load.")
def bench_ws(as_json: bool, turns: int, sockets: int, seconds: float) -> None:
    """The WebSocket API: end of speech to first audio on the socket beside libra bench voice;
    CPU, memory and frame handling with many sockets streaming at once."""
    from .bench.ws import run_bench_ws

    asyncio.run(
        run_bench_ws(_settings(), turns=turns, sockets=sockets, seconds=seconds, as_json=as_json)
    )


@bench.command(name="voice")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--turns", type=int, help="Spoken turns measured (30; 5 with --local).")
@click.option(
    "--speculate/--no-speculate",
    default=True,
    show_default=True,
    help="Generate from the transcript at the first short pause (VOICE_SPECULATIVE_REPLY).",
)
@click.option(
    "--sync/--no-sync",
    default=True,
    show_default=True,
    help="nats.conf as shipped, syncing every write to disk (or not, to compare).",
)
@click.option(
    "--local",
    is_flag=True,
    help="No vendors: faster-whisper tiny.en, the embedded model and espeak-ng, beside the floor.",
)
@click.option(
    "--with-text",
    is_flag=True,
    help="With --local: HTTP text turns alone, then during the voice turns, compared.",
)
def bench_voice(
    as_json: bool, turns: int | None, speculate: bool, sync: bool, local: bool, with_text: bool
) -> None:
    """End of speech to the first synthesized audio, with simulated ASR, LLM and TTS vendors
    (or, with --local, the engines in the box)."""
    if with_text and not local:
        raise click.UsageError("--with-text goes with --local")
    if local and not (speculate and sync):
        raise click.UsageError("--local runs Libra's defaults: no --no-speculate or --no-sync")
    settings = _settings()
    if local:
        from .bench.voice_local import run_bench_voice_local

        asyncio.run(
            run_bench_voice_local(settings, turns=turns or 5, with_text=with_text, as_json=as_json)
        )
        return
    from .bench.voice import run_bench_voice

    asyncio.run(
        run_bench_voice(
            settings, turns=turns or 30, speculate=speculate, sync=sync, as_json=as_json
        )
    )


def _knowledge_commands() -> None:
    from .knowledge_cli import bench_knowledge, knowledge
    from .tools_cli import tools_command

    main.add_command(knowledge)
    main.add_command(tools_command)
    bench.add_command(bench_knowledge)


_knowledge_commands()
