"""People: a user id is ``<platform>:<the platform's own id>`` everywhere in Libra.

An HTTP user ``123`` and the Discord user ``123`` are two people (``http:123``, ``discord:123``):
events, tables, rate limits and the history route all use the namespaced id. Only the edges
see a platform's raw id: they namespace it on the way in (:func:`user_id`) and read it back
(:func:`raw_user`) on the way out. Events written before namespacing carry raw ids; reading
them (``decode_event``) gives them their origin's platform.
"""

from __future__ import annotations

__all__ = ["PLATFORMS", "platform_of", "raw_user", "user_id"]

# the platforms people talk to Libra on
PLATFORMS = frozenset({"discord", "http", "web", "console"})


def user_id(platform: str, raw: str) -> str:
    """Returns the id of the person ``raw`` of ``platform``, e.g. ``discord:123``."""
    if not platform or ":" in platform:
        raise ValueError(f"platform {platform!r} cannot name users")
    if not raw:
        raise ValueError("a user id needs the platform's id of the person")
    return f"{platform}:{raw}"


def raw_user(user: str) -> str:
    """Returns the platform's own id of a person (``discord:123`` -> ``123``)."""
    return user.split(":", 1)[-1]


def platform_of(user: str) -> str:
    """Returns the platform of a person (``discord:123`` -> ``discord``); "" for a raw id."""
    platform, colon, _ = user.partition(":")
    return platform if colon else ""
