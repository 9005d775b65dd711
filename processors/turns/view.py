"""The Redis rate-limit view, kept from the log so that it can be rebuilt from it.

Admission's script writes each turn Redis admits into the user's window itself. This view
writes the others (``in_redis`` false: admitted from admission's own count, the person far below
the limit, or while Redis was down), from ``turn.accepted`` or, for a turn answered before its
end was certain, ``turn.confirmed``: its consumer waits Redis out, and once Redis is back the
window holds them too. It leaves the script's alone: writing them again would change nothing.
After Redis lost its data, `libra projections rebuild ratelimit-view` replays the recent turns,
all of them, and the limits hold again.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from libra.contracts import CONSUMERS, LOG_STREAM, AnyEvent, Event, TurnAccepted, TurnConfirmed
from libra.runtime.eventlog import EventLog
from libra.runtime.projection import read_log

from .ratelimit import RateLimiter

__all__ = ["RateLimitView", "counted_ms", "rebuild_rate_limits"]


def counted_ms(event: AnyEvent) -> int | None:
    """The time (ms) an admitted turn counts at in its user's window; None if it does not."""
    match event:
        case TurnAccepted(speculative=False) | TurnConfirmed():
            return int((event.received_at or event.at).timestamp() * 1000)
    return None


class RateLimitView:
    """Records each turn that Redis's script did not count in its user's window (a speculative
    one once confirmed)."""

    spec = CONSUMERS["ratelimit-view"]

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    async def handle(self, event: AnyEvent) -> list[Event]:
        """Writes Redis, emits no events."""
        at_ms = counted_ms(event)
        # (``degraded`` says it of decisions logged before they said ``in_redis``)
        if at_ms is not None and (not event.in_redis or "redis" in event.degraded):
            await self.limiter.record(event.user, event.turn, at_ms)
        return []


async def rebuild_rate_limits(log: EventLog, limiter: RateLimiter) -> int:
    """Replays the turns admitted within the last windows into Redis; returns how many."""
    since = datetime.now(UTC) - timedelta(milliseconds=limiter.window_ms * 10)
    count = 0
    async for _, event in read_log(
        log, RateLimitView.spec.subjects, stream=LOG_STREAM, start_time=since
    ):
        if (at_ms := counted_ms(event)) is not None:
            await limiter.record(event.user, event.turn, at_ms)
            count += 1
    return count
