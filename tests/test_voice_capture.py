"""Voice into the log: utterances become voice.captured with their audio, then voice.ended."""

from __future__ import annotations

import asyncio

import msgspec
import numpy as np
import pytest
from nats.js.errors import ObjectNotFoundError

from libra.contracts import AUDIO_BUCKET, Origin, VoiceCaptured, VoiceEnded, VoiceResumed
from libra.gateway.voice import VoiceCapture, segmenter_config
from libra.runtime.audio import (
    AudioStore,
    AudioTooLarge,
    decode_audio,
    pcm_duration_ms,
    resample_pcm,
    wav_bytes,
)
from libra.runtime.config import Settings
from libra.runtime.eventlog import EventLog

from .helpers import eventually, stream_events
from .voice_samples import discord_pcm, silence, speech

ORIGIN = Origin(platform="discord", guild="1", channel="2")


async def _events(log: EventLog) -> list:
    return await stream_events(log.js, "LIBRA", "libra.voice.>")


async def _capture(log: EventLog, pcm: bytes, **kwargs) -> list:
    audio = await AudioStore.open(log)
    async with VoiceCapture(
        log, audio, conversation="discord-1-2", user="u1", origin=ORIGIN, **kwargs
    ) as capture:
        for at in range(0, len(pcm), 3840):  # Discord's packets: 20 ms of 48 kHz stereo
            capture.feed(pcm[at : at + 3840])
    return await _events(log)


async def test_an_utterance_is_captured_then_its_end_confirmed(eventlog: EventLog) -> None:
    samples = np.concatenate([silence(300), speech("Hello there, Libra.", "en-us"), silence(900)])
    events = await _capture(eventlog, discord_pcm(samples))
    captures = [e for e in events if isinstance(e, VoiceCaptured)]
    (ended,) = [e for e in events if isinstance(e, VoiceEnded)]
    turn = captures[-1]
    assert all(c.speculative and c.mode == "auto" for c in captures)
    assert ended.captured == turn.id and ended.turn == turn.id == turn.turn
    assert ended.causation == turn.id and ended.speech_ended_at == turn.speech_ended_at
    assert events.index(ended) > events.index(turn)
    # the silence was confirmed 500 ms of stream time after the speech ended
    assert turn.audio.bucket == AUDIO_BUCKET and turn.audio.format == "pcm_s16le"
    assert turn.audio.sample_rate == 16_000 and turn.audio.channels == 1
    pcm = await (await AudioStore.open(eventlog)).get(turn.audio)
    assert len(pcm) == turn.audio.size
    assert pcm_duration_ms(len(pcm), 16_000) == turn.audio.duration_ms
    assert 1000 <= turn.audio.duration_ms <= len(samples) / 16
    assert turn.audio.name == f"voice/discord-1-2/{turn.id}"


async def test_in_real_time_the_end_is_confirmed_500_ms_after_the_speech(
    eventlog: EventLog,
) -> None:
    pcm = discord_pcm(np.concatenate([speech("Hello there.", "en-us"), silence(900)]))
    audio = await AudioStore.open(eventlog)
    loop = asyncio.get_running_loop()
    async with VoiceCapture(
        eventlog, audio, conversation="discord-1-2", user="u1", origin=ORIGIN
    ) as capture:
        start = loop.time()
        for i, at in enumerate(range(0, len(pcm), 3840)):  # one packet every 20 ms
            await asyncio.sleep(max(0.0, start + i * 0.02 - loop.time()))
            capture.feed(pcm[at : at + 3840])
    (ended,) = [e for e in await _events(eventlog) if isinstance(e, VoiceEnded)]
    waited = (ended.at - ended.speech_ended_at).total_seconds()
    assert 0.48 <= waited < 0.7, waited  # the 500 ms rule, and next to nothing more


async def test_a_speaker_who_goes_quiet_is_timed_on_the_wall_clock(eventlog: EventLog) -> None:
    # Discord sends nothing once a person stops talking: the capture fills the gap itself.
    said = speech("Are you there?", "en-us")
    pcm = resample_pcm(said.tobytes(), rate=16_000, channels=1, to_rate=48_000, to_channels=1)
    audio = await AudioStore.open(eventlog)
    loop = asyncio.get_running_loop()
    async with VoiceCapture(
        eventlog,
        audio,
        conversation="discord-1-2",
        user="u1",
        origin=ORIGIN,
        channels=1,
        fill_gaps_ms=60,
    ) as capture:
        start = loop.time()
        for i, at in enumerate(range(0, len(pcm), 1920)):  # 20 ms of 48 kHz mono, in real time
            await asyncio.sleep(max(0.0, start + i * 0.02 - loop.time()))
            capture.feed(pcm[at : at + 1920])
        stopped = loop.time()

        async def ended() -> bool:
            return any(isinstance(e, VoiceEnded) for e in await _events(eventlog))

        await eventually(ended, timeout=5, every=0.01)
        waited = loop.time() - stopped
    (end,) = [e for e in await _events(eventlog) if isinstance(e, VoiceEnded)]
    assert 0.48 <= (end.at - end.speech_ended_at).total_seconds() < 0.7
    assert waited < 1.0  # espeak's own trailing silence is part of the 500 ms


