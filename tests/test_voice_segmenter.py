"""Segmentation: the rules frame by frame, then Silero VAD on speech made with espeak-ng."""

from __future__ import annotations

import time

import numpy as np
import pytest

from libra.gateway.voice import (
    Confirmed,
    FrameSplitter,
    Partial,
    Resumed,
    Segmenter,
    SegmenterConfig,
    SileroVad,
    Utterance,
)

from .voice_samples import discord_pcm, frames, silence, speech, speech_spans, white_noise

LOUD = np.full(320, 8000, np.int16)
QUIET = np.zeros(320, np.int16)


class ScriptedVad:
    """Says what the test tells it: one probability per frame."""

    def __init__(self, probabilities: list[float]) -> None:
        self.probabilities = iter(probabilities)

    def __call__(self, frame: np.ndarray) -> float:
        return next(self.probabilities)


def _pattern(spec: str) -> list[tuple[float, np.ndarray]]:
    """``"30v 20s"``: 30 voiced loud frames then 20 silent ones (``q``: voiced but silent)."""
    out = []
    for part in spec.split():
        count, kind = int(part[:-1]), part[-1]
        prob, frame = {"v": (0.9, LOUD), "s": (0.0, QUIET), "q": (0.9, QUIET)}[kind]
        out.extend([(prob, frame)] * count)
    return out


def _run(spec: str, **config: int) -> list[tuple[int, Utterance | Confirmed]]:
    script = _pattern(spec)
    seg = Segmenter(ScriptedVad([p for p, _ in script]), SegmenterConfig(**config))
    out = []
    for _, frame in script:
        out.extend((seg.now_ms, d) for d in seg.feed(frame))
    return out


def test_a_pause_gives_a_speculative_cut_then_its_confirmation() -> None:
    got = _run("30v 40s")
    (t1, cut), (t2, done) = got
    assert isinstance(cut, Utterance) and cut.speculative and not cut.manual
    assert cut.speech_end_ms == 600
    assert t1 == 600 + 160  # the frame that completes 150 ms of silence (8 whole frames)
    assert cut.start_ms == 0 and cut.end_ms == t1
    assert len(cut.pcm) == 2 * 16 * cut.duration_ms
    assert isinstance(done, Confirmed) and done.seq == cut.seq and done.speech_end_ms == 600
    assert t2 == 600 + 500  # exactly 500 ms after the last voiced frame


def test_talking_on_gives_a_new_longer_capture_and_the_old_one_is_never_confirmed() -> None:
    got = [d for _, d in _run("30v 10s 20v 40s")]
    first, resumed, second, done = got
    assert first.speculative and second.speculative and second.seq != first.seq
    assert resumed == Resumed(first.seq)  # said at the first voiced frame after the pause
    assert second.start_ms == first.start_ms == 0  # the whole utterance, from its start
    assert second.speech_end_ms == 1200 and len(second.pcm) > len(first.pcm)
    assert isinstance(done, Confirmed) and done.seq == second.seq


def test_a_pause_is_sent_to_be_transcribed_before_the_speculative_cut() -> None:
    got = _run("30v 40s", early_ms=60)
    (t0, early), (t1, cut), (_, done) = got
    assert isinstance(early, Partial) and early.pause and early.offset_ms == 0
    assert t0 == 600 + 60 and t1 == 600 + 160  # 60 ms of silence, then the cut at 150 ms
    assert cut.speculative and cut.pcm.startswith(early.pcm)
    assert len(early.pcm) >= 2 * 16 * (cut.speech_end_ms - cut.start_ms)  # all of the speech
    assert isinstance(done, Confirmed) and done.seq == cut.seq


def test_talking_on_after_an_early_decode_sends_the_rest_at_the_next_pause() -> None:
    first, second, cut, _ = [d for _, d in _run("30v 5s 20v 40s", early_ms=60)]
    assert isinstance(first, Partial) and isinstance(second, Partial)
    assert first.pause and second.pause and second.offset_ms == len(first.pcm) // 32
    assert isinstance(cut, Utterance) and cut.pcm.startswith(first.pcm + second.pcm)
    # no decode before a speculative cut that is not sooner than it, nor without speech
    assert not [d for _, d in _run("30v 40s", early_ms=150) if isinstance(d, Partial)]
    assert _run("5v 40s", early_ms=60) == []


