"""A server's moderation policy: which categories it acts on, at what scores, where it is told.

A server's admins set it with ``/moderation``; each change is a ``session.settings`` event in
the server's scope (``guild:<id>``), under three keys:

- ``moderation.categories``: the classifier categories the server refuses, comma-separated;
  unset, all of them. The operator's word list (``blocked_word``) always applies.
- ``moderation.thresholds``: ``category=score`` pairs. A category with a threshold is flagged
  when the engine's score for it reaches the threshold, whatever the engine decided itself
  (lower: stricter, higher: more lenient); without a score (Llama Guard, the fail policy) the
  engine's own decision stands.
- ``moderation.log``: the channel where flagged messages are reported, with a link and never
  the text.

The classifier is asked once per input, whatever the policy; :meth:`ServerPolicy.judge` turns
its verdict into the server's decision, which the turn records with the policy it applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace

from libra.contracts import Moderation, Origin
from libra.runtime.sessions import SessionView

from .base import CATEGORIES, Verdict

__all__ = [
    "CATEGORIES_KEY",
    "DEFAULT_POLICY",
    "LOG_KEY",
    "POLICY_PREFIX",
    "THRESHOLDS_KEY",
    "PolicyError",
    "ServerPolicies",
    "ServerPolicy",
    "format_thresholds",
    "parse_categories",
    "parse_thresholds",
]

log = logging.getLogger("libra.moderation")

POLICY_PREFIX = "moderation."
CATEGORIES_KEY = "moderation.categories"
THRESHOLDS_KEY = "moderation.thresholds"
LOG_KEY = "moderation.log"

# What a server may choose among: the operator's word list is not the server's to switch off.
SERVER_CATEGORIES = tuple(c for c in CATEGORIES if c != "blocked_word")


class PolicyError(ValueError):
    """A policy value that cannot be read; its message says what is expected."""


def parse_categories(value: str) -> frozenset[str]:
    """``"hate, violence"`` as categories; ``""`` or ``"all"``: every one; ``"none"``: none
    (the word list alone)."""
    names = {n.strip().lower().replace("-", "_") for n in value.split(",") if n.strip()}
    if not names or names == {"all"}:
        return frozenset(SERVER_CATEGORIES)
    if names == {"none"}:
        return frozenset()
    unknown = sorted(names - set(SERVER_CATEGORIES))
    if unknown:
        raise PolicyError(
            f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}"
            f" (choose from {', '.join(SERVER_CATEGORIES)}; or all, or none)"
        )
    return frozenset(names)


def parse_thresholds(value: str) -> dict[str, float]:
    """``"violence=0.8, hate=0.3"`` as category -> score between 0 and 1."""
    found: dict[str, float] = {}
    for pair in (p.strip() for p in value.split(",")):
        if not pair:
            continue
        name, eq, score = pair.partition("=")
        name = name.strip().lower()
        try:
            number = float(score)
        except ValueError:
            number = math.nan
        if not eq or name not in SERVER_CATEGORIES or not 0.0 <= number <= 1.0:
            raise PolicyError(f"{pair!r} is not category=score with a score from 0 to 1")
        found[name] = number
    return found


def format_thresholds(thresholds: Mapping[str, float]) -> str:
    """The ``moderation.thresholds`` value of ``thresholds``, in category order."""
    return ",".join(f"{c}={thresholds[c]:g}" for c in SERVER_CATEGORIES if c in thresholds)


@dataclass(frozen=True)
class ServerPolicy:
    """What one server refuses. The default: every category, at the engines' own judgement."""

    categories: frozenset[str] = frozenset(SERVER_CATEGORIES)
    thresholds: Mapping[str, float] = field(default_factory=dict)
    log_channel: str = ""
    scope: str = ""  # whose it is ("guild:1"); "" for the default

    @classmethod
    def from_settings(cls, scope: str, settings: Mapping[str, str]) -> ServerPolicy:
        """The policy the ``moderation.*`` settings of ``scope`` describe. A value that does not
        parse (written by hand into the log, say) leaves that part at its default."""
        policy = cls(scope=scope, log_channel=settings.get(LOG_KEY, "").strip())
        with contextlib.suppress(PolicyError):
            policy = replace(policy, categories=parse_categories(settings.get(CATEGORIES_KEY, "")))
        with contextlib.suppress(PolicyError):
            policy = replace(policy, thresholds=parse_thresholds(settings.get(THRESHOLDS_KEY, "")))
        return policy

    @classmethod
    def in_view(cls, view: SessionView, scope: str) -> ServerPolicy:
        """The policy of ``scope`` as ``view`` holds its settings."""
        return cls.from_settings(scope, view.settings(scope, POLICY_PREFIX))

    @property
    def is_default(self) -> bool:
        return self.categories == frozenset(SERVER_CATEGORIES) and not self.thresholds

    def judge(self, verdict: Verdict) -> tuple[str, ...]:
        """The categories this server refuses ``verdict``'s text for, in category order."""
        flagged = []
        for category in CATEGORIES:
            if category != "blocked_word" and category not in self.categories:
                continue
            threshold = self.thresholds.get(category)
            score = verdict.scores.get(category)
            if threshold is not None and score is not None:
                hit = score >= threshold
            else:
                hit = category in verdict.categories
            if hit:
                flagged.append(category)
        return tuple(flagged)

    def decide(self, verdict: Verdict) -> Moderation:
        """The decision on ``verdict``'s text as a turn or a reply records it: the categories
        this server refuses it for, with the engine's scores and the policy applied."""
        categories = self.judge(verdict)
        return Moderation(
            engine=verdict.engine,
            flagged=bool(categories),
            categories=categories,
            scores=dict(verdict.scores),
            latency_ms=verdict.latency_ms,
            policy=self.describe(),
        )

    def describe(self) -> str:
        """The policy in one line, as a turn records it: ``""`` for the default."""
        if self.is_default:
            return ""
        parts = [self.scope or "default"]
        if self.categories != frozenset(SERVER_CATEGORIES):
            shown = [c for c in SERVER_CATEGORIES if c in self.categories]
            parts.append(f"categories={','.join(shown) or 'none'}")
        if self.thresholds:
            parts.append(f"thresholds={format_thresholds(self.thresholds)}")
        return " ".join(parts)


DEFAULT_POLICY = ServerPolicy()


class ServerPolicies:
    """Each server's policy, from a view of the session settings started on first need.

    Until the view has read the settings (``wait_s`` at most, on the first Discord input after a
    start), and for every other platform, the default policy applies.
    """

    def __init__(self, start_view: Callable[[], Awaitable[SessionView]], *, wait_s: float = 3.0):
        self._start_view = start_view
        self.wait_s = wait_s
        self._view: asyncio.Task[SessionView] | None = None

    async def of(self, origin: Origin) -> ServerPolicy:
        """The policy of the server ``origin`` is in."""
        if origin.platform != "discord" or not origin.guild:
            return DEFAULT_POLICY
        if self._view is None:
            self._view = asyncio.create_task(self._start_view(), name="moderation-policies")
        started = self._view
        if not started.done():  # only until the view has read the settings once
            await asyncio.wait([started], timeout=self.wait_s)
        if not started.done():
            log.warning("server moderation policies not read yet; the default one applies")
            return DEFAULT_POLICY
        if started.cancelled() or started.exception() is not None:
            why = "cancelled" if started.cancelled() else repr(started.exception())
            log.warning("server moderation policies unreadable (%s); the default applies", why)
            self._view = None  # the next input starts it again
            return DEFAULT_POLICY
        return ServerPolicy.in_view(started.result(), f"guild:{origin.guild}")
