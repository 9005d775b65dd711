"""Libra in one voice channel: each speaker's voice into the log, the replies' clips out.

A :class:`VoiceCall` is its voice connection's sink. Every person's frames go to a
:class:`~libra.gateway.voice.VoiceCapture` of their own (conversation: the voice channel; user:
the speaker), so people talking at once are segmented apart and each utterance becomes a
``voice.captured`` of its speaker. A person's capture closes, settling what they were saying,
when they leave the call.

Replies come as ``tts.synthesized`` clips. The call plays each turn's clips in order of
``index`` and publishes ``reply.delivered`` (``modality`` voice, the clips played) once the
final one has played. Barge-in: a person who starts speaking while a reply is playing stops it
at the next 20 ms frame; each reply cut short (the one playing and those queued behind it) is
delivered with ``interrupted`` set, and its clips still to come are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from libra.contracts import (
    Origin,
    ReplyDelivered,
    TtsSynthesized,
    conversation_id,
    derive,
    user_id,
)
from libra.gateway.voice import SegmenterConfig, VoiceCapture
from libra.runtime.audio import AudioStore, resample_pcm
from libra.runtime.eventlog import EventLog

from .voice import Clip, LibraVoiceConnection, Played

__all__ = ["VoiceCall"]

log = logging.getLogger("libra.discord.voice")

_RATE, _SEND_CHANNELS = 48_000, 2  # Discord's audio is 48 kHz both ways; Libra sends stereo
# Replies remembered after they were delivered, so that an interrupted reply's late clips are
# recognised and dropped.
_KEEP_REPLIES = 256
# A speaker's frames kept while Discord is asked for their roles (5 s at 20 ms).
_HOLD_FRAMES = 250


@dataclass
class _Reply:
    """One turn's spoken reply, as far as it has been played."""

    next_index: int = 0
    waiting: dict[int, TtsSynthesized] = field(default_factory=dict)
    last: TtsSynthesized | None = None
    played: list[asyncio.Future[Played]] = field(default_factory=list)
    done: bool = False

    @property
    def heard(self) -> int:
        """Clips that were played, through or in part."""
        return sum(1 for f in self.played if f.done() and f.result().frames_sent)


