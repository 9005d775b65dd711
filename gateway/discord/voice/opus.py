"""Opus with PyAV (libopus): 20 ms frames at 48 kHz, PCM as signed 16-bit little-endian."""

from __future__ import annotations

import io

import av
import numpy as np

from .rtp import FRAME_SAMPLES, SAMPLE_RATE

__all__ = ["OpusDecoder", "decode_audio", "encode_pcm"]

SEND_CHANNELS = 2
_SEND_FRAME_BYTES = FRAME_SAMPLES * SEND_CHANNELS * 2


class OpusDecoder:
    """One speaker's decoder (Opus keeps state between frames, so one per speaker)."""

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self._silence = bytes(FRAME_SAMPLES * channels * 2)
        self._context = self._open()

    def _open(self) -> av.CodecContext:
        context = av.CodecContext.create("libopus", "r")
        context.sample_rate = SAMPLE_RATE
        context.layout = "mono" if self.channels == 1 else "stereo"
        context.format = "s16"
        context.open()
        return context

    def decode(self, opus: bytes) -> bytes:
        """Decodes one packet to PCM; raises av.FFmpegError for data libopus rejects."""
        frames = self._context.decode(av.Packet(opus))
        return b"".join(frame.to_ndarray().tobytes() for frame in frames)

    def conceal(self) -> bytes:
        """PCM for a lost packet: 20 ms of silence.

        libopus could interpolate, but FFmpeg's wrapper has no way to ask for it (an empty
        packet ends the stream), and a 20 ms hole of silence is inaudible to speech recognition.
        """
        return self._silence


def encode_pcm(pcm: bytes, *, bitrate: int) -> list[bytes]:
    """Encodes 48 kHz stereo PCM into 20 ms Opus frames; the last frame is padded with silence."""
    context = av.CodecContext.create("libopus", "w")
    context.sample_rate = SAMPLE_RATE
    context.layout = "stereo"
    context.format = "s16"
    context.bit_rate = bitrate
    context.options = {"application": "voip", "frame_duration": "20"}
    context.open()
    if len(pcm) % _SEND_FRAME_BYTES:
        pcm += bytes(_SEND_FRAME_BYTES - len(pcm) % _SEND_FRAME_BYTES)
    samples = np.frombuffer(pcm, dtype=np.int16).reshape(1, -1)
    packets: list[bytes] = []
    step = FRAME_SAMPLES * SEND_CHANNELS
    for index, start in enumerate(range(0, samples.shape[1], step)):
        frame = av.AudioFrame.from_ndarray(
            samples[:, start : start + step], format="s16", layout="stereo"
        )
        frame.sample_rate = SAMPLE_RATE
        frame.pts = index * FRAME_SAMPLES
        packets.extend(bytes(packet) for packet in context.encode(frame))
    packets.extend(bytes(packet) for packet in context.encode(None))
    return packets


def decode_audio(data: bytes) -> bytes:
    """Decodes an audio file (WAV, Ogg, MP3 ...) to 48 kHz stereo PCM, as the player sends it."""
    resampler = av.AudioResampler(format="s16", layout="stereo", rate=SAMPLE_RATE)
    chunks: list[bytes] = []
    with av.open(io.BytesIO(data)) as container:
        for frame in container.decode(audio=0):
            chunks.extend(out.to_ndarray().tobytes() for out in resampler.resample(frame))
    chunks.extend(out.to_ndarray().tobytes() for out in resampler.resample(None))
    return b"".join(chunks)
