"""Chat mode per channel and settings per server, as a component needs them for every input.

The Discord gateway (chat mode, model, persona, the moderation log channel) and admission (each
server's moderation policy) read them on every message, so they keep them in memory: at start the
view reads the sessions projection (``chat_channels``, ``settings``) and the projection's
checkpoint in one snapshot, then follows ``libra.session.>`` in the log from just after that
checkpoint: the events the projection has not folded yet, and every one after. Both are applied
last-writer-wins by (time, id), as the projection does, so the order they arrive in does not
matter and a restart finds what it knew.

With PostgreSQL out of reach at start, the view reads every session event in the log instead:
the same state unless ``LIBRA_LOG_MAX_AGE`` has aged some out, which beats not starting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime

import asyncpg
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from libra.contracts import (
    CONSUMERS,
    LOG_STREAM,
    AnyEvent,
    EventDecodeError,
    SessionChat,
    SessionSettings,
    decode_event,
)
from libra.runtime.eventlog import EventLog

__all__ = ["SessionView"]

log = logging.getLogger("libra.sessions")

_Stamp = tuple[datetime, str]
_CAUGHT_UP_WAIT_S = 10.0
_LOAD_WITHIN_S = 5.0


class SessionView:
    """Which conversations are in chat mode, and each scope's settings (model, persona)."""

    def __init__(self, log_: EventLog, pool: asyncpg.Pool | None) -> None:
        """``pool`` reads the projection's snapshot; None: the log alone is read."""
        self.log = log_
        self.pool = pool
        self._chat: dict[str, tuple[bool, _Stamp]] = {}
        self._settings: dict[str, dict[str, tuple[str, _Stamp]]] = {}  # scope -> key -> value
        self._sub = None
        self._caught_up = asyncio.Event()

    async def start(self) -> None:
        """Loads the projection, then follows the log from its checkpoint on."""
        try:
            checkpoint = 0
            if self.pool is not None:
                checkpoint = await asyncio.wait_for(self._load(), _LOAD_WITHIN_S)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("sessions projection unreadable (%r); reading the log's sessions", exc)
            self._chat.clear()
            self._settings.clear()
            checkpoint = 0
        policy = DeliverPolicy.BY_START_SEQUENCE if checkpoint else DeliverPolicy.ALL
        self._sub = await self.log.js.subscribe(
            "libra.session.>",
            stream=LOG_STREAM,
            cb=self._on_msg,
            ordered_consumer=True,
            deliver_policy=policy,
            config=ConsumerConfig(opt_start_seq=checkpoint + 1 if checkpoint else None),
        )
        info = await self._sub.consumer_info()
        if info.num_pending == 0:
            self._caught_up.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._caught_up.wait(), _CAUGHT_UP_WAIT_S)
        log.info("chat mode on in %d conversation(s)", sum(on for on, _ in self._chat.values()))

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    def chat_state(self, conversation: str) -> bool | None:
        """Whether chat mode is on in ``conversation``; None if it was never switched there."""
        found = self._chat.get(conversation)
        return None if found is None else found[0]

    def setting(self, scope: str, key: str) -> str:
        """The value set for ``key`` in ``scope`` (e.g. ``guild:1``, ``model``), or ""."""
        found = self._settings.get(scope, {}).get(key)
        return found[0] if found else ""

    def apply(self, event: AnyEvent) -> None:
        """Takes in a session event (from the log, or one this gateway just published)."""
        stamp = (event.at, event.id)
        match event:
            case SessionChat():
                old = self._chat.get(event.conversation)
                if old is None or old[1] < stamp:
                    self._chat[event.conversation] = (event.enabled, stamp)
            case SessionSettings():
                scope = self._settings.setdefault(event.scope, {})
                old_setting = scope.get(event.key)
                if old_setting is None or old_setting[1] < stamp:
                    scope[event.key] = (event.value, stamp)

    def settings(self, scope: str, prefix: str = "") -> dict[str, str]:
        """The keys set in ``scope`` that start with ``prefix``, with their values (set ones)."""
        found = self._settings.get(scope, {})
        return {k: v for k, (v, _) in found.items() if k.startswith(prefix) and v}

    async def _load(self) -> int:
        assert self.pool is not None
        async with (
            self.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            chat = await conn.fetch("SELECT conversation, enabled, at, event_id FROM chat_channels")
            for row in chat:
                self._chat[row["conversation"]] = (row["enabled"], (row["at"], row["event_id"]))
            for row in await conn.fetch("SELECT scope, key, value, at, event_id FROM settings"):
                self._settings.setdefault(row["scope"], {})[row["key"]] = (
                    row["value"],
                    (row["at"], row["event_id"]),
                )
            checkpoint = await conn.fetchval(
                "SELECT stream_seq FROM projection_checkpoints WHERE name = $1",
                CONSUMERS["sessions"].name,
            )
        return int(checkpoint or 0)

    async def _on_msg(self, msg: Msg) -> None:
        try:
            self.apply(decode_event(msg.data))
        except EventDecodeError as exc:
            log.warning("ignoring a session event that does not decode: %s", exc)
        if msg.metadata.num_pending == 0:
            self._caught_up.set()
