"""One speaker's voice into the log: segment, store the audio, publish the events.

The Discord voice transport and the HTTP API open one :class:`VoiceCapture` per speaker and feed
it PCM as it comes. Feeding only runs the VAD and the segmenter (a fraction of a millisecond per
20 ms frame); storing and publishing happen in order on a task of their own, so that a slow
write never holds up the next frame.

A live speaker (Discord) stops sending audio when they stop talking, yet the end of their turn
is 500 ms of silence *after* that: with ``fill_gaps_ms`` set, a capture whose utterance is still
open and that got no audio for that long feeds itself silence, frame by frame on the wall clock,
so the silence is confirmed on time.

Events: an utterance becomes ``voice.captured`` (its id is also its turn), its audio stored as
16 kHz mono s16le under ``voice/<conversation>/<id>``. While it is spoken, with
``ASR_INCREMENTAL`` on, each second of it goes out as ``voice.partial`` (its audio stored the
same way), all of them and the capture sharing one ``utterance`` key, so that a local recogniser
has heard most of it by the time the person pauses. With the local whisper first, a pause of
``ASR_EARLY_MS`` sends the rest of the utterance as a ``voice.partial`` with ``pause`` set, so
that it is transcribed before the speculative cut. A confirmation becomes ``voice.ended``
for that turn, and talking on after a speculative cut ``voice.resumed`` for it.
``speech_ended_at`` is the wall-clock time of the end of the last voiced frame.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from types import TracebackType

import numpy as np

from libra.contracts import (
    Origin,
    VoiceCaptured,
    VoiceEnded,
    VoicePartial,
    VoiceResumed,
    derive,
    make,
    new_id,
)
from libra.runtime.audio import AudioStore
from libra.runtime.config import Settings
from libra.runtime.eventlog import EventLog

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

__all__ = ["VoiceCapture", "segmenter_config"]

log = logging.getLogger("libra.voice")

FRAME_S = 0.020
PARTIAL_MS = 1000  # how much more of an utterance each voice.partial brings
_SILENT_FRAME = np.zeros(FRAME_SAMPLES, np.int16)


def segmenter_config(settings: Settings) -> SegmenterConfig:
    """Returns the segmentation rules the settings ask for (``VAD_*``)."""
    return SegmenterConfig(
        silence_ms=settings.vad_silence_ms,
        speculative_ms=settings.vad_speculative_ms,
        max_utterance_ms=int(settings.vad_max_utterance_sec * 1000),
        min_speech_ms=settings.vad_min_speech_ms,
        threshold=settings.vad_threshold,
        partial_ms=PARTIAL_MS if settings.asr_partials else 0,
        early_ms=settings.asr_early_decode_ms,
    )


class VoiceCapture:
    """Segments one speaker's audio and writes each utterance to the log, in order."""

    def __init__(
        self,
        log_: EventLog,
        audio: AudioStore,
        *,
        conversation: str,
        user: str,
        origin: Origin,
        config: SegmenterConfig | None = None,
        automatic: bool = True,
        sample_rate: int = 48_000,
        channels: int = 2,
        fill_gaps_ms: int = 0,
    ) -> None:
        self.log = log_
        self.audio = audio
        self.conversation = conversation
        self.user = user
        self.origin = origin
        self.segmenter = Segmenter(SileroVad(), config, automatic=automatic)
        self._frames = FrameSplitter(sample_rate=sample_rate, channels=channels)
        self._queue: asyncio.Queue[tuple[Decision, datetime] | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._captured: dict[int, VoiceCaptured] = {}
        self._utterance = (-1, "")  # the open utterance's start (ms) and its partials' key
        self._gap_s = fill_gaps_ms / 1000
        self._fed_until = 0.0  # loop time at which the audio fed so far ends
        self._filler: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> VoiceCapture:
        self.start()
        return self

    def start(self) -> None:
        """Starts writing utterances to the log (what ``async with`` does), from sync code."""
        if self._writer is None:
            self._writer = asyncio.create_task(self._write(), name=f"voice-{self.conversation}")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def feed(self, pcm: bytes) -> None:
        """Takes the next piece of the speaker's audio (any length); call it on the loop."""
        for frame in self._frames(pcm):
            self._decided(self.segmenter.feed(frame))
        if self._gap_s:
            self._fed_until = asyncio.get_running_loop().time()
            self._arm(self._fed_until + self._gap_s)

    def _arm(self, when: float) -> None:
        if self._filler is not None:
            self._filler.cancel()
        self._filler = None
        if self.segmenter.in_utterance:  # nobody is talking: nothing to time, nothing to feed
            self._filler = asyncio.get_running_loop().call_at(when, self._fill)

    def _fill(self) -> None:
        """Feeds the silence the speaker's missing audio stands for, up to now."""
        now = asyncio.get_running_loop().time()
        missing = int((now - self._fed_until) / FRAME_S)
        for _ in range(missing):
            self._decided(self.segmenter.feed(_SILENT_FRAME))
        self._fed_until += missing * FRAME_S
        self._arm(self._fed_until + FRAME_S)  # then one frame each time one would have come

    def set_automatic(self, automatic: bool) -> None:
        """Switches between VAD mode and manual mode; an open automatic utterance ends first."""
        if self.segmenter.in_utterance:
            self._decided(self.segmenter.flush())
        self.segmenter.automatic = automatic

    def start_recording(self) -> None:
        """``/record``: keeps everything until :meth:`stop_recording`, as one utterance."""
        self._decided(self.segmenter.start_recording())

    def stop_recording(self) -> None:
        """``/stop``: ends the manual recording; it becomes one ``voice.captured``."""
        self._decided(self.segmenter.stop_recording())

    async def close(self) -> None:
        """Settles the utterance in progress and waits until every event is written."""
        if self._filler is not None:
            self._filler.cancel()
        self._decided(self.segmenter.flush())
        if self._writer is not None:
            self._queue.put_nowait(None)
            await self._writer
            self._writer = None

    def _decided(self, decisions: list[Decision]) -> None:
        if decisions:
            # The last frame fed ended now: that maps the stream's clock onto the wall clock.
            now = datetime.now(UTC)
            for decision in decisions:
                end_ms = self.segmenter.now_ms  # a resumption or a partial: it happened now
                if isinstance(decision, Utterance | Confirmed):
                    end_ms = decision.speech_end_ms
                behind = timedelta(milliseconds=self.segmenter.now_ms - end_ms)
                self._queue.put_nowait((decision, now - behind))

    async def _write(self) -> None:
        while (item := await self._queue.get()) is not None:
            decision, speech_ended_at = item
            try:
                match decision:
                    case Utterance():
                        await self._publish_utterance(decision, speech_ended_at)
                    case Partial():
                        await self._publish_partial(decision)
                    case Confirmed():
                        await self._publish_end(decision)
                    case Resumed():
                        await self._publish_resumed(decision)
            except Exception:  # one lost utterance must not end the speaker's capture
                log.exception("could not write a voice event")

    async def _publish_utterance(self, utterance: Utterance, speech_ended_at: datetime) -> None:
        event_id = new_id()
        ref = await self.audio.put(
            f"voice/{self.conversation}/{event_id}",
            utterance.pcm,
            format="pcm_s16le",
            sample_rate=SAMPLE_RATE,
        )
        captured = make(
            VoiceCaptured,
            id=event_id,
            conversation=self.conversation,
            user=self.user,
            audio=ref,
            origin=self.origin,
            mode="manual" if utterance.manual else "auto",
            speech_ended_at=speech_ended_at,
            speculative=utterance.speculative,
            utterance=self._utterance[1] if self._utterance[0] == utterance.start_ms else "",
            speech_ms=utterance.speech_end_ms - utterance.start_ms,
        )
        await self.log.publish(captured)
        self._captured.clear()  # only the newest capture can still be confirmed
        if utterance.speculative:
            self._captured[utterance.seq] = captured

    async def _publish_partial(self, partial: Partial) -> None:
        if self._utterance[0] != partial.start_ms:  # the first piece of a new utterance
            self._utterance = (partial.start_ms, new_id())
        event_id = new_id()
        ref = await self.audio.put(
            f"voice/{self.conversation}/{event_id}",
            partial.pcm,
            format="pcm_s16le",
            sample_rate=SAMPLE_RATE,
        )
        await self.log.publish(
            make(
                VoicePartial,
                id=event_id,
                conversation=self.conversation,
                user=self.user,
                utterance=self._utterance[1],
                offset_ms=partial.offset_ms,
                audio=ref,
                origin=self.origin,
                pause=partial.pause,
            )
        )

    async def _publish_end(self, confirmed: Confirmed) -> None:
        captured = self._captured.pop(confirmed.seq, None)
        if captured is None:  # its capture could not be written: nothing to confirm
            return
        await self.log.publish(
            derive(
                captured,
                VoiceEnded,
                key="ended",
                captured=captured.id,
                speech_ended_at=captured.speech_ended_at,  # the same last voiced frame
                origin=self.origin,
            )
        )

    async def _publish_resumed(self, resumed: Resumed) -> None:
        captured = self._captured.pop(resumed.seq, None)
        if captured is None:  # its capture could not be written: nothing was started for it
            return
        await self.log.publish(
            derive(captured, VoiceResumed, key="resumed", captured=captured.id, origin=self.origin)
        )
