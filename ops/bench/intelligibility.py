"""Speech intelligibility under packet loss: what FEC and PLC buy over holes of silence.

espeak-ng speaks a passage, 48 kHz stereo as Discord sends it, encoded with Libra's own
:func:`encode_pcm` (in-band FEC on, as Discord clients send). Packets are dropped at random,
and the stream is decoded three ways: ``silence`` (a lost packet is 20 ms of zeros, what Libra
did before), ``plc`` (libopus's concealment) and ``fec`` (the lost packet rebuilt from the next
one's FEC when that one arrived, else PLC). The packaged faster-whisper tiny.en transcribes each;
``wer`` is the word error rate against the transcript of the loss-free decode, so that it counts
what loss costs, not what the recogniser mishears anyway. ``lsd_db``: the mean log-spectral
distance to the loss-free decode over its 20 ms frames with sound in them; ``lost_lsd_db`` the
same over the lost frames alone. Synchronous and deterministic for a seed: for benchmarks and
tests.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from libra.gateway.discord.voice.opus import OpusDecoder, encode_pcm
from libra.gateway.discord.voice.rtp import FRAME_SAMPLES, SAMPLE_RATE
from libra.runtime.audio import resample_pcm

__all__ = ["PASSAGE", "log_spectral_distance", "measure_intelligibility", "word_error_rate"]

PASSAGE = (
    "The weather was cold and grey when the train left the city. "
    "Anna sat by the window and read a long letter from her brother. "
    "He wrote that the farm was doing well, and that the apple trees were full of fruit. "
    "She smiled and watched the green fields going past. "
    "In two hours she would be home again, and the whole family would have dinner together."
)
CHANNELS = 2  # as Discord sends it
ASR_RATE = 16_000
BITRATE = 64_000  # Libra's default send bitrate
METHODS = ("silence", "plc", "fec")
_FLOOR = 1e-10  # -100 dB re full scale: the power a silent frame is taken to have
_ACTIVE = 1e-6  # -60 dBFS: a reference frame quieter than this counts as silence


@functools.cache
def _speech(text: str) -> bytes:
    """``text`` spoken as 48 kHz stereo PCM, by a fresh espeak-ng: the library carries state from
    one utterance to the next (a second saying differs), so only a new process's first is
    reproducible."""
    speak = (
        "import sys; from libra.processors.tts.espeak import utterance; "
        f"sys.stdout.buffer.write(utterance(sys.argv[1], rate={SAMPLE_RATE}, "
        f"channels={CHANNELS}))"
    )
    return subprocess.run(
        [sys.executable, "-c", speak, text], capture_output=True, check=True
    ).stdout


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w\s']", " ", text.lower()).replace("'", "").split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance over the reference's word count (case, punctuation
    ignored); an empty reference scores 0 against an empty hypothesis, else 1."""
    ref, hyp = _words(reference), _words(hypothesis)
    if not ref:
        return float(bool(hyp))
    row = list(range(len(hyp) + 1))
    for i, word in enumerate(ref, 1):
        previous, row[0] = row[0], i
        for j, heard in enumerate(hyp, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (word != heard))
    return row[-1] / len(ref)


