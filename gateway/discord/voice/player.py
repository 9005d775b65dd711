"""Libra's voice out: clips played in order as 20 ms Opus frames on a monotonic clock."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from .opus import decode_audio, encode_pcm
from .rtp import FRAME_SECONDS, OPUS_SILENCE

__all__ = ["Clip", "Interruption", "Played", "Player"]

# Discord asks for five frames of silence after speech, so that receivers' decoders do not
# interpolate past the end.
SILENCE_FRAMES = 5
# Late by more than this (a stalled loop), the grid moves on instead of bursting to catch up.
_MAX_LATENESS = 0.1
# asyncio wakes a timer up to 1 ms late (epoll counts whole milliseconds): aiming half a
# millisecond early centres the send times on the grid.
_AIM_EARLY = 0.0005


@dataclass(frozen=True, slots=True)
class Clip:
    """A piece of speech: 20 ms Opus frames (48 kHz stereo), and the id the caller knows it by."""

    id: str
    frames: tuple[bytes, ...]

    @property
    def duration_ms(self) -> float:
        return len(self.frames) * FRAME_SECONDS * 1000

    @classmethod
    def from_opus(cls, id: str, frames: Sequence[bytes]) -> Clip:
        """A clip of pre-encoded 20 ms Opus frames."""
        return cls(id=id, frames=tuple(frames))

    @classmethod
    def from_pcm(cls, id: str, pcm: bytes, *, bitrate: int = 64_000) -> Clip:
        """Encodes 48 kHz stereo s16le PCM (CPU work: call it in a thread for long clips)."""
        return cls(id=id, frames=tuple(encode_pcm(pcm, bitrate=bitrate)))

    @classmethod
    def from_audio_file(cls, id: str, data: bytes, *, bitrate: int = 64_000) -> Clip:
        """Decodes an audio file (WAV, Ogg, MP3 ...) and encodes it; CPU work, as from_pcm."""
        return cls.from_pcm(id, decode_audio(data), bitrate=bitrate)


@dataclass(frozen=True, slots=True)
class Played:
    """How a clip ended: played through, or cut off after ``frames_sent`` frames."""

    clip: Clip
    frames_sent: int
    interrupted: bool

    @property
    def played_ms(self) -> float:
        return self.frames_sent * FRAME_SECONDS * 1000


@dataclass(frozen=True, slots=True)
class Interruption:
    """What a barge-in cut short: the clip playing, how much was heard, the clips never begun."""

    clip: Clip | None
    played_ms: float
    dropped: tuple[Clip, ...]


class Player:
    """Plays clips in order; ``send`` gets each frame and its slot on the 20 ms grid.

    The grid is anchored to the monotonic clock when a talk spurt starts, and each slot is
    computed from that anchor, so lateness never accumulates over minutes. ``speaking`` is
    awaited with True before the first frame and with False after the silence frames.
    """

    def __init__(
        self,
        *,
        send: Callable[[bytes, float], None],
        speaking: Callable[[bool], Awaitable[None]],
        on_sent: Callable[[float, float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._send = send
        self._speaking = speaking
        self._on_sent = on_sent
        self._clock = clock
        self._queue: collections.deque[tuple[Clip, asyncio.Future[Played]]] = collections.deque()
        self._current: tuple[Clip, asyncio.Future[Played]] | None = None
        self._position = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.talking = False

    def play(self, clip: Clip) -> asyncio.Future[Played]:
        """Queues a clip; the future resolves when it has been played or cut off."""
        future: asyncio.Future[Played] = asyncio.get_running_loop().create_future()
        self._queue.append((clip, future))
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="voice-player")
        self._wake.set()
        return future

    def stop(self) -> Interruption:
        """Barge-in: cuts the clip playing and drops the queue; the next slot is silence."""
        clip, played_ms = None, 0.0
        if self._current is not None:
            clip, future = self._current
            played = Played(clip, self._position, interrupted=True)
            played_ms = played.played_ms
            _resolve(future, played)
            self._current = None
        dropped = []
        while self._queue:
            queued, future = self._queue.popleft()
            _resolve(future, Played(queued, 0, interrupted=True))
            dropped.append(queued)
        return Interruption(clip=clip, played_ms=played_ms, dropped=tuple(dropped))

    @property
    def busy(self) -> bool:
        """Whether a clip is playing or queued."""
        return self._current is not None or bool(self._queue)

    async def close(self) -> None:
        """Stops playing and ends the player's task."""
        self.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.talking:
            self.talking = False
            await self._speaking(False)

    def _next_frame(self) -> bytes | None:
        while True:
            if self._current is None:
                if not self._queue:
                    return None
                self._current = self._queue.popleft()
                self._position = 0
            clip, future = self._current
            if self._position < len(clip.frames):
                self._position += 1
                return clip.frames[self._position - 1]
            _resolve(future, Played(clip, self._position, interrupted=False))
            self._current = None

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.busy:
                await self._talk()

    async def _talk(self) -> None:
        """One talk spurt: frames while there are clips, then the silence frames."""
        self.talking = True
        # Discord wants the speaking flag before the first packet.
        await self._speaking(True)
        anchor = self._clock()
        slot_index = 0
        silence_left = SILENCE_FRAMES
        while silence_left:
            slot = anchor + slot_index * FRAME_SECONDS
            delay = slot - self._clock()
            if delay > _AIM_EARLY:
                await asyncio.sleep(delay - _AIM_EARLY)
            elif -delay > _MAX_LATENESS:
                anchor -= delay
                slot = anchor + slot_index * FRAME_SECONDS
            # The frame is chosen after the wait, so a stop() during it silences this very slot.
            frame = self._next_frame()
            if frame is None:
                frame = OPUS_SILENCE
                silence_left -= 1
            else:
                silence_left = SILENCE_FRAMES
            self._send(frame, slot)
            if self._on_sent is not None:
                self._on_sent(slot, self._clock())
            slot_index += 1
        self.talking = False
        await self._speaking(False)


def _resolve(future: asyncio.Future[Played], played: Played) -> None:
    if not future.done():
        future.set_result(played)
