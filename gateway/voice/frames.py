"""Turning incoming audio into the 20 ms frames of 16 kHz mono that VAD and ASR read.

Discord sends 20 ms of 48 kHz stereo s16le per packet; the HTTP API takes whole clips at
16 or 48 kHz. 48 kHz goes down to 16 kHz through a short low-pass FIR filter and by keeping
every third sample, carrying the filter's tail from one call to the next: a few microseconds per
frame, no per-call resampler objects.
"""

from __future__ import annotations

import numpy as np

from .vad import FRAME_SAMPLES, SAMPLE_RATE

__all__ = ["FrameSplitter"]

_TAPS = 48


def _lowpass(taps: int, cutoff: float) -> np.ndarray:
    """A windowed-sinc low-pass filter; ``cutoff`` is a fraction of the input sample rate."""
    n = np.arange(taps) - (taps - 1) / 2
    h = np.sinc(2 * cutoff * n) * np.blackman(taps)
    return (h / h.sum()).astype(np.float32)


# Passes up to ~7 kHz of 48 kHz audio, stops what would fold back above 8 kHz (16 kHz Nyquist).
_FILTER = _lowpass(_TAPS, 7_500 / 48_000)[::-1].copy()


class FrameSplitter:
    """Cuts a stream of s16le PCM (16 or 48 kHz, mono or stereo) into 16 kHz mono frames."""

    def __init__(self, *, sample_rate: int = 48_000, channels: int = 2) -> None:
        if sample_rate not in (SAMPLE_RATE, 48_000):
            raise ValueError(f"audio at {sample_rate} Hz: send 16000 or 48000 Hz")
        if channels not in (1, 2):
            raise ValueError(f"audio with {channels} channels: send mono or stereo")
        self.sample_rate = sample_rate
        self.channels = channels
        self._factor = sample_rate // SAMPLE_RATE
        self._history = np.zeros(_TAPS - 1, np.float32)
        self._pending = np.zeros(0, np.int16)
        self._odd = b""

    def __call__(self, pcm: bytes) -> list[np.ndarray]:
        """Returns the whole 20 ms frames (320 int16 samples each) that ``pcm`` completes."""
        if self._odd:
            pcm, self._odd = self._odd + pcm, b""
        frame_bytes = 2 * self.channels
        if len(pcm) % frame_bytes:
            cut = len(pcm) - len(pcm) % frame_bytes
            pcm, self._odd = pcm[:cut], pcm[cut:]
        samples = np.frombuffer(pcm, np.int16)
        if self.channels == 2:
            samples = ((samples[0::2].astype(np.int32) + samples[1::2]) >> 1).astype(np.int16)
        if self._factor > 1:
            samples = self._decimate(samples)
        samples = np.concatenate((self._pending, samples)) if len(self._pending) else samples
        whole = len(samples) - len(samples) % FRAME_SAMPLES
        self._pending = samples[whole:].copy()
        return list(samples[:whole].reshape(-1, FRAME_SAMPLES))

    def _decimate(self, samples: np.ndarray) -> np.ndarray:
        x = np.concatenate((self._history, samples.astype(np.float32)))
        keep = len(x) - (_TAPS - 1)
        usable = keep - keep % self._factor  # whole groups of three input samples only
        windows = np.lib.stride_tricks.sliding_window_view(x[: usable + _TAPS - 1], _TAPS)
        out = windows[:: self._factor] @ _FILTER
        self._history = x[usable:]
        return np.clip(np.rint(out), -32768, 32767).astype(np.int16)