def _frame_powers(samples: np.ndarray) -> np.ndarray:
    """Power spectra of the 20 ms frames of mono samples in [-1, 1), floored."""
    frames = samples[: len(samples) // FRAME_SAMPLES * FRAME_SAMPLES].reshape(-1, FRAME_SAMPLES)
    window = np.hanning(FRAME_SAMPLES)
    spectra = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2 / np.sum(window**2)
    return np.maximum(spectra, _FLOOR)


def log_spectral_distance(decoded: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per 20 ms frame, the RMS over frequency of the difference of log spectra (dB)."""
    ratio = 10 * np.log10(_frame_powers(decoded) / _frame_powers(reference))
    return np.sqrt(np.mean(ratio**2, axis=1))


def _mono(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, np.int16).reshape(-1, CHANNELS).mean(axis=1) / 32768.0


def _decode(packets: Sequence[bytes], lost: np.ndarray, method: str) -> bytes:
    decoder, silence, out = OpusDecoder(CHANNELS), bytes(FRAME_SAMPLES * CHANNELS * 2), []
    for index, packet in enumerate(packets):
        if not lost[index]:
            out.append(decoder.decode(packet))
        elif method == "silence":
            out.append(silence)
        elif method == "fec" and index + 1 < len(packets) and not lost[index + 1]:
            out.append(decoder.conceal(packets[index + 1]))
        else:
            out.append(decoder.conceal())
    return b"".join(out)


@functools.cache
def _whisper() -> Any:
    from faster_whisper import WhisperModel

    from libra.processors.asr.packaged import packaged_model

    threads = min(4, os.cpu_count() or 1)
    return WhisperModel(
        str(packaged_model()), device="cpu", compute_type="int8", cpu_threads=threads
    )


def _transcribe(pcm: bytes) -> str:
    """The packaged tiny.en's transcript of 48 kHz stereo PCM, as Libra's engine asks for it."""
    pcm16k = resample_pcm(pcm, rate=SAMPLE_RATE, channels=CHANNELS, to_rate=ASR_RATE, to_channels=1)
    audio = np.frombuffer(pcm16k, np.int16).astype(np.float32) / 32768.0
    segments, _ = _whisper().transcribe(
        audio,
        language="en",
        beam_size=1,
        temperature=0.0,
        condition_on_previous_text=False,
        vad_filter=False,
        without_timestamps=True,
    )
    return "".join(segment.text for segment in segments).strip()


class _Clean:
    """The loss-free decode everything is measured against."""

    def __init__(self, packets: Sequence[bytes]) -> None:
        self.pcm = _decode(packets, np.zeros(len(packets), bool), "none")
        self.transcript = _transcribe(self.pcm)
        self.mono = _mono(self.pcm)
        self.active = np.mean(_frame_powers(self.mono), axis=1) > _ACTIVE

    def score(self, decoded: bytes, lost: np.ndarray) -> tuple[float, float, float]:
        """WER, and the log-spectral distance over frames with sound and over the lost ones."""
        distance = log_spectral_distance(_mono(decoded), self.mono)
        hit = lost[: len(distance)] & self.active
        return (
            word_error_rate(self.transcript, _transcribe(decoded)),
            float(distance[self.active].mean()),
            float(distance[hit].mean()) if hit.any() else 0.0,
        )


def measure_intelligibility(
    *,
    losses: Sequence[float] = (0.05, 0.15),
    seed: int = 7,
    text: str | None = None,
    trials: int = 3,
) -> dict[str, Any]:
    """Word error rate and spectral distance of each way to decode a lossy stream.

    Each figure is the mean over ``trials`` random loss patterns: one transcript's WER swings by
    a few words with where the holes fall. A trial's patterns are nested across the loss rates
    (a packet lost at 5% is lost at 15% too), so the rates compare like with like. ``text``: the
    passage to speak, under 30 s of speech (one Whisper window); :data:`PASSAGE` by default.
    """
    passage = text or PASSAGE
    pcm = _speech(passage)
    packets = encode_pcm(pcm, bitrate=BITRATE)
    clean = _Clean(packets)
    draws = np.random.default_rng(seed).random((trials, len(packets)))
    results: dict[str, Any] = {}
    for loss in losses:
        lost = draws < loss
        row: dict[str, Any] = {
            "lost": int(lost.sum()),
            "packets": lost.size,
            "trials": trials,
        }
        for method in METHODS:
            scores = np.mean(
                [clean.score(_decode(packets, pattern, method), pattern) for pattern in lost],
                axis=0,
            )
            row[method] = dict(
                zip(
                    ("wer", "lsd_db", "lost_lsd_db"),
                    (round(float(x), 3) for x in scores),
                    strict=True,
                )
            )
        results[f"{loss * 100:g}%"] = row
    return {
        "reference": clean.transcript,
        "reference_wer": round(word_error_rate(passage, clean.transcript), 3),
        "seconds": round(len(pcm) / (SAMPLE_RATE * CHANNELS * 2), 2),
        "loss": results,
    }