class VoiceCall:
    """Libra in one voice channel: the connection's sink, the captures, the reply player."""

    def __init__(
        self,
        log_: EventLog,
        audio: AudioStore,
        *,
        guild: int,
        channel: int,
        segmenter: SegmenterConfig,
        channels: int = 1,
        fill_gaps_ms: int = 0,
        bitrate: int = 64_000,
        leave_empty_s: float = 60.0,
        on_empty: Callable[[VoiceCall], None],
        may_hear: Callable[[int], bool | Awaitable[bool]],
    ) -> None:
        self.log = log_
        self.audio = audio
        self.guild = guild
        self.channel = channel
        self.conversation = conversation_id("discord", guild, channel)
        self.origin = Origin(platform="discord", guild=str(guild), channel=str(channel))
        self.connection: LibraVoiceConnection | None = None
        self.automatic = True
        self._segmenter = segmenter
        self._channels = channels
        self._fill_gaps_ms = fill_gaps_ms
        self._bitrate = bitrate
        self._leave_empty_s = leave_empty_s
        self._on_empty = on_empty
        self._may_hear = may_hear
        self._unheard: set[int] = set()  # people Libra may not answer (access lists)
        # Speakers whose roles Discord is being asked for, and their frames meanwhile.
        self._deciding: dict[int, list[bytes]] = {}
        self._captures: dict[int, VoiceCapture] = {}
        self._present: set[int] = set()
        self._empty_timer: asyncio.TimerHandle | None = None
        self._clips: asyncio.Queue[TtsSynthesized] = asyncio.Queue()
        self._replies: dict[str, _Reply] = {}
        self._player_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def start(self, connection: LibraVoiceConnection) -> None:
        """Begins playing replies on ``connection``; the empty-channel clock starts now."""
        self.connection = connection
        self._player_task = asyncio.create_task(self._play_clips(), name=f"voice-{self.channel}")
        if not self._present:
            self._arm_empty_timer()

    async def close(self) -> None:
        """Settles every speaker's capture and waits until the log has what they said."""
        self._closed = True
        if self._empty_timer is not None:
            self._empty_timer.cancel()
        if self._player_task is not None:
            self._player_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._player_task
        captures, self._captures = list(self._captures.values()), {}
        await asyncio.gather(*(c.close() for c in captures), *self._tasks, return_exceptions=True)

    # --- what people say (VoiceSink) ---------------------------------------------------------

    def on_frame(self, user_id: int, pcm: bytes, rtp_timestamp: int) -> None:
        if self._closed or user_id in self._unheard:
            return
        held = self._deciding.get(user_id)
        if held is None:
            self._capture(user_id).feed(pcm)
        elif len(held) < _HOLD_FRAMES:
            held.append(pcm)

    def on_speaking(self, user_id: int, speaking: bool) -> None:
        if not speaking or user_id in self._deciding:
            return
        # Checked at each talk spurt, so that a change of the access lists applies.
        verdict = self._may_hear(user_id)
        if isinstance(verdict, bool):
            self._admit(user_id, verdict)
            return
        self._deciding[user_id] = []  # unknown roles: held until Discord says who they are
        self._background(self._decide(user_id, verdict))

    async def _decide(self, user_id: int, verdict: Awaitable[bool]) -> None:
        try:
            heard = await verdict
        finally:
            held = self._deciding.pop(user_id, [])
        self._admit(user_id, heard)
        if heard and not self._closed:
            capture = self._capture(user_id)
            for pcm in held:
                capture.feed(pcm)

    def _admit(self, user_id: int, heard: bool) -> None:
        if not heard:
            self._unheard.add(user_id)
            return
        self._unheard.discard(user_id)
        if any(r.played and not r.done for r in self._replies.values()):
            self.barge_in()

    def on_member(self, user_id: int, present: bool) -> None:
        if present:
            self._present.add(user_id)
            if self._empty_timer is not None:
                self._empty_timer.cancel()
                self._empty_timer = None
            return
        self._present.discard(user_id)
        capture = self._captures.pop(user_id, None)
        if capture is not None:
            self._background(capture.close())
        if not self._present and self.connection is not None:
            self._arm_empty_timer()

    def set_automatic(self, automatic: bool) -> None:
        """``/voice auto|manual``: VAD cuts utterances, or only /record and /stop do."""
        self.automatic = automatic
        for capture in self._captures.values():
            capture.set_automatic(automatic)

    def start_recording(self, user_id: int) -> None:
        """``/record``: keeps everything ``user_id`` says until :meth:`stop_recording`."""
        if not self._closed:
            self._capture(user_id).start_recording()

    def stop_recording(self, user_id: int) -> None:
        """``/stop``: what ``user_id`` said since /record becomes one ``voice.captured``."""
        capture = self._captures.get(user_id)
        if capture is not None:
            capture.stop_recording()

    def _capture(self, speaker: int) -> VoiceCapture:
        capture = self._captures.get(speaker)
        if capture is None:
            capture = self._captures[speaker] = VoiceCapture(
                self.log,
                self.audio,
                conversation=self.conversation,
                user=user_id("discord", str(speaker)),
                origin=self.origin,
                config=self._segmenter,
                automatic=self.automatic,
                sample_rate=_RATE,
                channels=self._channels,
                fill_gaps_ms=self._fill_gaps_ms,
            )
            capture.start()
        return capture

    def _arm_empty_timer(self) -> None:
        if self._empty_timer is None and not self._closed:
            self._empty_timer = asyncio.get_running_loop().call_later(
                self._leave_empty_s, self._on_empty, self
            )

    # --- what Libra says ---------------------------------------------------------------------

    def take(self, clip: TtsSynthesized) -> None:
        """Queues a synthesized clip of this call's conversation; clips play in index order."""
        if not self._closed:
            self._clips.put_nowait(clip)

    def barge_in(self) -> None:
        """Stops Libra mid-reply; every reply cut short is delivered as interrupted."""
        if self.connection is None:
            return
        cut = self.connection.player.stop()
        for reply in self._replies.values():
            if reply.played and not reply.done:
                self._deliver(reply, interrupted=True)
        log.info(
            "barge-in in %s: %.0f ms of the clip heard, %d queued clip(s) dropped",
            self.conversation,
            cut.played_ms,
            len(cut.dropped),
        )

    async def _play_clips(self) -> None:
        while True:
            event = await self._clips.get()
            reply = self._reply(event.turn)
            if reply.done or event.index < reply.next_index:
                continue
            reply.waiting[event.index] = event
            while (ready := reply.waiting.pop(reply.next_index, None)) is not None:
                reply.next_index += 1
                await self._play(reply, ready)

    async def _play(self, reply: _Reply, event: TtsSynthesized) -> None:
        try:
            clip = await self._clip(event)
        except Exception:  # one clip that cannot be played must not silence the rest
            log.exception("could not prepare clip %s of turn %s", event.index, event.turn)
            clip = None
        if reply.done or self.connection is None:  # interrupted while the clip was prepared
            return
        if clip is not None:
            reply.last = event
            reply.played.append(self.connection.player.play(clip))
        if event.final:
            self._background(self._finish(reply, event))

    async def _clip(self, event: TtsSynthesized) -> Clip | None:
        data = await self.audio.get(event.audio)
        if not data:
            return None
        ref, bitrate = event.audio, self._bitrate

        def encode() -> Clip:  # CPU work: a thread keeps the 20 ms frames of the loop on time
            if ref.format != "pcm_s16le":
                return Clip.from_audio_file(event.id, data, bitrate=bitrate)
            pcm = resample_pcm(
                data,
                rate=ref.sample_rate,
                channels=ref.channels,
                to_rate=_RATE,
                to_channels=_SEND_CHANNELS,
            )
            return Clip.from_pcm(event.id, pcm, bitrate=bitrate)

        return await asyncio.to_thread(encode)

    async def _finish(self, reply: _Reply, final: TtsSynthesized) -> None:
        if reply.played:
            await reply.played[-1]  # the player plays in order: the last clip ends the reply
        if not reply.done:
            reply.last = final
            self._deliver(reply, interrupted=False)

    def _deliver(self, reply: _Reply, *, interrupted: bool) -> None:
        reply.done = True
        parent = reply.last
        if parent is None:
            return
        self._background(
            self.log.publish(
                derive(
                    parent,
                    ReplyDelivered,
                    key="delivered",
                    modality="voice",
                    clips=reply.heard,
                    interrupted=interrupted,
                    origin=parent.origin,
                )
            )
        )

    def _reply(self, turn: str) -> _Reply:
        reply = self._replies.get(turn)
        if reply is None:
            if len(self._replies) >= _KEEP_REPLIES:
                oldest = next((t for t, r in self._replies.items() if r.done), None)
                self._replies.pop(oldest or next(iter(self._replies)))
            reply = self._replies[turn] = _Reply()
        return reply

    def _background(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("voice call task failed in %s", self.conversation, exc_info=task.exception())
