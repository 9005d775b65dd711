"""What every moderation engine answers, and the categories they are mapped to.

An engine (OpenAI's moderation endpoint, Llama Guard on Groq, the word list) reads one text and
answers a :class:`Verdict` in Libra's own categories, whatever its vendor calls them, so that
policies, events and dashboards speak one language.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from libra.runtime.config import Settings

__all__ = ["CATEGORIES", "ModerationEngine", "ModerationUnavailable", "Verdict", "engine_names"]

# Libra's categories: OpenAI's moderation categories, coarsened; Llama Guard's S1-S14 map onto
# them (see the engines).
CATEGORIES = (
    "harassment",
    "hate",
    "illicit",
    "self_harm",
    "sexual",
    "sexual_minors",
    "violence",
    "blocked_word",
)


@dataclass(frozen=True)
class Verdict:
    """One engine's answer for one text."""

    flagged: bool
    categories: tuple[str, ...] = ()  # the flagged ones, from CATEGORIES
    scores: dict[str, float] = field(default_factory=dict)  # category -> 0..1, where known
    engine: str = ""
    latency_ms: float = 0.0


class ModerationUnavailable(Exception):
    """The engine could not answer (timeout, HTTP error, garbage): the next one is asked."""


class ModerationEngine(Protocol):
    name: str
    # The categories a clean verdict of this engine vouches for (the word list: blocked words
    # only), so that a fail-closed policy knows what is still unjudged when others are down.
    covers: frozenset[str]

    async def check(self, text: str) -> Verdict:
        """The verdict on ``text``; raises :class:`ModerationUnavailable` when it cannot say."""
        ...


def engine_names(settings: Settings) -> list[str]:
    """``MODERATION_ENGINES``; unset, the word list alone. A classifier is the owner's choice,
    not a key's side effect: it sends every message to one more vendor, and adds its round trip
    to every turn."""
    names = [n.strip() for n in settings.moderation_engines.split(",") if n.strip()]
    return names or ["words"]
