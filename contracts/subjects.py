"""Subject names: ``libra.<domain>.<event>.<conversation>``, the one place that spells them.

A conversation is one NATS token: the platform and its ids joined with ``-`` (``discord-1-2``,
``http-alice``). Anything a token may not hold (dots, spaces, ``*``, ``>``, control characters,
non-ASCII) is escaped as ``~XX`` per UTF-8 byte, so distinct ids never collide and the original
can be read back.
"""

from __future__ import annotations

import hashlib
import re
from typing import NamedTuple

__all__ = [
    "PREFIX",
    "SubjectError",
    "SubjectParts",
    "conversation_id",
    "parse_subject",
    "safe_token",
    "subject",
    "unescape_token",
]

PREFIX = "libra"
MAX_TOKEN = 200
_SAFE = re.compile(r"[A-Za-z0-9_-]")
_ESCAPED = re.compile(r"~([0-9A-F]{2})")


class SubjectError(ValueError):
    """A subject or conversation token that does not follow Libra's naming."""


class SubjectParts(NamedTuple):
    domain: str
    event: str
    conversation: str


def safe_token(value: str) -> str:
    """Returns ``value`` as a NATS-safe token; long values keep a readable head and a hash."""
    if not value:
        raise SubjectError("a subject token cannot be empty")
    out = []
    for ch in value:
        if _SAFE.fullmatch(ch):
            out.append(ch)
        else:
            out.extend(f"~{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    token = "".join(out)
    if len(token) > MAX_TOKEN:
        digest = hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
        head = re.sub(r"~[0-9A-F]?$", "", token[: MAX_TOKEN - 18])  # never split an escape
        token = f"{head}~~{digest}"
    return token


def unescape_token(token: str) -> str:
    """Reverses :func:`safe_token` (a hashed long token keeps its hash)."""
    out = bytearray()
    i = 0
    while i < len(token):
        match = _ESCAPED.match(token, i)
        if match:
            out.append(int(match.group(1), 16))
            i = match.end()
        else:
            out.extend(token[i].encode())
            i += 1
    return out.decode("utf-8", "replace")


def conversation_id(platform: str, *parts: str | int) -> str:
    """Returns the conversation token for a platform and its ids, e.g. ``discord-123-456``."""
    ids = [safe_token(str(p)).replace("-", "~2D") for p in parts if str(p) != ""]
    return "-".join([safe_token(platform), *ids])


def subject(domain: str, event: str, conversation: str) -> str:
    """Returns the subject for one event of one conversation."""
    for name, token in (("domain", domain), ("event", event), ("conversation", conversation)):
        if not token or not all(_SAFE.fullmatch(c) or c == "~" for c in token):
            raise SubjectError(f"{name} {token!r} is not a safe subject token")
    return f"{PREFIX}.{domain}.{event}.{conversation}"


def parse_subject(value: str) -> SubjectParts:
    """Splits a Libra subject into domain, event and conversation."""
    tokens = value.split(".")
    if len(tokens) != 4 or tokens[0] != PREFIX or not all(tokens):
        raise SubjectError(f"{value!r} is not a subject of the form libra.<domain>.<event>.<c>")
    return SubjectParts(tokens[1], tokens[2], tokens[3])
