"""`libra dead`: the dead letters in the log, and re-driving them once their dependency is back.

A retry goes only to the consumer that gave up (``libra.retry.<consumer>.<c>``): the others
handled the original already. A letter is retried once: one already retried is skipped here,
the retry's id is derived from the letter's, and the consumer checks the log for an answer
before it handles the original again. Re-driving is a person's decision (after an outage, or a
fix): a letter may record a bug that would only fail again, so nothing re-drives on its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import NamedTuple

from libra.contracts import CONSUMERS, LOG_STREAM, DeadLetter, DeadRetried
from libra.runtime.deadletter import retry_of
from libra.runtime.eventlog import EventLog
from libra.runtime.projection import read_log

__all__ = ["Letter", "RetryResult", "dead_letters", "retry_dead_letters"]


class Letter(NamedTuple):
    """A dead letter, and whether it was re-driven already."""

    letter: DeadLetter
    retried: bool


class RetryResult(NamedTuple):
    """What ``retry_dead_letters`` did: letters re-driven, and those left with the reason."""

    retried: list[DeadLetter]
    skipped: list[tuple[DeadLetter, str]]


async def dead_letters(
    log: EventLog, *, consumer: str = "", since: datetime | None = None
) -> list[Letter]:
    """Returns the dead letters in the log (of one consumer, from a time), oldest first."""
    tail = f"{consumer}.>" if consumer else ">"
    subjects = [f"libra.dead.{tail}", f"libra.retry.{tail}"]
    letters: dict[str, DeadLetter] = {}
    retried: set[str] = set()
    async for _, event in read_log(log, subjects, stream=LOG_STREAM, start_time=since):
        if isinstance(event, DeadLetter):
            letters.setdefault(event.id, event)
        elif isinstance(event, DeadRetried):
            retried.add(event.letter)
    return [Letter(letter, letter.id in retried) for letter in letters.values()]


async def retry_dead_letters(
    log: EventLog,
    *,
    consumer: str = "",
    since: datetime | None = None,
    ids: Iterable[str] = (),
) -> RetryResult:
    """Re-drives the selected dead letters (``ids``, or all of ``consumer`` since ``since``)."""
    wanted = set(ids)
    result = RetryResult([], [])
    for letter, retried in await dead_letters(log, consumer=consumer, since=since):
        if wanted and letter.id not in wanted:
            continue
        reason = _not_retried(letter, retried)
        if reason:
            result.skipped.append((letter, reason))
            continue
        await log.publish(retry_of(letter))
        result.retried.append(letter)
    return result


def _not_retried(letter: DeadLetter, retried: bool) -> str:
    if retried:
        return "retried already"
    spec = CONSUMERS.get(letter.consumer)
    if spec is not None and not spec.redrive:
        return f"{letter.consumer} takes no re-drives (libra projections rebuild {letter.consumer})"
    return ""
