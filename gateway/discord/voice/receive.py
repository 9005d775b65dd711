"""Received RTP to each speaker's PCM: decrypt both layers, reorder, decode, hand to the sink.

A lost packet is rebuilt from the in-band FEC of the packet after it when that one is already
here (the jitter buffer releases them together), or else by libopus's concealment.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from .cipher import TransportCipher
from .dave import DaveError, DaveState
from .jitter import JitterBuffer, Late
from .metrics import PACKETS_RECEIVED, RECEIVE_SECONDS, VoiceStats
from .opus import OpusDecoder, OpusInvalid
from .rtp import FRAME_SAMPLES, FRAME_SECONDS, OPUS_PAYLOAD_TYPE, MalformedPacket, is_rtcp
from .rtp import parse_header as parse_rtp
from .sink import VoiceSink

__all__ = ["Receiver"]

_log = logging.getLogger(__name__)


@dataclass
class _Speaker:
    user_id: int
    decoder: OpusDecoder
    jitter: JitterBuffer[tuple[int, bytes]]
    last_packet: float = 0.0
    speaking: bool = False
    next_timestamp: int = 0


class Receiver:
    """Keeps speakers apart by SSRC and feeds the sink; every bad datagram is dropped and counted.

    ``cipher`` and ``dave`` are set by the session once the voice server has described it.
    """

    def __init__(
        self,
        sink: VoiceSink,
        stats: VoiceStats,
        *,
        channels: int,
        jitter_seconds: float,
        idle_seconds: float,
    ) -> None:
        self.sink = sink
        self.stats = stats
        self.cipher: TransportCipher | None = None
        self.dave: DaveState | None = None
        self._channels = channels
        self._jitter_seconds = jitter_seconds
        self._depth = max(1, round(jitter_seconds / FRAME_SECONDS))
        self._idle_seconds = idle_seconds
        self._speakers: dict[int, _Speaker] = {}

    def map_ssrc(self, ssrc: int, user_id: int) -> None:
        """Records whose audio arrives on an SSRC (from op 5, speaking)."""
        known = self._speakers.get(ssrc)
        if known is not None and known.user_id == user_id:
            return
        if known is not None:
            self._stop(known)
        self._speakers[ssrc] = _Speaker(
            user_id=user_id,
            decoder=OpusDecoder(self._channels),
            jitter=JitterBuffer(depth=self._depth),
        )

    def forget_user(self, user_id: int) -> None:
        """Drops a person who left: their SSRCs may be given to someone else."""
        for ssrc, speaker in list(self._speakers.items()):
            if speaker.user_id == user_id:
                self._stop(speaker)
                del self._speakers[ssrc]

    def clear(self) -> None:
        """Forgets every SSRC (a new voice server assigns new ones)."""
        for user_id in {speaker.user_id for speaker in self._speakers.values()}:
            self.forget_user(user_id)

    def on_datagram(self, data: bytes) -> None:
        """Handles one datagram from the voice server; never raises for bad input."""
        arrived = time.perf_counter()
        try:
            self._receive(data, arrived)
        except (MalformedPacket, Late) as exc:
            self.stats.drop(exc.reason)
        except DaveError as exc:
            self.stats.drop(str(exc))
        except Exception:  # a failing sink or decoder must not close the socket (asyncio would)
            _log.exception("a received voice packet could not be handled")
            self.stats.drop("error")
        else:
            self.stats.received += 1
            PACKETS_RECEIVED.inc()
            RECEIVE_SECONDS.observe(time.perf_counter() - arrived)

    def _receive(self, data: bytes, now: float) -> None:
        if is_rtcp(data):
            raise MalformedPacket("rtcp")
        header = parse_rtp(data)
        if header.payload_type != OPUS_PAYLOAD_TYPE:
            raise MalformedPacket("not_opus")
        speaker = self._speakers.get(header.ssrc)
        if speaker is None:
            raise MalformedPacket("unknown_ssrc")
        if self.cipher is None:
            raise MalformedPacket("no_key")
        opus = self.cipher.open(data, header)
        # Replays and stragglers go before DAVE's work (DAVE would refuse a replay anyway).
        speaker.jitter.check(header.sequence)
        if self.dave is not None:
            opus = self.dave.decrypt(speaker.user_id, opus)
        if not speaker.speaking:
            speaker.speaking = True
            self.sink.on_speaking(speaker.user_id, True)
        speaker.last_packet = now
        self._emit(speaker, speaker.jitter.push(header.sequence, (header.timestamp, opus), now))

    def _emit(self, speaker: _Speaker, items: list[tuple[int, bytes] | None]) -> None:
        """Decodes what the jitter buffer released, in order; ``None`` is a lost packet."""
        for index, item in enumerate(items):
            if item is None:
                after = items[index + 1] if index + 1 < len(items) else None
                timestamp = speaker.next_timestamp
                pcm = speaker.decoder.conceal(after[1] if after is not None else None)
            else:
                timestamp, opus = item
                try:
                    pcm = speaker.decoder.decode(opus)
                except OpusInvalid:
                    self.stats.drop("opus_invalid")
                    pcm = speaker.decoder.conceal()
            speaker.next_timestamp = (timestamp + FRAME_SAMPLES) & 0xFFFFFFFF
            self.sink.on_frame(speaker.user_id, pcm, timestamp)

    def tick(self, now: float) -> None:
        """Gives up on packets that did not come in time, and ends talk spurts gone quiet."""
        for speaker in self._speakers.values():
            self._emit(speaker, speaker.jitter.expire(now, self._jitter_seconds))
            if speaker.speaking and now - speaker.last_packet > self._idle_seconds:
                self._stop(speaker)

    def _stop(self, speaker: _Speaker) -> None:
        self._emit(speaker, speaker.jitter.expire(float("inf"), 0.0))
        speaker.jitter.reset()
        if speaker.speaking:
            speaker.speaking = False
            self.sink.on_speaking(speaker.user_id, False)

    async def run(self) -> None:
        """Ticks every 20 ms until cancelled."""
        while True:
            await asyncio.sleep(FRAME_SECONDS)
            self.tick(time.perf_counter())
