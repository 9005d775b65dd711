"""A server's knowledge base on Discord: /learn (a file), /knowledge list, /knowledge remove.

Each acts on the server's own scope (``guild:<id>``) and only on it: its admins (Manage Server)
never see nor remove another server's documents, a person's or the global ones. /learn refuses a
file by its declared type and size before fetching it, reads it as ``libra knowledge add`` and
``POST /api/knowledge`` do (:func:`~libra.processors.knowledge.documents.add_document`: a
document that cannot be read leaves nothing behind), then waits a few seconds for the knowledge
projection to chunk it, so the answer can say how many chunks it made. Answers are ephemeral.
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg
import hikari
import lightbulb

from libra.contracts import user_id
from libra.processors.knowledge.documents import (
    DocumentRow,
    Limits,
    add_document,
    find_document,
    list_documents,
    remove_document,
)
from libra.processors.knowledge.parsing import DocumentRejected, media_type
from libra.runtime.documents import DocumentStore
from libra.runtime.eventlog import EventLog

from .attachments import FileTooLarge, download
from .commands import SlashCommands
from .split import MESSAGE_LIMIT
from .strings import say

__all__ = ["KNOWLEDGE_COMMANDS", "KnowledgeCommands", "register_knowledge_commands"]

log = logging.getLogger("libra.discord.commands")
INJECTED = lightbulb.di.INJECTED

_READ_WITHIN_S = 10.0  # how long /learn waits for the projection before it answers without
_READ_POLL_S = 0.2
_CHOICES = 25  # Discord shows at most 25 autocomplete choices


class KnowledgeCommands:
    """What /learn and /knowledge do: check the server and the rights, then add, list, remove."""

    def __init__(
        self, log_: EventLog, pool: asyncpg.Pool, slash: SlashCommands, *, limits: Limits
    ) -> None:
        self.log = log_
        self.pool = pool
        self.slash = slash  # its checks (may talk here, a server, an admin) are the same
        self.limits = limits
        self._store: DocumentStore | None = None

    async def store(self) -> DocumentStore:
        if self._store is None:
            self._store = await DocumentStore.open(self.log.js)
        return self._store

    async def learn(self, ctx: lightbulb.Context, *, file: hikari.Attachment, title: str) -> None:
        """Adds ``file`` to the server's knowledge base, named ``title`` (else its file name)."""
        if (scope := await self.slash.server_scope(ctx, admin=True)) is None:
            return
        locale = str(ctx.interaction.locale)
        refusal = self._refusal(file, locale)
        if refusal:
            await ctx.respond(refusal, ephemeral=True)
            return
        await ctx.defer(ephemeral=True)  # fetching, storing and reading take more than 3 s
        try:
            data = await download(file, max_bytes=self.limits.max_bytes)
        except FileTooLarge:
            await ctx.respond(self._too_big(None, locale), ephemeral=True)
            return
        except (TimeoutError, hikari.HTTPError, OSError) as exc:
            log.warning("could not download %s for /learn: %r", file.filename, exc)
            await ctx.respond(say("learn.download", locale), ephemeral=True)
            return
        try:
            added = await add_document(
                self.log,
                await self.store(),
                name=file.filename,
                title=title,
                data=data,
                scope=scope,
                added_by=user_id("discord", str(ctx.user.id)),
                limits=self.limits,
                content_type=file.media_type or "",
            )
        except DocumentRejected as exc:
            await ctx.respond(say("learn.bad", locale, error=exc), ephemeral=True)
            return
        row = await self._projected(added.document)
        values = {"title": _bold(added.title), "document": added.document}
        if row is None:
            text = say("learn.pending", locale, **values)
        elif row.error:
            text = say("learn.unread", locale, error=row.error, **values)
        else:
            text = say("learn.added", locale, chunks=_chunks(row.chunks, locale), **values)
        await ctx.respond(text, ephemeral=True)

    async def listed(self, ctx: lightbulb.Context) -> None:
        """The server's documents, oldest first, as many as one message holds."""
        if (scope := await self.slash.server_scope(ctx, admin=True)) is None:
            return
        locale = str(ctx.interaction.locale)
        rows = await list_documents(self.pool, scope)
        if not rows:
            await ctx.respond(say("knowledge.empty", locale), ephemeral=True)
            return
        head = say("knowledge.listed", locale, count=len(rows), lines="")
        lines: list[str] = []
        room = MESSAGE_LIMIT - len(head) - 40  # and the "... and N more" line
        for row in rows:
            line = _line(row, locale)
            if len(line) + 1 > room:
                lines.append(say("knowledge.more", locale, count=len(rows) - len(lines)))
                break
            lines.append(line)
            room -= len(line) + 1
        text = say("knowledge.listed", locale, count=len(rows), lines="\n".join(lines))
        await ctx.respond(text, ephemeral=True)

    async def remove(self, ctx: lightbulb.Context, *, document: str) -> None:
        """Removes one of the server's documents; any other id is unknown here."""
        if (scope := await self.slash.server_scope(ctx, admin=True)) is None:
            return
        locale = str(ctx.interaction.locale)
        document = document.strip()
        row = await find_document(self.pool, document) if document else None
        if row is None or row.scope != scope:  # another's document is as unknown as none
            shown = document.replace("`", "")[:100]
            await ctx.respond(say("knowledge.unknown", locale, document=shown), ephemeral=True)
            return
        await remove_document(
            self.log, await self.store(), row, removed_by=user_id("discord", str(ctx.user.id))
        )
        text = say("knowledge.removed", locale, title=_bold(row.title), document=row.document)
        await ctx.respond(text, ephemeral=True)

    async def suggest(self, ctx: lightbulb.AutocompleteContext[str]) -> None:
        """The server's documents whose title or id holds what was typed (admins only)."""
        interaction = ctx.interaction
        member = interaction.member
        if interaction.guild_id is None or member is None:
            await ctx.respond([])
            return
        roles = [str(r) for r in member.role_ids]
        if not self.slash.access.is_admin(member.permissions, roles):
            await ctx.respond([])
            return
        typed = str(ctx.focused.value or "").strip().lower()
        rows = await list_documents(self.pool, f"guild:{interaction.guild_id}")
        found = [r for r in rows if typed in r.title.lower() or typed in r.document.lower()]
        await ctx.respond([(_choice(r), r.document) for r in found[-_CHOICES:]])

    def _refusal(self, file: hikari.Attachment, locale: str) -> str:
        """Why ``file`` is refused before it is fetched (its type, its size), or ""."""
        try:
            media_type(file.filename, file.media_type or "")
        except DocumentRejected:
            return say("learn.type", locale, name=file.filename.replace("`", "")[:100])
        if file.size > self.limits.max_bytes:
            return self._too_big(file.size, locale)
        if file.size == 0:
            return say("learn.empty", locale)
        return ""

    def _too_big(self, size: int | None, locale: str) -> str:
        limit = _size(self.limits.max_bytes)
        if size is None:  # more came than Discord said
            return say("learn.too_big.unsaid", locale, limit=limit)
        return say("learn.too_big", locale, size=_size(size), limit=limit)

    async def _projected(self, document: str) -> DocumentRow | None:
        """The document as the knowledge projection lists it, once it has read it (or None)."""
        deadline = time.monotonic() + _READ_WITHIN_S
        while True:
            row = await find_document(self.pool, document)
            if row is not None or time.monotonic() >= deadline:
                return row
            await asyncio.sleep(_READ_POLL_S)


