"""The voice gateway's messages (protocol version 8): opcodes, close codes, framing."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Any

__all__ = [
    "ENCRYPTION_MODES",
    "GATEWAY_VERSION",
    "RESUMABLE_CLOSE_CODES",
    "CloseCode",
    "Message",
    "Op",
    "Speaking",
    "decode_binary",
    "decode_text",
    "encode_binary",
    "encode_text",
]

GATEWAY_VERSION = 8

# Libra's preference order; Discord offers both, and AES-GCM is the one it recommends.
ENCRYPTION_MODES = ("aead_aes256_gcm_rtpsize", "aead_xchacha20_poly1305_rtpsize")


class Op(IntEnum):
    """Voice gateway opcodes; 21 to 31 are DAVE's, 25 to 30 travel as binary messages."""

    IDENTIFY = 0
    SELECT_PROTOCOL = 1
    READY = 2
    HEARTBEAT = 3
    SESSION_DESCRIPTION = 4
    SPEAKING = 5
    HEARTBEAT_ACK = 6
    RESUME = 7
    HELLO = 8
    RESUMED = 9
    CLIENTS_CONNECT = 11
    CLIENT_DISCONNECT = 13
    DAVE_PREPARE_TRANSITION = 21
    DAVE_EXECUTE_TRANSITION = 22
    DAVE_TRANSITION_READY = 23
    DAVE_PREPARE_EPOCH = 24
    DAVE_MLS_EXTERNAL_SENDER = 25
    DAVE_MLS_KEY_PACKAGE = 26
    DAVE_MLS_PROPOSALS = 27
    DAVE_MLS_COMMIT_WELCOME = 28
    DAVE_MLS_ANNOUNCE_COMMIT_TRANSITION = 29
    DAVE_MLS_WELCOME = 30
    DAVE_MLS_INVALID_COMMIT_WELCOME = 31


class CloseCode(IntEnum):
    """Close codes the voice gateway sends, and the ones Libra acts on."""

    ABNORMAL = 1006
    AUTHENTICATION_FAILED = 4004
    SESSION_NO_LONGER_VALID = 4006
    SESSION_TIMEOUT = 4009
    SERVER_NOT_FOUND = 4011
    DISCONNECTED = 4014
    VOICE_SERVER_CRASHED = 4015
    UNKNOWN_ENCRYPTION_MODE = 4016
    E2EE_REQUIRED = 4017
    CALL_TERMINATED = 4022


# Below 4000 the connection merely dropped; 4015 says the server restarted. Both keep the
# session, so Libra resumes; every other 4xxx code ends the session.
RESUMABLE_CLOSE_CODES = frozenset({CloseCode.VOICE_SERVER_CRASHED})


class Speaking(IntFlag):
    """The speaking flags of op 5."""

    NONE = 0
    MICROPHONE = 1
    SOUNDSHARE = 2
    PRIORITY = 4


@dataclass(frozen=True, slots=True)
class Message:
    """One message from the voice gateway: JSON data, or a binary payload for ops 25-30."""

    op: int
    data: Any
    seq: int | None = None


def encode_text(op: Op, data: Any) -> str:
    """Encodes a JSON message from Libra to the gateway."""
    return json.dumps({"op": int(op), "d": data}, separators=(",", ":"))


def encode_binary(op: Op, payload: bytes) -> bytes:
    """Encodes a binary message from Libra: the opcode, then the payload (no sequence)."""
    return bytes((int(op),)) + payload


def decode_text(raw: str) -> Message:
    """Decodes a JSON message from the gateway; raises ValueError when it is not one."""
    body = json.loads(raw)
    if not isinstance(body, dict) or not isinstance(body.get("op"), int):
        raise ValueError("voice gateway message without an op")
    seq = body.get("seq")
    return Message(op=body["op"], data=body.get("d"), seq=seq if isinstance(seq, int) else None)


def decode_binary(raw: bytes) -> Message:
    """Decodes a binary message from the gateway: sequence (u16), opcode (u8), payload."""
    if len(raw) < 3:
        raise ValueError("binary voice gateway message shorter than its header")
    seq, op = struct.unpack_from(">HB", raw)
    return Message(op=op, data=raw[3:], seq=seq)
