"""Audio in the log: clips live in the object store bucket ``libra-audio``, events name them.

An event never carries audio bytes, only an :class:`~libra.contracts.AudioRef` (bucket, object
name, format, sample rate, channels, duration, size). The object store splits a large clip into
chunks. Object names are derived from the id of the event that names them, so a redelivered
input rewrites the same object instead of leaving a second one behind; the bucket's TTL
(``LIBRA_AUDIO_TTL``) removes old audio.

The helpers below convert between the formats the voice pipeline meets: 16 kHz mono for speech
recognition, 48 kHz stereo for Discord, WAV for upload APIs, MP3 from some TTS vendors.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import uuid
import wave
from datetime import UTC, datetime
from typing import Literal

import av
import numpy as np
from nats.js import JetStreamContext
from nats.js.api import ObjectInfo, ObjectMetaOptions
from nats.js.errors import NotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from libra.contracts import AUDIO_BUCKET, AudioRef

from .eventlog import EventLog

__all__ = [
    "AudioFormat",
    "AudioStore",
    "AudioTooLarge",
    "decode_audio",
    "pcm_duration_ms",
    "resample_pcm",
    "wav_bytes",
]

AudioFormat = Literal["pcm_s16le", "opus", "wav"]

# Half a megabyte: one or two chunks per clip, and well under a NATS server's default 1 MB
# max_payload (a chunk must fit in one message).
_CHUNK_BYTES = 512 * 1024


class AudioTooLarge(ValueError):
    """A clip over ``MAX_AUDIO_BYTES``."""


def pcm_duration_ms(size: int, sample_rate: int, channels: int = 1) -> int:
    """Returns the duration of ``size`` bytes of s16le PCM, in whole milliseconds."""
    return size * 1000 // (2 * channels * sample_rate)


class AudioStore:
    """Puts clips into the audio bucket and reads them back by their :class:`AudioRef`."""

    def __init__(self, js: JetStreamContext, store: ObjectStore, *, max_bytes: int = 0) -> None:
        self.js = js
        self.store = store
        self.max_bytes = max_bytes

    @classmethod
    async def open(cls, log: EventLog, *, max_bytes: int = 0) -> AudioStore:
        """Opens the bucket that provisioning created; ``max_bytes`` 0 means no limit."""
        return cls(log.js, await log.audio_store(), max_bytes=max_bytes)

    async def put(
        self,
        name: str,
        data: bytes,
        *,
        format: AudioFormat,
        sample_rate: int,
        channels: int = 1,
        duration_ms: int | None = None,
    ) -> AudioRef:
        """Stores a clip under ``name`` and returns the reference an event carries.

        The duration of PCM and WAV is computed from the bytes; Opus needs ``duration_ms``.
        """
        self._check_size(len(data))
        if duration_ms is None:
            duration_ms = _duration_of(data, format, sample_rate, channels)
        await self._write(name, data)
        return AudioRef(
            bucket=AUDIO_BUCKET,
            name=name,
            format=format,
            sample_rate=sample_rate,
            channels=channels,
            duration_ms=duration_ms,
            size=len(data),
        )

    async def get(self, ref: AudioRef) -> bytes:
        """Returns a clip's bytes; raises ``ObjectNotFoundError`` once its TTL removed it.

        A clip of one chunk (most: half a megabyte is 16 s of an utterance) is read with two
        direct gets, its metadata and its chunk, instead of the consumer ``ObjectStore.get``
        makes for every read: a third of the time, and reading an utterance is on the clock.
        """
        self._check_size(ref.size)
        stream = f"OBJ_{AUDIO_BUCKET}"
        try:
            meta = await self.js.get_last_msg(stream, _meta_subject(ref.name), direct=True)
            info = json.loads(meta.data or b"{}")
            if info.get("deleted") or "nuid" not in info:
                raise ObjectNotFoundError
            if not info.get("chunks"):
                return b""
            if info["chunks"] > 1:
                return bytes((await self.store.get(ref.name)).data or b"")
            chunk = await self.js.get_last_msg(
                stream, f"$O.{AUDIO_BUCKET}.C.{info['nuid']}", direct=True
            )
        except NotFoundError:
            raise ObjectNotFoundError from None
        return bytes(chunk.data or b"")

    async def _write(self, name: str, data: bytes) -> None:
        """Writes an object as ``ObjectStore.put`` does, but with its chunks and its metadata
        in flight together: one round trip instead of one per message plus a lookup, which is
        half the time of a short clip (the first clip of a reply is on the clock).

        Any object store client reads it back. Rewriting a name (a redelivered input) or a
        failed write leaves the old chunks and metadata to the bucket's TTL: the bucket takes
        no rollups and the edges may not purge it (a purge or rollup could empty it).
        """
        nuid = uuid.uuid4().hex
        chunks = f"$O.{AUDIO_BUCKET}.C.{nuid}"
        js = self.js
        acks = [
            await js.publish_async(chunks, data[at : at + _CHUNK_BYTES])
            for at in range(0, len(data), _CHUNK_BYTES)
        ]
        info = ObjectInfo(
            name=name,
            bucket=AUDIO_BUCKET,
            nuid=nuid,
            size=len(data),
            chunks=len(acks),
            mtime=datetime.now(UTC).isoformat(),
            digest="SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode(),
            options=ObjectMetaOptions(max_chunk_size=_CHUNK_BYTES),
        )
        meta = _meta_subject(name)
        acks.append(await js.publish_async(meta, json.dumps(info.as_dict()).encode()))
        await asyncio.gather(*acks)

    def _check_size(self, size: int) -> None:
        if self.max_bytes and size > self.max_bytes:
            raise AudioTooLarge(f"{size} bytes of audio is over the limit of {self.max_bytes}")


def _meta_subject(name: str) -> str:
    return f"$O.{AUDIO_BUCKET}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"


def _duration_of(data: bytes, format: AudioFormat, sample_rate: int, channels: int) -> int:
    if format == "pcm_s16le":
        return pcm_duration_ms(len(data), sample_rate, channels)
    if format == "wav":
        with wave.open(io.BytesIO(data)) as w:
            return w.getnframes() * 1000 // w.getframerate()
    raise ValueError(f"the duration of {format} audio must be given")


def wav_bytes(pcm: bytes, *, sample_rate: int, channels: int = 1) -> bytes:
    """Wraps s16le PCM in a WAV header (what upload APIs such as Whisper's expect)."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm)
    return out.getvalue()


def resample_pcm(pcm: bytes, *, rate: int, channels: int, to_rate: int, to_channels: int) -> bytes:
    """Converts s16le PCM to another sample rate and channel count (libswresample)."""
    if rate == to_rate and channels == to_channels:
        return pcm
    if rate == to_rate and channels == 1 and to_channels == 2:
        return np.repeat(np.frombuffer(pcm, np.int16), 2).tobytes()  # the common case, cheaply
    samples = np.frombuffer(pcm, np.int16)
    frame = av.AudioFrame.from_ndarray(
        samples.reshape(1, -1), format="s16", layout="mono" if channels == 1 else "stereo"
    )
    frame.sample_rate = rate
    resampler = av.AudioResampler(
        format="s16", layout="mono" if to_channels == 1 else "stereo", rate=to_rate
    )
    return b"".join(_pcm(f) for f in [*resampler.resample(frame), *resampler.resample(None)])


def decode_audio(data: bytes, *, to_rate: int, to_channels: int = 1) -> bytes:
    """Decodes a whole audio file (MP3, WAV, Ogg ...) into s16le PCM at ``to_rate``."""
    resampler = av.AudioResampler(
        format="s16", layout="mono" if to_channels == 1 else "stereo", rate=to_rate
    )
    out: list[bytes] = []
    with av.open(io.BytesIO(data)) as container:
        for frame in container.decode(audio=0):
            out.extend(_pcm(f) for f in resampler.resample(frame))
    out.extend(_pcm(f) for f in resampler.resample(None))
    return b"".join(out)


def _pcm(frame: av.AudioFrame) -> bytes:
    return frame.to_ndarray().tobytes()  # packed s16: one row of interleaved samples
