"""Cutting one speaker's audio into utterances: a pure, synchronous state machine.

Feed it 20 ms frames of 16 kHz mono; it answers with decisions. Nothing here waits, stores or
publishes (``capture.py`` does that), so every rule is tested frame by frame.

The rules, in stream time (20 ms per frame fed):

- An utterance starts at a voiced frame and includes ``preroll_ms`` of the audio before it
  (VAD notices speech a little late; Whisper wants the onset).
- *Speculative cut*: at the first pause of ``speculative_ms``, the utterance so far is emitted
  as ``Utterance(speculative=True)``, so that transcription runs while the silence is still
  being confirmed. If the silence reaches ``silence_ms``, a ``Confirmed`` for it follows. If the
  person goes on talking, a ``Resumed`` for it says that it will never be confirmed (what was
  started for it can stop), and the next pause emits a new speculative utterance holding the
  whole, longer audio.
- With ``speculative_ms`` 0 (or not shorter than ``silence_ms``), utterances are emitted once,
  non-speculative, when the silence is confirmed.
- An utterance reaching ``max_utterance_ms`` is emitted as it stands (non-speculative) and a new
  one begins. Utterances with less than ``min_speech_ms`` of voiced frames (a cough, a click)
  are dropped.
- *End of speech*: Silero's windows are 32 ms long and its LSTM lingers, so it calls a frame or
  two of silence after the last word voiced. When a pause begins, the end is moved back over up
  to three trailing frames whose energy is far below the utterance's loudest frame. The silence
  is counted from there, and ``speech_end_ms`` reports it.
- *Partials*: with ``partial_ms`` set, every ``partial_ms`` of an open utterance (stream time)
  the audio since the last one is emitted as ``Partial`` at a voiced frame, so that a local
  recogniser hears the utterance while it is spoken. The pieces of one utterance, joined in
  order, are the start of its ``Utterance`` audio; they share its ``start_ms``.
- *Early decode*: with ``early_ms`` set (shorter than ``speculative_ms``), a pause of that long
  sends what the utterance has not sent yet as a ``Partial`` with ``pause`` set: a local
  recogniser transcribes the whole utterance at once, and the speculative cut that may follow
  reuses the transcript instead of starting over. A person who goes on talking costs only that
  decode; the next pause sends the rest.
- *Manual mode* (``/record`` then ``/stop``): between :meth:`Segmenter.start_recording` and
  :meth:`Segmenter.stop_recording` every frame is kept and automatic cuts are suspended; stop
  emits one non-speculative ``Utterance(manual=True)``, unless it holds no speech at all.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .vad import FRAME_SAMPLES

__all__ = [
    "FRAME_MS",
    "Confirmed",
    "Decision",
    "Partial",
    "Resumed",
    "Segmenter",
    "SegmenterConfig",
    "Utterance",
]

FRAME_MS = 20
_HYSTERESIS = 0.15  # once speaking, a frame stays voiced down to threshold - 0.15 (as Silero does)
_TRIM_FRAMES = 3  # how far the end of speech may move back over quiet frames the VAD voiced
_TRIM_BELOW_PEAK_DB = 35.0
_SILENT_DB = -70.0


@dataclass(frozen=True, slots=True)
class SegmenterConfig:
    """The segmentation rules; durations are counted in whole 20 ms frames, rounded up."""

    silence_ms: int = 500
    speculative_ms: int = 150
    max_utterance_ms: int = 30_000
    min_speech_ms: int = 200
    threshold: float = 0.5
    preroll_ms: int = 200
    partial_ms: int = 0  # 0: no partials
    early_ms: int = 0  # 0: no decode at the start of a pause


@dataclass(frozen=True, slots=True)
class Utterance:
    """Audio to transcribe: 16 kHz mono s16le, with its place in the stream."""

    seq: int
    pcm: bytes
    start_ms: int
    end_ms: int
    speech_end_ms: int
    speculative: bool = False
    manual: bool = False

    @property
    def duration_ms(self) -> int:
        return self.end_ms - self.start_ms


@dataclass(frozen=True, slots=True)
class Partial:
    """The next piece of the open utterance that starts at ``start_ms``, from ``offset_ms`` on."""

    start_ms: int
    offset_ms: int
    pcm: bytes
    pause: bool = False  # sent at the start of a pause: the whole utterance may end here


@dataclass(frozen=True, slots=True)
class Confirmed:
    """The silence after speculative utterance ``seq`` lasted: the turn is over."""

    seq: int
    speech_end_ms: int


@dataclass(frozen=True, slots=True)
class Resumed:
    """The person went on talking after speculative utterance ``seq``: it is not the turn."""

    seq: int


Decision = Utterance | Partial | Confirmed | Resumed


def _frames(ms: int) -> int:
    return -(-ms // FRAME_MS)


def _frame_db(frame: np.ndarray) -> float:
    """Returns the frame's energy in dB relative to full scale."""
    x = frame.astype(np.float32)
    return 10.0 * float(np.log10(float(np.dot(x, x)) / len(x) + 1e-3)) - 90.309


