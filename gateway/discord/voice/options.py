"""The voice transport's settings."""

from __future__ import annotations

from dataclasses import dataclass

from libra.runtime.config import Settings

__all__ = ["VoiceOptions"]


@dataclass(frozen=True, slots=True)
class VoiceOptions:
    """How a voice connection receives, sends and reconnects."""

    # How long a speaker's packets wait for a missing one before it is concealed.
    jitter_ms: int = 60
    # No packet from a speaker for this long: they stopped speaking.
    speaking_idle_ms: int = 200
    # Channels of the PCM handed to the sink: 1 (what VAD and ASR take) or 2.
    channels: int = 1
    # Bitrate of the Opus that Libra sends.
    bitrate: int = 64_000
    # Time to reach a usable connection, and to each websocket handshake.
    connect_timeout_sec: float = 10.0
    # Reconnections in a row (resume or identify) before the connection gives up.
    max_reconnects: int = 5

    @classmethod
    def from_settings(cls, settings: Settings) -> VoiceOptions:
        """The options from Libra's settings (DISCORD_VOICE_*)."""
        return cls(
            jitter_ms=settings.discord_voice_jitter_ms,
            speaking_idle_ms=settings.discord_voice_speaking_idle_ms,
            bitrate=settings.discord_voice_bitrate,
            connect_timeout_sec=settings.discord_voice_connect_timeout_sec,
            max_reconnects=settings.discord_voice_max_reconnects,
        )
