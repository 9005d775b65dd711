"""`libra knowledge add|list|remove` and `libra bench knowledge`.

Added to the `libra` command line by ``ops/cli.py``. ``add`` needs the log (NATS) only: the
knowledge projection of the running stack chunks and embeds the document, and ``list`` shows
it once it has.
"""

from __future__ import annotations

import asyncio
import getpass
import sys
from pathlib import Path

import click

__all__ = ["bench_knowledge", "knowledge"]


def _scope(guild: str, user: str) -> str:
    from libra.processors.knowledge.scopes import ScopeError, parse_scope

    if guild and user:
        raise click.UsageError("name one of --guild and --user, not both")
    try:
        return parse_scope(f"guild:{guild}" if guild else f"user:{user}" if user else "global")
    except ScopeError as exc:
        raise click.BadParameter(str(exc)) from None


def _settings(data_dir: str | None):
    from .cli import _settings as settings

    return settings(data_dir)


_scope_options = [
    click.option("--guild", default="", help="A Discord server's id: its knowledge base."),
    click.option("--user", default="", help="A person, platform:id (discord:123, http:alice)."),
    click.option("--data-dir", type=click.Path(file_okay=False)),
]


def _with_scope_options(command):
    for option in reversed(_scope_options):
        command = option(command)
    return command


@click.group()
def knowledge() -> None:
    """Knowledge bases: documents Libra answers from (global, a server's, a person's)."""


@knowledge.command(name="add")
@click.argument("paths", nargs=-1, required=True, type=click.Path(dir_okay=False))
@_with_scope_options
def add(paths: tuple[str, ...], guild: str, user: str, data_dir: str | None) -> None:
    """Add documents (txt, md, html, pdf) to the global knowledge base, or a server's or
    person's."""
    from libra.processors.knowledge.documents import Limits, add_document
    from libra.processors.knowledge.parsing import DocumentRejected
    from libra.runtime.documents import DocumentStore
    from libra.runtime.eventlog import EventLog

    from .stack import resolve_urls

    scope = _scope(guild, user)
    settings = _settings(data_dir)

    async def go() -> int:
        log = await EventLog.connect(resolve_urls(settings).nats_url, name="libra-knowledge")
        failed = 0
        try:
            store = await DocumentStore.open(log.js)
            for path in paths:
                try:
                    data = await asyncio.to_thread(Path(path).read_bytes)
                    event = await add_document(
                        log,
                        store,
                        name=Path(path).name,
                        data=data,
                        scope=scope,
                        added_by=f"console:{getpass.getuser()}",
                        limits=Limits.from_settings(settings),
                    )
                except (DocumentRejected, OSError) as exc:
                    failed += 1
                    click.echo(f"not added: {path}: {exc}", err=True)
                    continue
                click.echo(f"added {event.document} {event.title} ({event.media_type}) to {scope}")
        finally:
            await log.close()
        return failed

    if asyncio.run(go()):
        sys.exit(1)


@knowledge.command(name="list")
@_with_scope_options
@click.option("--all", "every", is_flag=True, help="Every scope's documents.")
def list_command(guild: str, user: str, data_dir: str | None, every: bool) -> None:
    """List the documents of a knowledge base (the global one by default)."""
    from libra.processors.knowledge.documents import list_documents
    from libra.runtime.database import connect_pool

    from .stack import resolve_urls

    scope = None if every else _scope(guild, user)
    settings = _settings(data_dir)

    async def go() -> None:
        pool = await connect_pool(resolve_urls(settings).reader_url, max_size=1)
        try:
            rows = await list_documents(pool, scope)
        finally:
            await pool.close()
        for row in rows:
            state = f"not readable: {row.error}" if row.error else f"{row.chunks} chunks"
            click.echo(
                f"{row.document}  {row.scope}  {row.title}  {row.media_type}  {row.size:,} bytes"
                f"  {state}  added {row.added_at:%Y-%m-%d %H:%M} by {row.added_by}"
            )
        if not rows:
            click.echo("no documents")

    asyncio.run(go())


@knowledge.command(name="remove")
@click.argument("documents", nargs=-1, required=True)
@click.option("--data-dir", type=click.Path(file_okay=False))
def remove(documents: tuple[str, ...], data_dir: str | None) -> None:
    """Remove documents by id (as `libra knowledge list` shows them)."""
    from libra.processors.knowledge.documents import find_document, remove_document
    from libra.runtime.database import connect_pool
    from libra.runtime.documents import DocumentStore
    from libra.runtime.eventlog import EventLog

    from .stack import resolve_urls

    settings = _settings(data_dir)
    urls = resolve_urls(settings)

    async def go() -> int:
        log = await EventLog.connect(urls.nats_url, name="libra-knowledge")
        pool = await connect_pool(urls.reader_url, max_size=1)
        missing = 0
        try:
            store = await DocumentStore.open(log.js)
            for document in documents:
                row = await find_document(pool, document)
                if row is None:
                    missing += 1
                    click.echo(f"no document {document}", err=True)
                    continue
                await remove_document(log, store, row, removed_by=f"console:{getpass.getuser()}")
                click.echo(f"removed {document} {row.title} from {row.scope}")
        finally:
            await pool.close()
            await log.close()
        return missing

    if asyncio.run(go()):
        sys.exit(1)


@click.command(name="knowledge")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--sizes",
    default="10000,100000",
    show_default=True,
    help="Chunk counts the search latency is measured at.",
)
@click.option("--queries", default=200, show_default=True, help="Searches timed per size.")
def bench_knowledge(as_json: bool, sizes: str, queries: int) -> None:
    """Knowledge bases: ingestion chunks/s, search p50/p99 by size, recall@k by method."""
    from .bench.knowledge import run_bench_knowledge

    counts = [int(s) for s in sizes.split(",") if s.strip()]
    asyncio.run(
        run_bench_knowledge(_settings(None), sizes=counts, queries=queries, as_json=as_json)
    )
