"""``server_info``: the Discord server's public facts, read from Discord's REST API.

It is the one built-in tool given a secret: the bot's token (``DISCORD_TOKEN``), declared, so
that no other tool is handed it.
"""

from __future__ import annotations

import msgspec

from libra.tools.base import Tool, ToolContext, ToolError

__all__ = ["server_tool"]


class NoArguments(msgspec.Struct, frozen=True, kw_only=True):
    pass


async def _info(_arguments: NoArguments, context: ToolContext) -> dict[str, object]:
    token = context.secrets.get("DISCORD_TOKEN", "")
    if not token:
        raise ToolError("Libra has no Discord token here, so it cannot read the server")
    if not context.guild:
        raise ToolError("this conversation is not in a Discord server")
    import hikari  # here: every llm process loads the built-in tools, few of them call this one

    rest = hikari.RESTApp(
        http_settings=hikari.impl.HTTPSettings(),
        url=context.services.get("discord_rest_url") or None,
    )
    await rest.start()
    try:
        async with rest.acquire(token, hikari.TokenType.BOT) as client:
            guild = await client.fetch_guild(int(context.guild))
    except hikari.NotFoundError:
        raise ToolError("Discord does not know this server (or Libra has left it)") from None
    except hikari.ForbiddenError:
        raise ToolError("Discord did not let Libra read this server") from None
    finally:
        await rest.close()
    return {
        "name": guild.name,
        "description": guild.description or "",
        "members": guild.approximate_member_count,
        "online": guild.approximate_active_member_count,
        "created": guild.created_at.date().isoformat(),
        "preferred_locale": str(guild.preferred_locale),
        "boost_tier": int(guild.premium_tier),
        "boosts": guild.premium_subscription_count or 0,
        "features": sorted(str(feature) for feature in guild.features),
    }


server_tool = Tool(
    name="server_info",
    description="This Discord server's public information: name, description, member and"
    " online counts, creation date, boost level, features.",
    arguments=NoArguments,
    run=_info,
    timeout_s=5.0,
    access="servers",
    secrets=("DISCORD_TOKEN",),
)
