"""Speech, silence and noise made in the test, for the voice tests (speech by espeak-ng)."""

from __future__ import annotations

import functools

import numpy as np

from libra.processors.tts.espeak import utterance
from libra.runtime.audio import resample_pcm

RATE = 16_000


@functools.cache
def _espeak(text: str, voice: str) -> bytes:
    return utterance(text, voice, rate=RATE)


def speech(text: str, voice: str) -> np.ndarray:
    """``text`` spoken by espeak-ng with ``voice``, as 16 kHz mono int16 samples."""
    return np.frombuffer(_espeak(text, voice), np.int16)


def silence(ms: int) -> np.ndarray:
    return np.zeros(ms * RATE // 1000, np.int16)


def white_noise(ms: int, amplitude: float, *, seed: int = 1) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(ms * RATE // 1000) * amplitude
    return noise.clip(-32767, 32767).astype(np.int16)


def frames(samples: np.ndarray) -> list[np.ndarray]:
    """The samples as 20 ms frames, the last one padded with silence."""
    padded = np.concatenate([samples, np.zeros(-len(samples) % 320, np.int16)])
    return list(padded.reshape(-1, 320))


def discord_pcm(samples: np.ndarray) -> bytes:
    """The samples as Discord sends them: 48 kHz stereo s16le."""
    return resample_pcm(samples.tobytes(), rate=RATE, channels=1, to_rate=48_000, to_channels=2)


def speech_spans(parts: list[np.ndarray]) -> list[tuple[float, float]]:
    """Where each part that holds speech starts and ends (ms), by its samples' amplitude."""
    spans, at = [], 0.0
    for part in parts:
        loud = np.nonzero(np.abs(part) > 100)[0]
        if len(loud):
            spans.append((at + loud[0] * 1000 / RATE, at + (loud[-1] + 1) * 1000 / RATE))
        at += len(part) * 1000 / RATE
    return spans
