"""Counters of the voice transport: per connection for tests and logs, and for Prometheus."""

from __future__ import annotations

from collections import Counter as Tally
from collections import deque
from dataclasses import dataclass, field

from prometheus_client import Counter, Histogram

__all__ = ["VoiceStats"]

PACKETS_RECEIVED = Counter(
    "libra_voice_packets_received_total", "Voice packets received and handed to the sink"
)
PACKETS_DROPPED = Counter(
    "libra_voice_packets_dropped_total",
    "Voice packets dropped, by direction and reason",
    ["direction", "reason"],
)
FRAMES_SENT = Counter("libra_voice_frames_sent_total", "Opus frames Libra sent")
RECONNECTS = Counter(
    "libra_voice_reconnects_total", "Voice gateway reconnections, by kind", ["kind"]
)
RECEIVE_SECONDS = Histogram(
    "libra_voice_receive_seconds",
    "From a packet's arrival to its PCM handed to the sink",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01),
)
SEND_LATENESS_SECONDS = Histogram(
    "libra_voice_send_lateness_seconds",
    "How far after its slot on the 20 ms grid each frame was sent",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05),
)


@dataclass
class VoiceStats:
    """What one voice connection received, sent and dropped."""

    received: int = 0
    sent: int = 0
    dropped: Tally[str] = field(default_factory=Tally)
    unsent: Tally[str] = field(default_factory=Tally)
    reconnects: Tally[str] = field(default_factory=Tally)
    # Seconds each of the last minute of frames was sent after its slot on the 20 ms grid.
    send_lateness: deque[float] = field(default_factory=lambda: deque(maxlen=3000))

    def drop(self, reason: str) -> None:
        """Counts a received packet that was dropped, and why.

        Reasons: short, not_rtp, truncated, rtcp (reports, ignored), not_opus, unknown_ssrc,
        no_key, decrypt_failed (transport), late, duplicate, dave_decrypt_failed, opus_invalid,
        error (the sink or the decoder raised).
        """
        self.dropped[reason] += 1
        PACKETS_DROPPED.labels("in", reason).inc()

    def drop_outgoing(self, reason: str) -> None:
        """Counts a frame Libra could not send, and why: not_connected, dave_not_ready."""
        self.unsent[reason] += 1
        PACKETS_DROPPED.labels("out", reason).inc()

    def reconnect(self, kind: str) -> None:
        """Counts a reconnection: "resume", "identify" or "move"."""
        self.reconnects[kind] += 1
        RECONNECTS.labels(kind).inc()
