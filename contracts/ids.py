"""Event ids: time-ordered, 26 characters of Crockford base32 (the ULID layout).

The first 10 characters encode the millisecond timestamp, so ids sort by time; the last 16 are
random for new events and a hash for derived ones. A processor derives its outputs' ids from its
input's id, so a redelivered input yields the same ids and JetStream's duplicate window drops the
copies.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from datetime import UTC, datetime

__all__ = ["derive_id", "id_time", "is_id", "new_id", "stable_id"]

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]  # 10 bits -> 2 characters
_INDEX = {c: i for i, c in enumerate(_ALPHABET)}
_SHAPE = re.compile(f"[{_ALPHABET}]{{26}}")
_prefix_cache: tuple[int, str] = (-1, "")


def _b32_50(v: int) -> str:
    """Ten characters for a 50-bit value (the millisecond timestamp, top bits zero)."""
    p = _PAIRS
    return (
        p[v >> 40 & 1023] + p[v >> 30 & 1023] + p[v >> 20 & 1023] + p[v >> 10 & 1023] + p[v & 1023]
    )


def _b32_80(v: int) -> str:
    """Sixteen characters for an 80-bit value (random or hashed)."""
    return _b32_50(v >> 30) + _PAIRS[v >> 20 & 1023] + _PAIRS[v >> 10 & 1023] + _PAIRS[v & 1023]


def _time_prefix(ms: int) -> str:
    global _prefix_cache
    if _prefix_cache[0] != ms:
        _prefix_cache = (ms, _b32_50(ms))
    return _prefix_cache[1]


def new_id(*, at_ms: int | None = None) -> str:
    """Returns a new time-ordered id for the current (or given) millisecond."""
    ms = time.time_ns() // 1_000_000 if at_ms is None else at_ms
    # `random` reseeds itself in a forked child, and ids need uniqueness, not secrecy.
    return _time_prefix(ms) + _b32_80(random.getrandbits(80))


def derive_id(parent: str, key: str) -> str:
    """Returns the id of the output named ``key`` of the event ``parent``; always the same."""
    digest = hashlib.blake2b(f"{parent}/{key}".encode(), digest_size=10).digest()
    return parent[:10] + _b32_80(int.from_bytes(digest, "big"))


def stable_id(key: str, at_ms: int) -> str:
    """Returns the id of an input known outside Libra (a Discord message, an idempotency key).

    Two gateways that receive the same platform message make the same id, so the log keeps one.
    """
    digest = hashlib.blake2b(key.encode(), digest_size=10).digest()
    return _time_prefix(at_ms) + _b32_80(int.from_bytes(digest, "big"))


def is_id(value: str) -> bool:
    """Tells whether ``value`` has the shape of an event id."""
    return _SHAPE.fullmatch(value) is not None


def id_time(value: str) -> datetime:
    """Returns the UTC time encoded in an id's first ten characters."""
    ms = 0
    for c in value[:10]:
        ms = ms * 32 + _INDEX[c]
    return datetime.fromtimestamp(ms / 1000, tz=UTC)
