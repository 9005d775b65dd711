"""Event ids: time-ordered, 26 characters of Crockford base32 (the ULID layout).

The first 10 characters encode the millisecond timestamp, so ids sort by time; the last 16 are
random for new events and a hash for derived ones. A processor derives its outputs' ids from its
input's id, so a redelivered input yields the same ids and JetStream's duplicate window drops the
copies.
"""

from __future__ import annotations

import hashlib
import os
import time
from datetime import UTC, datetime

__all__ = ["derive_id", "id_time", "is_id", "new_id"]

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_INDEX = {c: i for i, c in enumerate(_ALPHABET)}


def _b32(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_id(*, at_ms: int | None = None) -> str:
    """Returns a new time-ordered id for the current (or given) millisecond."""
    ms = time.time_ns() // 1_000_000 if at_ms is None else at_ms
    return _b32(ms, 10) + _b32(int.from_bytes(os.urandom(10), "big"), 16)


def derive_id(parent: str, key: str) -> str:
    """Returns the id of the output named ``key`` of the event ``parent``; always the same."""
    digest = hashlib.blake2b(f"{parent}/{key}".encode(), digest_size=10).digest()
    return parent[:10] + _b32(int.from_bytes(digest, "big"), 16)


def is_id(value: str) -> bool:
    """Tells whether ``value`` has the shape of an event id."""
    return len(value) == 26 and all(c in _INDEX for c in value)


def id_time(value: str) -> datetime:
    """Returns the UTC time encoded in an id's first ten characters."""
    ms = 0
    for c in value[:10]:
        ms = ms * 32 + _INDEX[c]
    return datetime.fromtimestamp(ms / 1000, tz=UTC)
