"""RTP as Discord's voice servers use it: Opus at 48 kHz, 20 ms a packet."""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "FRAME_SAMPLES",
    "FRAME_SECONDS",
    "OPUS_PAYLOAD_TYPE",
    "OPUS_SILENCE",
    "SAMPLE_RATE",
    "MalformedPacket",
    "RtpHeader",
    "build_header",
    "is_rtcp",
    "parse_header",
    "seq_distance",
]

SAMPLE_RATE = 48_000
FRAME_SAMPLES = 960
FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE
OPUS_PAYLOAD_TYPE = 0x78
# What Discord clients send after speech: one Opus frame of silence. DAVE leaves it unencrypted.
OPUS_SILENCE = b"\xf8\xff\xfe"

_FIXED = struct.Struct(">BBHII")
_EXTENSION = struct.Struct(">HH")


class MalformedPacket(ValueError):
    """A datagram that is not an RTP packet Libra can read; ``reason`` names the drop."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class RtpHeader:
    """The parts of an RTP header that Libra reads.

    ``clear_size`` is what the ``*_rtpsize`` modes leave unencrypted and authenticate: the fixed
    header, the CSRCs and the 4-byte extension header. ``extension_size`` is the extension's body,
    which those modes encrypt along with the payload, so it is stripped after decryption.
    """

    sequence: int
    timestamp: int
    ssrc: int
    payload_type: int
    clear_size: int
    extension_size: int


def parse_header(packet: bytes) -> RtpHeader:
    """Reads an RTP header; raises MalformedPacket for anything else."""
    if len(packet) < _FIXED.size:
        raise MalformedPacket("short")
    first, second, sequence, timestamp, ssrc = _FIXED.unpack_from(packet)
    if first >> 6 != 2:
        raise MalformedPacket("not_rtp")
    clear_size = _FIXED.size + 4 * (first & 0x0F)
    extension_size = 0
    if first & 0x10:
        if len(packet) < clear_size + _EXTENSION.size:
            raise MalformedPacket("truncated")
        _profile, words = _EXTENSION.unpack_from(packet, clear_size)
        clear_size += _EXTENSION.size
        extension_size = 4 * words
    return RtpHeader(sequence, timestamp, ssrc, second & 0x7F, clear_size, extension_size)


def is_rtcp(packet: bytes) -> bool:
    """Tells RTCP (sender and receiver reports, types 200-204) from RTP on the shared socket."""
    return len(packet) >= 2 and 200 <= packet[1] <= 204


def build_header(sequence: int, timestamp: int, ssrc: int) -> bytes:
    """The 12-byte header of an Opus packet that Libra sends (no CSRCs, no extension)."""
    return _FIXED.pack(0x80, OPUS_PAYLOAD_TYPE, sequence & 0xFFFF, timestamp & 0xFFFFFFFF, ssrc)


def seq_distance(newer: int, older: int) -> int:
    """How far ``newer`` is after ``older`` on the 16-bit sequence circle (negative: before)."""
    distance = (newer - older) & 0xFFFF
    return distance - 0x10000 if distance >= 0x8000 else distance
