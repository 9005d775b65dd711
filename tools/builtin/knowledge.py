"""``knowledge_search``: searches the knowledge bases the conversation may read."""

from __future__ import annotations

from typing import Annotated

import asyncpg
import msgspec

from libra.tools.base import Tool, ToolContext, ToolError

__all__ = ["knowledge_tool"]


class SearchArguments(msgspec.Struct, frozen=True, kw_only=True):
    query: Annotated[str, msgspec.Meta(min_length=1, max_length=500, description="What to find")]
    k: Annotated[int, msgspec.Meta(ge=1, le=10, description="How many passages")] = 4


async def _search(arguments: SearchArguments, context: ToolContext) -> str:
    search = context.services.get("knowledge")
    if search is None:
        raise ToolError("no knowledge base is configured here")
    try:
        chunks = await search.search(arguments.query, list(context.scopes), k=arguments.k)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        # the database is down (or restarting): a readable answer, and the next call tries again
        raise ToolError("the knowledge bases cannot be read just now; try again shortly") from None
    if not chunks:
        return "nothing in this conversation's knowledge bases matches"
    return "\n\n".join(f"[{chunk.title or chunk.document}]\n{chunk.text}" for chunk in chunks)


knowledge_tool = Tool(
    name="knowledge_search",
    description="Searches this server's, this person's and the global knowledge bases (rules,"
    " FAQ, guides) and returns the passages that best match the query, with their titles.",
    arguments=SearchArguments,
    run=_search,
    timeout_s=5.0,
)
