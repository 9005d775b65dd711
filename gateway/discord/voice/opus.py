"""Opus: 20 ms frames at 48 kHz, PCM as signed 16-bit little-endian.

Received packets are decoded with libopus through ``opuslib_next`` (ctypes), which can ask for
what FFmpeg's wrapper cannot: a lost packet is rebuilt from the in-band FEC the next packet
carries, or else by libopus's packet-loss concealment. Encoding and audio files stay on PyAV.
"""

from __future__ import annotations

import ctypes
import io

import av
import numpy as np
import opuslib_next.api.decoder as _libopus_decoder
from opuslib_next.api import libopus as _libopus
from opuslib_next.exceptions import OpusError

from .rtp import FRAME_SAMPLES, SAMPLE_RATE

__all__ = ["OpusDecoder", "OpusInvalid", "decode_audio", "encode_pcm"]

SEND_CHANNELS = 2
_SEND_FRAME_BYTES = FRAME_SAMPLES * SEND_CHANNELS * 2
_MAX_FRAME_SAMPLES = SAMPLE_RATE * 120 // 1000  # the longest packet Opus allows

# Prototypes of our own, so that nothing depends on argtypes another module set on the library.
_decode = ctypes.CFUNCTYPE(
    ctypes.c_int,
    _libopus_decoder.DecoderPointer,
    ctypes.c_char_p,
    ctypes.c_int32,
    ctypes.POINTER(ctypes.c_int16),
    ctypes.c_int,
    ctypes.c_int,
)(("opus_decode", _libopus))
_has_lbrr = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.c_int32)(
    ("opus_packet_has_lbrr", _libopus)
)


class OpusInvalid(Exception):
    """libopus rejected a packet (corrupt, or not Opus)."""


class OpusDecoder:
    """One speaker's decoder (Opus keeps state between frames, so one per speaker)."""

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self._state = _libopus_decoder.create_state(SAMPLE_RATE, channels)
        self._pcm = (ctypes.c_int16 * (_MAX_FRAME_SAMPLES * channels))()  # reused: no allocation

    def __del__(self) -> None:
        state, self._state = getattr(self, "_state", None), None
        if state is not None:
            _libopus_decoder.destroy(state)

    def _run(self, data: bytes | None, frame_samples: int, fec: bool) -> bytes:
        samples = _decode(self._state, data, len(data or b""), self._pcm, frame_samples, fec)
        if samples < 0:
            raise OpusInvalid(f"libopus: {OpusError(samples)}")
        return ctypes.string_at(self._pcm, samples * self.channels * 2)

    def decode(self, opus: bytes) -> bytes:
        """Decodes one packet to PCM; raises :class:`OpusInvalid` for data libopus rejects."""
        if not opus:  # libopus would take an empty packet for a lost one
            raise OpusInvalid("empty packet")
        return self._run(opus, _MAX_FRAME_SAMPLES, False)

    def conceal(self, next_opus: bytes | None = None) -> bytes:
        """PCM for one lost 20 ms packet.

        With the packet after it, the lost one is decoded from the lower-rate copy (in-band FEC)
        that packet carries; without it, or when it carries none, libopus extrapolates (PLC).
        Either way the decoder's state follows on, so the next packet decodes smoothly.
        """
        if next_opus and _has_lbrr(next_opus, len(next_opus)) == 1:
            try:
                return self._run(next_opus, FRAME_SAMPLES, True)
            except OpusInvalid:
                pass
        return self._run(None, FRAME_SAMPLES, False)


def encode_pcm(pcm: bytes, *, bitrate: int, fec_loss_percent: int = 10) -> list[bytes]:
    """Encodes 48 kHz stereo PCM into 20 ms Opus frames; the last frame is padded with silence.

    ``fec_loss_percent`` > 0 turns on in-band FEC tuned for that much loss, so a listener can
    rebuild a lost packet from the next one (libopus then codes speech in SILK or hybrid mode,
    which alone carry FEC); 0 turns it off.
    """
    context = av.CodecContext.create("libopus", "w")
    context.sample_rate = SAMPLE_RATE
    context.layout = "stereo"
    context.format = "s16"
    context.bit_rate = bitrate
    options = {"application": "voip", "frame_duration": "20"}
    if fec_loss_percent > 0:
        options |= {"fec": "1", "packet_loss": str(min(fec_loss_percent, 100))}
    context.options = options
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