def _line(row: DocumentRow, locale: str) -> str:
    values = {"document": row.document, "title": _bold(row.title)}
    if row.error:
        return say("knowledge.line.unread", locale, error=row.error[:200], **values)
    chunks = _chunks(row.chunks, locale)
    return say("knowledge.line", locale, chunks=chunks, size=_size(row.size), **values)


def _chunks(count: int, locale: str) -> str:
    return say("chunk", locale) if count == 1 else say("chunks", locale, count=count)


def _choice(row: DocumentRow) -> str:
    """An autocomplete choice's name: at most 100 characters."""
    return f"{row.title[:70]} ({row.document})"[:100]


def _bold(title: str) -> str:
    """A title inside ``**``: asterisks would end it early."""
    return title.replace("*", "∗")


def _size(size: int) -> str:
    if size >= 1_048_576:
        return f"{size / 1_048_576:.1f} MB"
    if size >= 1024:
        return f"{size / 1024:.0f} KB"
    return f"{size} B"


# --- the commands as Discord sees them ------------------------------------------------------

_ADMIN = hikari.Permissions.MANAGE_GUILD  # shown to admins; the servers may change it


class Learn(
    lightbulb.SlashCommand,
    name="learn",
    description="learn.desc",
    localize=True,
    default_member_permissions=_ADMIN,
):
    file = lightbulb.attachment("learn.file", "learn.file.desc", localize=True)
    title = lightbulb.string(
        "learn.title", "learn.title.desc", default="", max_length=100, localize=True
    )

    @lightbulb.invoke
    async def invoke(self, ctx: lightbulb.Context, run: KnowledgeCommands = INJECTED) -> None:
        await run.learn(ctx, file=self.file, title=self.title)


knowledge = lightbulb.Group(
    "knowledge", "knowledge.desc", localize=True, default_member_permissions=_ADMIN
)


@knowledge.register
class KnowledgeList(
    lightbulb.SlashCommand, name="knowledge.list", description="knowledge.list.desc", localize=True
):
    @lightbulb.invoke
    async def invoke(self, ctx: lightbulb.Context, run: KnowledgeCommands = INJECTED) -> None:
        await run.listed(ctx)


async def _suggest(
    ctx: lightbulb.AutocompleteContext[str], run: KnowledgeCommands = INJECTED
) -> None:
    await run.suggest(ctx)


@knowledge.register
class KnowledgeRemove(
    lightbulb.SlashCommand,
    name="knowledge.remove",
    description="knowledge.remove.desc",
    localize=True,
):
    document = lightbulb.string(
        "knowledge.remove.document",
        "knowledge.remove.document.desc",
        max_length=100,
        autocomplete=_suggest,
        localize=True,
    )

    @lightbulb.invoke
    async def invoke(self, ctx: lightbulb.Context, run: KnowledgeCommands = INJECTED) -> None:
        await run.remove(ctx, document=self.document)


KNOWLEDGE_COMMANDS = (Learn, knowledge)


def register_knowledge_commands(client: lightbulb.Client, commands: KnowledgeCommands) -> None:
    """Registers /learn and /knowledge on a lightbulb client, with ``commands`` doing their work."""
    registry = client.di.registry_for(lightbulb.di.Contexts.DEFAULT)
    registry.register_value(KnowledgeCommands, commands)
    for command in KNOWLEDGE_COMMANDS:
        client.register(command)
