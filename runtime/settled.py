"""Whether the log already holds a processor's answer to an input: never pay a provider twice.

Outputs always come after their input in the stream, on their conversation's subject, with ids
derived from the input's (``derive_id(input.id, key)``). So an input is settled when a direct get
of the next messages on the output subjects after the input's sequence finds one with that id.
Only suspect deliveries are looked up (a redelivery, an input older than its consumer, a dead
letter re-driven): the first delivery of a new input costs nothing more.
"""

from __future__ import annotations

from collections import defaultdict

from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError
from prometheus_client import Counter

from libra.contracts import (
    PREFIX,
    AnyEvent,
    ConsumerSpec,
    EventDecodeError,
    decode_event,
    derive_id,
)

__all__ = ["SETTLED_SKIPPED", "settled"]

SETTLED_SKIPPED = Counter(
    "libra_consumer_settled_skipped_total",
    "Suspect deliveries whose answer the log already held: acked without handling",
    ["consumer"],
)

# How many later outputs of the same conversation are looked through: far more than the turns
# of one conversation in flight at once.
SCAN_LIMIT = 256


async def settled(js: JetStreamContext, spec: ConsumerSpec, seq: int, event: AnyEvent) -> bool:
    """Whether an output that settles ``event`` (at stream ``seq``) is in the log after it."""
    if not spec.settled_by:
        return False
    wanted = derive_id(event.id, spec.settled_key) if spec.settled_key else None
    for filter_subject, names in _filters(spec.settled_by, event.conversation).items():
        after = seq
        for _ in range(SCAN_LIMIT):
            try:
                raw = await js.get_msg(
                    spec.stream, seq=after + 1, subject=filter_subject, next=True, direct=True
                )
            except NotFoundError:
                break
            if raw.subject.split(".")[2] in names and _settles(raw, event, wanted):
                return True
            after = raw.seq
    return False


def _filters(outputs: tuple[str, ...], conversation: str) -> dict[str, set[str]]:
    """One subject filter per domain: ``libra.llm.*.<c>`` for llm.completed and llm.failed."""
    by_domain: dict[str, set[str]] = defaultdict(set)
    for name in outputs:
        domain, event = name.split(".")
        by_domain[domain].add(event)
    filters = {}
    for domain, events in by_domain.items():
        token = next(iter(events)) if len(events) == 1 else "*"
        filters[f"{PREFIX}.{domain}.{token}.{conversation}"] = events
    return filters


def _settles(raw: RawStreamMsg, event: AnyEvent, wanted: str | None) -> bool:
    if wanted is not None:
        return (raw.headers or {}).get("Nats-Msg-Id") == wanted
    try:  # no derivation key: the output caused by the input that says it is the last one
        out = decode_event(raw.data or b"")
    except EventDecodeError:
        return False
    return out.causation == event.id and bool(getattr(out, "final", False))