async def test_talking_on_gives_a_new_turn_and_only_that_one_is_confirmed(
    eventlog: EventLog,
) -> None:
    samples = np.concatenate(
        [speech("One moment", "en-us"), speech("please", "en-us"), silence(800)]
    )
    events = await _capture(eventlog, discord_pcm(samples))
    captures = [e for e in events if isinstance(e, VoiceCaptured)]
    (ended,) = [e for e in events if isinstance(e, VoiceEnded)]
    assert len(captures) >= 2 and len({c.turn for c in captures}) == len(captures)
    assert ended.captured == captures[-1].id
    resumed = [e for e in events if isinstance(e, VoiceResumed)]
    assert [(r.captured, r.turn) for r in resumed] == [(c.id, c.turn) for c in captures[:-1]]
    assert captures[-1].audio.duration_ms > captures[0].audio.duration_ms


async def test_manual_recording_is_one_capture_and_needs_no_confirmation(
    eventlog: EventLog,
) -> None:
    audio = await AudioStore.open(eventlog)
    said = np.concatenate(
        [speech("First part.", "en-us"), silence(900), speech("Second.", "en-us")]
    )
    async with VoiceCapture(
        eventlog, audio, conversation="discord-1-2", user="u1", origin=ORIGIN, automatic=False
    ) as capture:
        capture.feed(discord_pcm(silence(500)))  # not recording, not automatic: ignored
        capture.start_recording()
        capture.feed(discord_pcm(said))
        capture.stop_recording()
    events = await _events(eventlog)
    (captured,) = events
    assert isinstance(captured, VoiceCaptured)
    assert captured.mode == "manual" and not captured.speculative
    assert abs(captured.audio.duration_ms - len(said) / 16) <= 20


async def test_silence_and_noise_reach_no_log(eventlog: EventLog) -> None:
    rng = np.random.default_rng(3)
    noise = (rng.standard_normal(16000 * 3) * 3000).astype(np.int16)
    assert await _capture(eventlog, discord_pcm(np.concatenate([silence(2000), noise]))) == []


async def test_the_segmenter_follows_the_settings() -> None:
    config = segmenter_config(
        Settings.from_env({"VAD_SILENCE_MS": "700", "VAD_SPECULATIVE_MS": "0"})
    )
    assert config.silence_ms == 700 and config.speculative_ms == 0
    assert config.max_utterance_ms == 30_000 and config.threshold == 0.5


# --- the audio store ---------------------------------------------------------------------------


async def test_a_large_clip_is_chunked_and_read_back_whole(eventlog: EventLog) -> None:
    audio = await AudioStore.open(eventlog, max_bytes=8_000_000)
    pcm = np.random.default_rng(0).integers(-3000, 3000, 48_000 * 2 * 20).astype(np.int16)
    ref = await audio.put(
        "tts/x/1", pcm.tobytes(), format="pcm_s16le", sample_rate=48_000, channels=2
    )
    assert ref.duration_ms == 20_000 and ref.size == len(pcm) * 2
    info = await audio.store.get_info("tts/x/1")
    assert info.chunks > 1
    assert await audio.get(ref) == pcm.tobytes()


async def test_audio_over_the_limit_is_refused(eventlog: EventLog) -> None:
    audio = await AudioStore.open(eventlog, max_bytes=1000)
    with pytest.raises(AudioTooLarge):
        await audio.put("voice/x/1", b"\0" * 1002, format="pcm_s16le", sample_rate=16_000)
    ok = await audio.put("voice/x/2", b"\0" * 1000, format="pcm_s16le", sample_rate=16_000)
    with pytest.raises(AudioTooLarge):
        await audio.get(msgspec.structs.replace(ok, size=5000))


async def test_the_bucket_keeps_audio_for_the_configured_ttl(eventlog: EventLog) -> None:
    status = await (await AudioStore.open(eventlog)).store.status()
    assert status.ttl == Settings().libra_audio_ttl  # provisioned from LIBRA_AUDIO_TTL


async def test_a_missing_object_is_an_error(eventlog: EventLog) -> None:
    audio = await AudioStore.open(eventlog)
    ref = await audio.put("voice/x/3", b"\0\0" * 160, format="pcm_s16le", sample_rate=16_000)
    await eventlog.js.purge_stream(f"OBJ_{AUDIO_BUCKET}")  # as the TTL would, in time
    with pytest.raises(ObjectNotFoundError):
        await asyncio.wait_for(audio.get(ref), 5)


def test_wav_and_conversions() -> None:
    tone = (np.sin(np.arange(22_050) / 22_050 * 2 * np.pi * 440) * 8000).astype(np.int16)
    wav = wav_bytes(tone.tobytes(), sample_rate=22_050)
    assert wav[:4] == b"RIFF" and len(wav) == 44 + 2 * 22_050
    discord = resample_pcm(tone.tobytes(), rate=22_050, channels=1, to_rate=48_000, to_channels=2)
    assert abs(len(discord) - 48_000 * 4) <= 4 * 48
    back = decode_audio(wav, to_rate=16_000)
    assert abs(len(back) - 32_000) <= 2 * 32


async def test_events_never_carry_audio(eventlog: EventLog) -> None:
    samples = np.concatenate([speech("Short.", "en-us"), silence(800)])
    await _capture(eventlog, discord_pcm(samples))
    sizes = []

    async def read() -> bool:
        info = await eventlog.js.stream_info("LIBRA", subjects_filter="libra.voice.>")
        sizes.append(info.state.bytes)
        return info.state.messages >= 2

    await eventually(read)
    assert sizes[-1] < 4000  # two small JSON events, not seconds of audio
