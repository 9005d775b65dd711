"""Puts one speaker's packets back in sequence order within a small window."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .rtp import seq_distance

__all__ = ["JitterBuffer", "Late"]

T = TypeVar("T")

# A gap longer than this is a pause or a restarted stream, not loss to conceal frame by frame.
_MAX_CONCEALED = 5


class Late(Exception):
    """A packet that came after its turn (``reason``: "late" or "duplicate")."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class JitterBuffer(Generic[T]):
    """Releases packets in order; waits for a missing one while at most ``depth`` are held.

    A packet that is next in order goes straight out, so the buffer adds no delay while nothing
    is lost or reordered. ``None`` in the output stands for a lost packet, to be concealed.
    """

    depth: int
    expected: int | None = None
    held: dict[int, tuple[float, T]] = field(default_factory=dict)

    def check(self, seq: int) -> None:
        """Raises Late for a packet whose turn has passed or that is held already."""
        if self.expected is not None and seq_distance(seq, self.expected) < 0:
            raise Late("late")
        if seq in self.held:
            raise Late("duplicate")

    def push(self, seq: int, item: T, now: float) -> list[T | None]:
        """Adds a packet; returns what is now in order. Raises Late for one already past."""
        self.check(seq)
        if self.expected is None:
            self.expected = seq
        self.held[seq] = (now, item)
        out = self._release()
        if len(self.held) > self.depth:
            out.extend(self._skip_gap())
        return out

    def expire(self, now: float, max_wait: float) -> list[T | None]:
        """Gives up on a missing packet that held ones have waited for longer than max_wait."""
        out: list[T | None] = []
        while self.held and min(at for at, _ in self.held.values()) <= now - max_wait:
            out.extend(self._skip_gap())
        return out

    def reset(self) -> None:
        """Forgets the order (after a pause the next packet starts afresh)."""
        self.expected = None
        self.held.clear()

    def _release(self) -> list[T | None]:
        out: list[T | None] = []
        while self.expected in self.held:
            out.append(self.held.pop(self.expected)[1])
            self.expected = (self.expected + 1) & 0xFFFF
        return out

    def _skip_gap(self) -> list[T | None]:
        """Declares the packets before the earliest held one lost, then releases in order."""
        nearest = min(self.held, key=lambda s: seq_distance(s, self.expected))
        missing = seq_distance(nearest, self.expected)
        self.expected = nearest
        return [None] * min(missing, _MAX_CONCEALED) + self._release()