class Segmenter:
    """Turns one speaker's 20 ms frames into :class:`Utterance` and :class:`Confirmed` decisions."""

    def __init__(
        self,
        vad: Callable[[np.ndarray], float],
        config: SegmenterConfig | None = None,
        *,
        automatic: bool = True,
    ) -> None:
        self.vad = vad
        self.config = c = config or SegmenterConfig()
        self.automatic = automatic
        self._silence = max(1, _frames(c.silence_ms))
        spec = _frames(c.speculative_ms)
        self._speculative = spec if 0 < spec < self._silence else 0
        early = _frames(c.early_ms)
        self._early = early if 0 < early < (self._speculative or self._silence) else 0
        self._max_frames = max(1, c.max_utterance_ms // FRAME_MS)
        self._min_voiced = _frames(c.min_speech_ms)
        self._partial = _frames(c.partial_ms)
        self._preroll: deque[np.ndarray] = deque(maxlen=_frames(c.preroll_ms))
        self._energy: deque[float] = deque(maxlen=_TRIM_FRAMES + 1)
        self._frames: list[np.ndarray] = []
        self._index = 0  # frames fed so far: the stream clock
        self._seq = 0
        self._recording = False
        self._reset_utterance()

    @property
    def now_ms(self) -> int:
        """Stream time: the end of the last frame fed."""
        return self._index * FRAME_MS

    @property
    def in_utterance(self) -> bool:
        """Whether an automatic utterance is open (speech, or the pause after it)."""
        return bool(self._frames) and not self._recording

    def feed(self, frame: np.ndarray) -> list[Decision]:
        """Reads one frame (320 int16 samples) and returns what it decided, usually nothing."""
        if len(frame) != FRAME_SAMPLES:
            raise ValueError(f"a frame is {FRAME_SAMPLES} samples of 16 kHz audio")
        index = self._index
        self._index += 1
        prob = self.vad(frame)
        self._energy.append(_frame_db(frame))
        if self._recording:
            return self._record(frame, index, prob)
        if not self.automatic:
            return []
        if not self._frames:
            return self._idle(frame, index, prob)
        return self._speaking(frame, index, prob)

    def start_recording(self) -> list[Decision]:
        """Starts a manual recording; an automatic utterance in progress ends first."""
        out = self.flush()
        self._recording = True
        self._start = self._index
        return out

    def stop_recording(self) -> list[Decision]:
        """Ends a manual recording; returns its utterance unless it held no speech."""
        if not self._recording:
            return []
        self._recording = False
        out = [self._cut(manual=True)] if self._voiced >= max(1, self._min_voiced) else []
        self._reset_utterance()
        return out

    def flush(self) -> list[Decision]:
        """Ends the stream (the speaker left): settles the utterance in progress."""
        if self._recording:
            return self.stop_recording()
        out: list[Decision] = []
        if self._pending is not None:
            out.append(Confirmed(self._pending, self._speech_end_ms))
        elif self._frames and self._voiced >= self._min_voiced:
            out.append(self._cut())
        self._reset_utterance()
        return out

    # --- automatic mode -------------------------------------------------------------------

    def _idle(self, frame: np.ndarray, index: int, prob: float) -> list[Decision]:
        if prob < self.config.threshold:
            self._preroll.append(frame)
            return []
        self._frames = [*self._preroll, frame]
        self._preroll.clear()
        self._start = index + 1 - len(self._frames)
        self._peak_db = self._energy[-1]
        self._voiced = 1
        self._last_voiced = index
        self._in_pause = False
        return []

    def _speaking(self, frame: np.ndarray, index: int, prob: float) -> list[Decision]:
        self._frames.append(frame)
        out: list[Decision] = []
        if prob >= self.config.threshold - _HYSTERESIS:
            self._voiced += 1
            self._last_voiced = index
            self._peak_db = max(self._peak_db, self._energy[-1])
            self._in_pause = False
            self._early_sent = False
            if self._pending is not None:  # they went on talking: that cut is not the turn
                out.append(Resumed(self._pending))
                self._pending = None
            if self._partial and len(self._frames) - self._sent >= self._partial:
                out.append(self._next_partial())
        else:
            if not self._in_pause:
                self._in_pause = True
                self._trim_end(index)
            out = self._pause(index)
            if out or not self._frames:
                return out
        if index + 1 - self._start >= self._max_frames:
            return [*out, *self._split()]
        return out

    def _pause(self, index: int) -> list[Decision]:
        silent = index - self._last_voiced
        enough = self._voiced >= self._min_voiced
        if silent >= self._silence:
            out: list[Decision] = []
            if self._pending is not None:
                out.append(Confirmed(self._pending, self._speech_end_ms))
            elif enough:
                out.append(self._cut())
            self._end_utterance(silent)
            return out
        if self._early and silent >= self._early and not self._early_sent and enough:
            self._early_sent = True
            if self._pending is None and len(self._frames) > self._sent:
                return [self._next_partial(pause=True)]
        if self._speculative and silent >= self._speculative and self._pending is None and enough:
            cut = self._cut(speculative=True)
            self._pending = cut.seq
            return [cut]
        return []

    def _trim_end(self, index: int) -> None:
        """Moves the end of speech back over trailing frames far quieter than the speech."""
        floor = max(self._peak_db - _TRIM_BELOW_PEAK_DB, _SILENT_DB)
        energy = self._energy  # energy[-1] is frame `index`
        last = self._last_voiced
        while (
            index - last <= _TRIM_FRAMES
            and last > self._start
            and self._voiced > 1
            and energy[last - index - 1] < floor
        ):
            last -= 1
        self._last_voiced = last

    def _split(self) -> list[Decision]:
        """The utterance reached its longest: emit it as it stands, and start afresh."""
        out: list[Decision] = [self._cut()] if self._voiced >= self._min_voiced else []
        self._reset_utterance()
        return out

    def _next_partial(self, *, pause: bool = False) -> Partial:
        offset, self._sent = self._sent, len(self._frames)
        return Partial(
            start_ms=self._start * FRAME_MS,
            offset_ms=offset * FRAME_MS,
            pcm=np.concatenate(self._frames[offset:]).tobytes(),
            pause=pause,
        )

    def _end_utterance(self, silent: int) -> None:
        trailing = self._frames[len(self._frames) - silent :]  # the pause: next one's preroll
        self._reset_utterance()
        self._preroll.extend(trailing)

    # --- manual mode ----------------------------------------------------------------------

    def _record(self, frame: np.ndarray, index: int, prob: float) -> list[Decision]:
        self._frames.append(frame)
        if prob >= self.config.threshold:
            self._voiced += 1
            self._last_voiced = index
        if len(self._frames) >= self._max_frames:
            out = [self._cut(manual=True)] if self._voiced >= max(1, self._min_voiced) else []
            self._frames, self._voiced, self._start = [], 0, self._index
            return out
        return []

    # --- shared ---------------------------------------------------------------------------

    @property
    def _speech_end_ms(self) -> int:
        return (self._last_voiced + 1) * FRAME_MS

    def _cut(self, *, speculative: bool = False, manual: bool = False) -> Utterance:
        self._seq += 1
        return Utterance(
            seq=self._seq,
            pcm=np.concatenate(self._frames).tobytes() if self._frames else b"",
            start_ms=self._start * FRAME_MS,
            end_ms=self._index * FRAME_MS,
            speech_end_ms=self._speech_end_ms,
            speculative=speculative,
            manual=manual,
        )

    def _reset_utterance(self) -> None:
        self._frames = []
        self._sent = 0  # frames of the utterance already sent as partials
        self._start = self._index
        self._voiced = 0
        self._last_voiced = self._index - 1
        self._peak_db = _SILENT_DB
        self._in_pause = False
        self._early_sent = False
        self._pending: int | None = None