def test_without_speculation_the_utterance_comes_once_the_silence_is_confirmed() -> None:
    ((t, cut),) = _run("30v 40s", speculative_ms=0)
    assert not cut.speculative and t == 1100 and cut.speech_end_ms == 600


def test_short_noise_is_dropped() -> None:
    assert _run("5v 60s") == []  # 100 ms of "speech" is under the 200 ms minimum
    assert len(_run("10v 60s")) == 2  # 200 ms is enough


def test_long_speech_is_split_at_the_limit() -> None:
    got = _run("120v 40s", max_utterance_ms=1000)
    cuts = [d for _, d in got if isinstance(d, Utterance)]
    assert [c.speculative for c in cuts] == [False, False, True]
    assert [c.duration_ms for c in cuts[:2]] == [1000, 1000]
    assert cuts[1].start_ms == 1000 and cuts[2].start_ms == 2000


def test_the_audio_before_the_first_voiced_frame_is_kept() -> None:
    cut = _run("20s 20v 40s")[0][1]
    assert cut.start_ms == 400 - 200  # 200 ms of preroll


def test_dips_above_the_lower_threshold_do_not_end_speech() -> None:
    probs = [0.9] * 20 + [0.4] * 10 + [0.9] * 20 + [0.0] * 40
    seg = Segmenter(ScriptedVad(probs))
    got = [d for p in probs for d in seg.feed(LOUD if p else QUIET)]
    assert [type(d).__name__ for d in got] == ["Utterance", "Confirmed"]
    assert got[0].speech_end_ms == 1000


def test_silence_the_vad_still_calls_speech_is_trimmed_from_the_end() -> None:
    (_, cut), (t, _) = _run("30v 2q 40s")
    assert cut.speech_end_ms == 600  # not 640: those two frames held no sound
    assert t == 1100
    (_, loud), _ = _run("32v 40s")
    assert loud.speech_end_ms == 640  # loud frames are speech: nothing to trim


def test_manual_recording_keeps_everything_as_one_utterance() -> None:
    script = _pattern("20v 60s 10v")
    seg = Segmenter(ScriptedVad([p for p, _ in script] + [0.0] * 10))
    assert seg.start_recording() == []
    got = [d for _, frame in script for d in seg.feed(frame)]
    assert got == []  # no automatic cut while recording, whatever the pauses
    (cut,) = seg.stop_recording()
    assert cut.manual and not cut.speculative and cut.duration_ms == 90 * 20
    assert cut.speech_end_ms == 90 * 20
    seg.start_recording()
    for _ in range(10):
        seg.feed(QUIET)
    assert seg.stop_recording() == []  # a recording of silence is no turn


def test_flush_settles_what_is_in_progress() -> None:
    script = _pattern("30v 10s")
    seg = Segmenter(ScriptedVad([p for p, _ in script]))
    (cut,) = [d for _, f in script for d in seg.feed(f)]
    assert seg.flush() == [Confirmed(cut.seq, 600)]
    script = _pattern("30v")
    seg = Segmenter(ScriptedVad([p for p, _ in script]))
    for _, f in script:
        seg.feed(f)
    (cut,) = seg.flush()
    assert not cut.speculative and cut.speech_end_ms == 600


# --- Silero VAD on speech --------------------------------------------------------------------


def _segment(samples: np.ndarray, **config: int) -> list[tuple[int, Utterance | Confirmed]]:
    seg = Segmenter(SileroVad(), SegmenterConfig(**config))
    out = []
    for frame in frames(samples):
        out.extend((seg.now_ms, d) for d in seg.feed(frame))
    return out


def _confirmed(got: list[tuple[int, Utterance | Confirmed]]) -> list[tuple[Utterance, int]]:
    """The utterances that became turns, with the time their silence was confirmed."""
    cuts = {d.seq: d for _, d in got if isinstance(d, Utterance)}
    return [(cuts[d.seq], t) for t, d in got if isinstance(d, Confirmed)]


