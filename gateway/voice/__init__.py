"""Voice input: Silero VAD, utterance segmentation and capture into the log.

Used by the Discord voice transport and by the HTTP API. The segmenter is pure and synchronous
(:class:`Segmenter`, 20 ms frames in, decisions out); :class:`VoiceCapture` is the thin async part
that stores the audio and publishes ``voice.captured`` and ``voice.ended``.
"""

from .capture import VoiceCapture, segmenter_config
from .frames import FrameSplitter
from .segmenter import (
    Confirmed,
    Decision,
    Partial,
    Resumed,
    Segmenter,
    SegmenterConfig,
    Utterance,
)
from .vad import FRAME_SAMPLES, SAMPLE_RATE, SileroVad

__all__ = [
    "FRAME_SAMPLES",
    "SAMPLE_RATE",
    "Confirmed",
    "Decision",
    "FrameSplitter",
    "Partial",
    "Resumed",
    "Segmenter",
    "SegmenterConfig",
    "SileroVad",
    "Utterance",
    "VoiceCapture",
    "segmenter_config",
]
