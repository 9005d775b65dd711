"""Where received voice goes: the seam between the transport and the voice pipeline's VAD."""

from __future__ import annotations

from typing import Protocol

__all__ = ["VoiceSink"]


class VoiceSink(Protocol):
    """Receives each speaker's audio as it arrives, on the event loop.

    PCM is signed 16-bit little-endian at 48 kHz with the connection's channel count (1 by
    default), normally 20 ms (960 samples) a call. Frames of one speaker come in order; a lost
    packet comes as 20 ms of silence, so a speaker's timeline has no holes while they talk.
    Calls must return quickly: a sink that needs time hands the frame to its own task.
    """

    def on_speaking(self, user_id: int, speaking: bool) -> None:
        """A person started sending audio, or has sent none for the idle time."""

    def on_frame(self, user_id: int, pcm: bytes, rtp_timestamp: int) -> None:
        """One frame of a person's voice; ``rtp_timestamp`` counts samples at 48 kHz."""

    def on_member(self, user_id: int, present: bool) -> None:
        """A person joined the call (client connect) or left it (client disconnect)."""
