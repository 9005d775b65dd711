"""Who may talk to Libra on Discord, and who may change what.

- Servers: ``DISCORD_ALLOWED_GUILDS`` (ids, comma-separated) keeps Libra silent in servers it was
  not meant for; empty allows every server.
- People, roles and channels: allow- and block-lists in the TOML file ``DISCORD_ACCESS_FILE``,
  read again whenever the file changes, so an operator edits them without a restart::

      [allow]            # when users or roles are listed, only they may talk to Libra;
      users = []         # when channels are listed, only there (a thread counts as its parent)
      roles = []
      channels = []
      [block]            # always silent for these
      users = ["123"]    # Discord ids; "discord:123", as Libra's log names people, works too
      roles = []
      channels = []

- Admin commands (``/model``, ``/persona`` to set, ``/moderation``, ``/learn``,
  ``/knowledge``, ``/tools``) need Manage Server, or a role listed in ``DISCORD_ADMIN_ROLES``;
  ``/chat`` needs Manage Channels (admins may too).
"""

from __future__ import annotations

import logging
import os
import time
import tomllib
from collections.abc import Iterable
from pathlib import Path

import hikari
import msgspec

__all__ = ["AccessPolicy", "AccessRules", "Speaker", "parse_ids"]

log = logging.getLogger("libra.discord.access")

_ADMIN = hikari.Permissions.ADMINISTRATOR | hikari.Permissions.MANAGE_GUILD
_CHAT_MODE = _ADMIN | hikari.Permissions.MANAGE_CHANNELS


def parse_ids(value: str) -> frozenset[str]:
    """Reads ``"1, 2,3"`` as ids."""
    return frozenset(part.strip() for part in value.split(",") if part.strip())


class _Lists(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    users: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    channels: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        # People as Discord names them (123) or as Libra's log and tables do (discord:123).
        users = frozenset(u.removeprefix("discord:") for u in self.users)
        msgspec.structs.force_setattr(self, "users", users)


class AccessRules(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The allow- and block-lists, as the access file holds them."""

    allow: _Lists = _Lists()
    block: _Lists = _Lists()


class Speaker(msgspec.Struct, frozen=True, kw_only=True):
    """Who wrote, and where: what the rules are checked against."""

    user: str  # the Discord id (``123``, not ``discord:123``), as the access lists name people
    guild: str = ""
    channel: str = ""
    parent: str = ""  # a thread's channel
    roles: frozenset[str] = frozenset()


class AccessPolicy:
    """Answers whether a person may talk to Libra here, and whether they may change settings."""

    def __init__(
        self,
        *,
        guilds: Iterable[str] = (),
        admin_roles: Iterable[str] = (),
        file: str = "",
        recheck_s: float = 1.0,
    ) -> None:
        self.guilds = frozenset(guilds)
        self.admin_roles = frozenset(admin_roles)
        self.file = Path(file).expanduser() if file else None
        self.recheck_s = recheck_s  # how often the file's modification time is looked at
        self._rules = AccessRules()
        self._stamp: tuple[int, int] | None = None
        self._checked_at = float("-inf")

    def rules(self) -> AccessRules:
        """The lists as the file holds them now (re-read when its modification time changes)."""
        if self.file is None:
            return self._rules
        now = time.monotonic()
        if now - self._checked_at >= self.recheck_s:
            self._checked_at = now
            self._reload()
        return self._rules

    def may_talk(self, who: Speaker) -> bool:
        """Tells whether Libra answers this person in this place."""
        rules = self.rules()
        if not self._open(rules, who.guild, {who.channel, who.parent} - {""}):
            return False
        if who.user in rules.block.users or who.roles & rules.block.roles:
            return False
        if rules.allow.users or rules.allow.roles:
            return who.user in rules.allow.users or bool(who.roles & rules.allow.roles)
        return True

    def channel_open(self, guild: str, channel: str) -> bool:
        """Whether Libra may be in this channel at all, whoever talks (the server and channel
        lists; the people lists apply to each speaker)."""
        return self._open(self.rules(), guild, {channel})

    def _open(self, rules: AccessRules, guild: str, places: set[str]) -> bool:
        """The server and channel lists: a DM (no guild) passes the server list."""
        if guild and self.guilds and guild not in self.guilds:
            return False
        if places & rules.block.channels:
            return False
        return not rules.allow.channels or bool(places & rules.allow.channels)

    def is_admin(self, permissions: hikari.Permissions, roles: Iterable[str]) -> bool:
        """Manage Server (or Administrator), or a role named in ``DISCORD_ADMIN_ROLES``."""
        return bool(permissions & _ADMIN) or not self.admin_roles.isdisjoint(roles)

    def may_set_chat_mode(self, permissions: hikari.Permissions, roles: Iterable[str]) -> bool:
        """Manage Channels, or an admin."""
        return bool(permissions & _CHAT_MODE) or not self.admin_roles.isdisjoint(roles)

    def _reload(self) -> None:
        assert self.file is not None
        try:
            stat = os.stat(self.file)
        except FileNotFoundError:
            if self._stamp is not None:
                log.warning("access file %s is gone; no allow- or block-lists apply", self.file)
            self._rules, self._stamp = AccessRules(), None
            return
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            raw = tomllib.loads(self.file.read_text())
            self._rules = msgspec.convert(_as_strings(raw), AccessRules)
        except (OSError, tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
            log.error("access file %s not applied, keeping the previous lists: %s", self.file, exc)
            return
        log.info("access lists loaded from %s", self.file)


def _as_strings(raw: object) -> object:
    """Ids may be written as numbers or strings in the file; they are compared as strings."""
    if isinstance(raw, dict):
        return {k: _as_strings(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [str(v) for v in raw]
    return raw
