"""Libra's side of DAVE, Discord's end-to-end encryption: the MLS group and frame encryption.

One ``davey`` session per voice connection. The voice server plays MLS's delivery service and
external sender: it sends the external sender (op 25), proposals to add or remove members
(op 27), and the winning commit (op 29) or a welcome (op 30); Libra answers with its key package
(op 26), a commit for the proposals (op 28), readiness for a transition (op 23), or op 31 when a
commit or welcome cannot be applied, after which it starts over with a fresh key package.

Keys move as Discord's clients (libdave) move them: a commit or welcome gives Libra the new
keys of the others at once (the old ones stay valid a while), and Libra's own sending key
switches only when the transition is executed (op 22), when every member holds the new keys.
Until then, and while a group is re-created, Libra keeps sending under the key in force.

``DaveState`` does no I/O: each handler returns the messages to send back.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import davey

from .protocol import Op
from .rtp import OPUS_SILENCE

__all__ = ["DaveError", "DaveState", "Reply"]

_log = logging.getLogger(__name__)

# Discord's rule for a transition that downgrades to no E2EE: keep accepting unencrypted frames
# for a while, as some members may still send them.
_DOWNGRADE_PASSTHROUGH_SECONDS = 120
# A transition with id 0 (re)initialises the group and takes effect at once.
_IMMEDIATE = 0
# Op 27's first byte: append proposals, or revoke ones sent before.
_OPERATIONS = (davey.ProposalsOperationType.append, davey.ProposalsOperationType.revoke)


class DaveError(Exception):
    """A frame that DAVE could not decrypt, or one Libra may not send yet."""


@dataclass(frozen=True, slots=True)
class Reply:
    """A message for the voice gateway: JSON data, or a binary payload."""

    op: Op
    data: dict[str, Any] | bytes


class DaveState:
    """The MLS group membership and the media keys of one voice connection."""

    def __init__(self, *, user_id: int, channel_id: int, protocol_version: int) -> None:
        self.user_id = user_id
        self.channel_id = channel_id
        self.protocol_version = protocol_version
        self.members: set[int] = set()
        self._pending: dict[int, int] = {}
        self._external_sender: bytes | None = None  # the one in force, if any
        self._session = (
            davey.DaveSession(protocol_version, user_id, channel_id) if protocol_version else None
        )

    @property
    def active(self) -> bool:
        """Whether frames are end-to-end encrypted now (a DAVE version is in force)."""
        return self.protocol_version > 0

    @property
    def ready(self) -> bool:
        """Whether Libra holds a sending key (a group was formed and its transition executed)."""
        return self._session is not None and self._session.can_encrypt

    @property
    def epoch(self) -> int | None:
        """The MLS epoch; it moves on with every commit (members joining or leaving)."""
        return self._session.epoch if self._session is not None else None

    @property
    def group(self) -> frozenset[int]:
        """The people whose keys Libra holds: the MLS group's members, Libra included."""
        users = self._session.get_user_ids() if self._session is not None else None
        return frozenset(int(user) for user in users or ())

    def start(self) -> list[Reply]:
        """Begins DAVE after the session description: Libra's key package."""
        return self._key_package() if self._session is not None else []

    def handle(self, op: int, data: Any) -> list[Reply]:
        """Applies one DAVE message from the gateway; returns what to send back."""
        if self._session is None and op != Op.DAVE_PREPARE_EPOCH:
            _log.debug("DAVE op %s ignored: no DAVE version in force", op)
            return []
        handler = _HANDLERS.get(op)
        if handler is None:
            return []
        try:
            return handler(self, data)
        except Exception:  # davey raises plain exceptions; a bad message must not end the call
            _log.warning("DAVE op %s could not be handled", op, exc_info=True)
            return []

    def encrypt(self, opus: bytes) -> bytes:
        """Encrypts one Opus frame under the key in force; raises DaveError before the first."""
        if not self.active or opus == OPUS_SILENCE:
            return opus
        if not self.ready:
            raise DaveError("dave_not_ready")
        return self._session.encrypt_opus(opus)

    def decrypt(self, user_id: int, frame: bytes) -> bytes:
        """Decrypts one speaker's frame; raises DaveError when no key of that speaker fits."""
        if frame == OPUS_SILENCE or self._session is None:
            return frame
        try:
            return self._session.decrypt(user_id, davey.MediaType.audio, frame)
        except Exception as exc:  # davey raises plain exceptions for a missing or wrong key
            raise DaveError("dave_decrypt_failed") from exc

    # --- handlers ---------------------------------------------------------------------------

    def _key_package(self) -> list[Reply]:
        return [Reply(Op.DAVE_MLS_KEY_PACKAGE, self._session.get_serialized_key_package())]

    def _reinit(self) -> list[Reply]:
        """Drops the group and starts over; the server re-adds Libra with the new key package.
        The external sender stays the one in force: the server does not send it again. The
        sending key in force stays too, until the new group's transition: no silence meanwhile."""
        sender, self._external_sender = self._external_sender, None
        if self.protocol_version:
            if self._session is None:
                self._session = davey.DaveSession(
                    self.protocol_version, self.user_id, self.channel_id
                )
            else:
                self._session.reinit(self.protocol_version, self.user_id, self.channel_id)
            if sender is not None:
                self._session.set_external_sender(sender)
                self._external_sender = sender
            return self._key_package()
        if self._session is not None:
            self._session.reset()
            self._session.set_passthrough_mode(True, _DOWNGRADE_PASSTHROUGH_SECONDS)
        return []

    def _on_external_sender(self, payload: bytes) -> list[Reply]:
        if payload == self._external_sender:
            return []  # a repeat, as libdave takes it: the group stays as it is
        replies: list[Reply] = []
        if self._external_sender is not None:
            if not self._readable_sender(payload):
                return []  # broken: the group in force stays
            self._external_sender = None  # replaced: the new group gets the new one
            replies = self._reinit()  # a new external sender means a new group
        try:
            self._session.set_external_sender(payload)
        except Exception as exc:  # not an external sender at all: wait for a good one
            _log.warning("DAVE external sender refused: %s", exc)
            return replies
        self._external_sender = payload
        return replies

    def _readable_sender(self, payload: bytes) -> bool:
        """Whether ``payload`` is an external sender, tried on a session of its own."""
        try:
            trial = davey.DaveSession(self.protocol_version or 1, self.user_id, self.channel_id)
            trial.set_external_sender(payload)
        except Exception as exc:
            _log.warning("DAVE external sender refused, the group stays: %s", exc)
            return False
        return True

    def _on_proposals(self, payload: bytes) -> list[Reply]:
        if not payload:
            return []
        operation = _OPERATIONS[payload[0]]
        expected = sorted(self.members)
        result = self._session.process_proposals(operation, payload[1:], expected)
        if result is None:
            return []
        return [Reply(Op.DAVE_MLS_COMMIT_WELCOME, result.commit + (result.welcome or b""))]

    def _on_commit(self, payload: bytes) -> list[Reply]:
        return self._apply(payload, self._session.process_commit)

    def _on_welcome(self, payload: bytes) -> list[Reply]:
        return self._apply(payload, self._session.process_welcome)

    def _apply(self, payload: bytes, process: Any) -> list[Reply]:
        if len(payload) < 2:  # no room for its transition: refused as any broken one, as id 0
            return self._refuse(_IMMEDIATE, f"{len(payload)} byte(s), no transition id")
        (transition_id,) = struct.unpack_from(">H", payload)
        try:
            process(payload[2:])
            # The others' new keys now; Libra's own at execution (at once for id 0).
            self._session.prepare_transition(transition_id, self.protocol_version)
        except Exception as exc:
            return self._refuse(transition_id, exc)
        _log.info("DAVE epoch %s (transition %s)", self.epoch, transition_id)
        self._pending[transition_id] = self.protocol_version
        if transition_id == _IMMEDIATE:
            self._execute(transition_id)
            return []
        return [Reply(Op.DAVE_TRANSITION_READY, {"transition_id": transition_id})]

    def _refuse(self, transition_id: int, why: object) -> list[Reply]:
        """Op 31 for a commit or welcome that cannot be applied, and a fresh start."""
        _log.warning("DAVE transition %s could not be applied: %s", transition_id, why)
        invalid = Reply(Op.DAVE_MLS_INVALID_COMMIT_WELCOME, {"transition_id": transition_id})
        return [invalid, *self._reinit()]

    def _on_prepare_transition(self, data: dict[str, Any]) -> list[Reply]:
        transition_id = int(data["transition_id"])
        version = int(data["protocol_version"])
        self._pending[transition_id] = version
        if transition_id == _IMMEDIATE:
            self._execute(transition_id)
            return []
        if version == 0 and self._session is not None:
            self._session.set_passthrough_mode(True, _DOWNGRADE_PASSTHROUGH_SECONDS)
        return [Reply(Op.DAVE_TRANSITION_READY, {"transition_id": transition_id})]

    def _on_execute_transition(self, data: dict[str, Any]) -> list[Reply]:
        self._execute(int(data["transition_id"]))
        return []

    def _execute(self, transition_id: int) -> None:
        version = self._pending.pop(transition_id, None)
        if version is None:
            return
        if self._session is not None and version:
            self._session.execute_transition(transition_id)  # Libra's sending key switches
        if version != self.protocol_version:
            _log.info("DAVE protocol version %s -> %s", self.protocol_version, version)
        self.protocol_version = version

    def _on_prepare_epoch(self, data: dict[str, Any]) -> list[Reply]:
        # Epoch 1 announces a new group: start over with a fresh key package.
        if int(data["epoch"]) != 1:
            return []
        self.protocol_version = int(data["protocol_version"])
        return self._reinit()

    def add_members(self, user_ids: Iterable[int]) -> None:
        """Records people in the call; proposals may add only them."""
        self.members.update(user_ids)

    def remove_member(self, user_id: int) -> None:
        """Forgets a person who left the call."""
        self.members.discard(user_id)


_HANDLERS = {
    Op.DAVE_PREPARE_TRANSITION: DaveState._on_prepare_transition,
    Op.DAVE_EXECUTE_TRANSITION: DaveState._on_execute_transition,
    Op.DAVE_PREPARE_EPOCH: DaveState._on_prepare_epoch,
    Op.DAVE_MLS_EXTERNAL_SENDER: DaveState._on_external_sender,
    Op.DAVE_MLS_PROPOSALS: DaveState._on_proposals,
    Op.DAVE_MLS_ANNOUNCE_COMMIT_TRANSITION: DaveState._on_commit,
    Op.DAVE_MLS_WELCOME: DaveState._on_welcome,
}
