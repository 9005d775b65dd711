"""Discord's voice transport for Libra: voice gateway v8, UDP, transport encryption, DAVE, Opus.

Received audio goes, per speaker, to a ``VoiceSink`` as 48 kHz PCM; Libra speaks through the
``Player``. ``LibraVoiceConnection`` plugs both into hikari's voice component.
"""

from __future__ import annotations

from .connection import LibraVoiceConnection
from .metrics import VoiceStats
from .options import VoiceOptions
from .player import Clip, Interruption, Played, Player
from .session import VoiceConnectError, VoiceServer, VoiceSession
from .sink import VoiceSink

__all__ = [
    "Clip",
    "Interruption",
    "LibraVoiceConnection",
    "Played",
    "Player",
    "VoiceConnectError",
    "VoiceOptions",
    "VoiceServer",
    "VoiceSession",
    "VoiceSink",
    "VoiceStats",
]