def test_english_and_korean_sentences_become_one_turn_each_cut_where_speech_ends() -> None:
    parts = [
        silence(500),
        speech("Hello there, how are you today?", "en-us"),
        silence(1000),
        speech("안녕하세요. 오늘 날씨가 정말 좋네요.", "ko"),
        silence(1000),
    ]
    got = _segment(np.concatenate(parts))
    turns = _confirmed(got)
    assert len(turns) == 2
    for (cut, confirmed_at), (start, end) in zip(turns, speech_spans(parts), strict=True):
        assert start - 300 <= cut.start_ms <= start
        assert abs(cut.speech_end_ms - end) <= 30, (cut.speech_end_ms, end)
        assert confirmed_at - cut.speech_end_ms == 500
        assert cut.end_ms - cut.speech_end_ms >= 140  # cut at the pause, before the end is sure
    # espeak pauses inside each sentence: some cuts were speculative and never confirmed
    assert sum(isinstance(d, Utterance) for _, d in got) > 2


def test_talking_on_after_a_short_pause_gives_a_new_capture() -> None:
    parts = [silence(300), speech("One moment", "en-us"), speech("please", "en-us"), silence(800)]
    (_, end), (start, _) = speech_spans(parts)
    assert 150 < start - end < 500  # espeak leaves a short pause between the two
    got = _segment(np.concatenate(parts))
    cuts = [d for _, d in got if isinstance(d, Utterance)]
    ((turn, _),) = _confirmed(got)
    assert len(cuts) >= 2 and turn is cuts[-1]
    assert turn.start_ms == cuts[0].start_ms and turn.speech_end_ms > cuts[0].end_ms
    assert abs(turn.speech_end_ms - speech_spans(parts)[-1][1]) <= 30


@pytest.mark.parametrize("amplitude", [300, 3000, 12000])
def test_white_noise_makes_no_utterance(amplitude: float) -> None:
    assert _segment(white_noise(5000, amplitude)) == []


def test_silence_makes_no_utterance() -> None:
    assert _segment(silence(5000)) == []


def test_discord_audio_at_48khz_stereo_is_cut_the_same_way() -> None:
    samples = np.concatenate([silence(400), speech("Can you hear me?", "en-us"), silence(900)])
    direct = _confirmed(_segment(samples))
    splitter = FrameSplitter(sample_rate=48_000, channels=2)
    seg = Segmenter(SileroVad())
    pcm = discord_pcm(samples)
    got = []
    for at in range(0, len(pcm), 3840):  # one Discord packet: 20 ms of 48 kHz stereo
        for frame in splitter(pcm[at : at + 3840]):
            got.extend((seg.now_ms, d) for d in seg.feed(frame))
    discord = _confirmed(got)
    assert len(direct) == len(discord) == 1
    assert abs(direct[0][0].speech_end_ms - discord[0][0].speech_end_ms) <= 20


def test_a_frame_costs_a_fraction_of_a_millisecond() -> None:
    pcm = discord_pcm(np.concatenate([speech("Testing the cost of a frame.", "en-us")] * 3))
    splitter, seg = FrameSplitter(), Segmenter(SileroVad())
    packets = [pcm[at : at + 3840] for at in range(0, len(pcm) - 3840, 3840)]
    runs = []
    for _ in range(3):  # the best of three: the cost of a frame, not a busy machine's pauses
        started = time.perf_counter()
        for packet in packets:
            for frame in splitter(packet):
                seg.feed(frame)
        runs.append((time.perf_counter() - started) * 1000 / len(packets))
    per_frame_ms = min(runs)
    assert per_frame_ms < 2.0, runs  # about 0.2 ms on the 2-core CI machine


def test_digital_silence_does_not_run_the_model() -> None:
    vad = SileroVad()

    class Counting:
        def __init__(self, session) -> None:
            self.session, self.calls = session, 0

        def run(self, *args):
            self.calls += 1
            return self.session.run(*args)

    vad.session = counting = Counting(vad.session)
    assert all(vad(QUIET) == 0.0 for _ in range(50)) and counting.calls == 0
    said = frames(speech("Hello there.", "en-us"))
    assert max(vad(frame) for frame in said) > 0.9  # after a long silence, speech still scores
    assert 0 < counting.calls < len(said)  # its quiet frames were skipped too
