"""TTS engines: espeak-ng for real, the vendors' SDKs against their fakes, fallback, sentences."""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
import pytest

from libra.ops.fakes.cartesia import SSE, FakeCartesia
from libra.ops.fakes.cloudflare import FakeCloudflare
from libra.ops.fakes.elevenlabs import FakeElevenLabs
from libra.ops.fakes.scripted import Behaviour
from libra.processors.tts.cartesia import CartesiaEngine
from libra.processors.tts.chain import AllEnginesFailed, Audio, SpeechInterrupted, TtsChain
from libra.processors.tts.cloudflare import CloudflareEngine
from libra.processors.tts.elevenlabs import ElevenLabsEngine
from libra.processors.tts.espeak import EspeakEngine
from libra.processors.tts.processor import build_engines, spoken_language
from libra.processors.tts.sentences import SentenceSplitter, speakable
from libra.runtime.config import ConfigError, Settings

VOICES = {"ko": "voice-ko", "en": "voice-en"}


def _seconds(pcm: bytes) -> float:
    return len(pcm) / (48_000 * 2 * 2)  # 48 kHz, stereo, 16-bit


class Spoken(NamedTuple):
    pcm: bytes
    pieces: list[Audio]
    engine: str
    voice: str


async def _speak(chain: TtsChain, text: str, language: str) -> Spoken:
    pieces = [audio async for audio in chain.stream(text, language)]
    assert len({(p.engine, p.voice, p.ttfb_ms) for p in pieces}) == 1
    return Spoken(b"".join(p.pcm for p in pieces), pieces, pieces[0].engine, pieces[0].voice)


def _espeak() -> EspeakEngine:
    return EspeakEngine({"ko": "ko", "en": "en-us"})


def _cartesia(fake: FakeCartesia, timeout_s: float = 5.0) -> CartesiaEngine:
    return CartesiaEngine(
        api_key="sk-car", base_url=fake.url, model="sonic-3", voices=VOICES, timeout_s=timeout_s
    )


def _elevenlabs(fake: FakeElevenLabs) -> ElevenLabsEngine:
    return ElevenLabsEngine(
        api_key="xi-key", base_url=fake.url, model="eleven_flash_v2_5", voices=VOICES
    )


def _cloudflare(fake: FakeCloudflare) -> CloudflareEngine:
    return CloudflareEngine(
        api_token="cf-token",
        account_id="acc1",
        base_url=fake.url,
        model="@cf/myshell-ai/melotts",
    )


@pytest.mark.parametrize(
    ("text", "language", "voice"),
    [("Hello there, how are you today?", "en", "en-us"), ("안녕하세요, 반갑습니다.", "ko", "ko")],
)
async def test_espeak_speaks_for_real(text: str, language: str, voice: str) -> None:
    speech = await _speak(TtsChain([_espeak()], timeout_s=5), text, language)
    assert speech.engine == "espeak" and speech.voice == voice
    assert len(speech.pcm) % 4 == 0  # whole stereo frames of 16-bit samples
    assert 0.8 < _seconds(speech.pcm) < 5.0
    samples = np.frombuffer(speech.pcm, np.int16).reshape(-1, 2)
    assert np.array_equal(samples[:, 0], samples[:, 1])  # mono, on both channels
    assert np.sqrt(np.mean(samples[:, 0].astype(float) ** 2)) > 300  # not silence
    assert speech.pieces[0].ttfb_ms > 0


async def test_cartesia_streams_through_its_sdk_in_the_voice_of_the_language() -> None:
    async with FakeCartesia() as fake:
        chain = TtsChain([_cartesia(fake)], timeout_s=5)
        korean = await _speak(chain, "안녕하세요, 반갑습니다.", "ko")
        english = await _speak(chain, "Hello there, how are you today?", "en-US")
        ko, en = fake.requests
    assert (korean.voice, english.voice) == ("voice-ko", "voice-en")
    assert (ko.body["voice"], ko.body["language"]) == ("voice-ko", "ko")
    assert (en.body["voice"], en.body["language"]) == ("voice-en", "en")
    assert en.path == SSE and en.headers["authorization"] == "***"
    assert en.body["output_format"] == {
        "container": "raw",
        "encoding": "pcm_s16le",
        "sample_rate": 48_000,
    }
    assert _seconds(english.pcm) == pytest.approx(len("Hello there, how are you today?") * 0.06)


async def test_an_unset_korean_voice_is_the_english_one_speaking_korean() -> None:
    async with FakeCartesia() as fake:
        engine = CartesiaEngine(
            api_key="k", base_url=fake.url, model="sonic-3", voices={"ko": "", "en": "voice-en"}
        )
        speech = await _speak(TtsChain([engine], timeout_s=5), "안녕하세요.", "ko")
        (request,) = fake.requests
    assert speech.voice == "voice-en" and request.body["language"] == "ko"


async def test_elevenlabs_streams_pcm_through_its_sdk() -> None:
    async with FakeElevenLabs() as fake:
        speech = await _speak(TtsChain([_elevenlabs(fake)], timeout_s=5), "안녕하세요.", "ko")
        (request,) = fake.requests
    assert request.path == "/v1/text-to-speech/voice-ko/stream"
    assert request.query["output_format"] == "pcm_24000"
    assert request.body["model_id"] == "eleven_flash_v2_5"
    assert request.body["language_code"] == "ko" and request.headers["xi-api-key"] == "***"
    assert _seconds(speech.pcm) == pytest.approx(6 * 0.06, abs=0.01)  # resampled from 24 kHz


async def test_cloudflare_workers_ai_answers_mp3_in_its_envelope() -> None:
    async with FakeCloudflare() as fake:
        speech = await _speak(
            TtsChain([_cloudflare(fake)], timeout_s=5), "안녕하세요, 반갑습니다.", "ko"
        )
        (request,) = fake.requests
    assert request.path == "/accounts/acc1/ai/run/@cf/myshell-ai/melotts"
    assert request.body == {"prompt": "안녕하세요, 반갑습니다.", "lang": "ko"}
    assert request.headers["authorization"] == "***"
    assert speech.voice == "ko"
    assert _seconds(speech.pcm) == pytest.approx(13 * 0.06, abs=0.06)  # decoded from MP3


@pytest.mark.parametrize(
    "failure",
    [
        Behaviour.rate_limited(),
        Behaviour.error(500),
        Behaviour.garbage(),
        Behaviour.disconnect(),
        Behaviour.hang(),
    ],
    ids=["429", "500", "garbage", "disconnect", "timeout"],
)
async def test_a_failing_engine_falls_back_to_the_next(failure: Behaviour) -> None:
    async with FakeCartesia() as cartesia, FakeElevenLabs() as elevenlabs:
        cartesia.queue(failure)
        chain = TtsChain([_cartesia(cartesia, 0.5), _elevenlabs(elevenlabs)], timeout_s=0.5)
        speech = await _speak(chain, "Hello there.", "en")
        assert len(cartesia.requests) == len(elevenlabs.requests) == 1
    assert speech.engine == "elevenlabs" and _seconds(speech.pcm) > 0.3


async def test_cloudflare_garbage_falls_back_too() -> None:
    async with FakeCloudflare() as fake:
        fake.queue(Behaviour.garbage())
        speech = await _speak(TtsChain([_cloudflare(fake), _espeak()], timeout_s=5), "Hi!", "en")
    assert speech.engine == "espeak"


async def test_a_failed_engine_is_tried_last_while_it_cools_down() -> None:
    async with FakeCartesia() as cartesia:
        cartesia.queue(Behaviour.hang())
        chain = TtsChain([_cartesia(cartesia, 30), _espeak()], timeout_s=1.0)
        started = time.perf_counter()
        first = await _speak(chain, "One.", "en")
        assert time.perf_counter() - started >= 1.0  # the chain's time limit ended the hang
        started = time.perf_counter()
        second = await _speak(chain, "Two.", "en")
        assert time.perf_counter() - started < 1.0  # no second timeout
        assert len(cartesia.requests) == 1
    assert first.engine == second.engine == "espeak"


async def test_when_every_engine_fails_the_sentence_fails() -> None:
    async with FakeElevenLabs(reply=Behaviour.error(500)) as fake:
        with pytest.raises(AllEnginesFailed, match="elevenlabs"):
            await _speak(TtsChain([_elevenlabs(fake)], timeout_s=5), "Hello.", "en")


async def test_audio_streams_on_as_the_engine_sends_it() -> None:
    async with FakeCartesia() as fake:
        text = "A sentence long enough to come in many pieces of audio."
        speech = await _speak(TtsChain([_cartesia(fake)], timeout_s=5), text, "en")
    assert len(speech.pieces) > 10  # one per 40 ms event, not the sentence at once
    assert _seconds(speech.pieces[0].pcm) == pytest.approx(0.04)


async def test_resampled_pieces_join_up_without_gaps() -> None:
    async with FakeElevenLabs() as fake:
        text = "x" * 50  # three seconds of 24 kHz audio, in 4 KiB chunks (odd sample counts)
        speech = await _speak(TtsChain([_elevenlabs(fake)], timeout_s=5), text, "en")
    assert len(speech.pieces) > 10
    assert _seconds(speech.pcm) == pytest.approx(50 * 0.06, abs=0.002)


async def test_a_stream_cut_after_its_first_audio_is_not_started_over_elsewhere() -> None:
    async with FakeCartesia() as fake:
        fake.queue(Behaviour.cut())
        chain = TtsChain([_cartesia(fake), _espeak()], timeout_s=2)
        heard: list[Audio] = []
        with pytest.raises(SpeechInterrupted, match="cartesia"):
            async for audio in chain.stream("Long enough to be cut in the middle, surely.", "en"):
                heard.append(audio)
    assert heard and {a.engine for a in heard} == {"cartesia"}


def test_the_engine_order_comes_from_the_settings() -> None:
    assert [e.name for e in build_engines(Settings())] == ["espeak"]
    keyed = Settings.from_env({"CARTESIA_API_KEY": "k", "CF_API_TOKEN": "t", "CF_ACCOUNT_ID": "a"})
    assert [e.name for e in build_engines(keyed)] == ["cartesia", "cloudflare", "espeak"]
    chosen = Settings.from_env({"TTS_ENGINES": "espeak, cartesia", "CARTESIA_API_KEY": "k"})
    assert [e.name for e in build_engines(chosen)] == ["espeak", "cartesia"]
    with pytest.raises(ConfigError, match="key"):
        build_engines(Settings.from_env({"TTS_ENGINES": "elevenlabs"}))
    with pytest.raises(ConfigError, match="unknown"):
        build_engines(Settings.from_env({"TTS_ENGINES": "sam"}))


def test_each_sentence_is_spoken_in_the_language_of_its_script() -> None:
    assert spoken_language("안녕하세요.", "en") == "ko"
    assert spoken_language("Python is great.", "ko") == "en"
    assert spoken_language("123!", "ko-KR") == "ko"
    assert spoken_language("Bonjour.", "fr") == "fr"


# --- sentences -------------------------------------------------------------------------------


def _split(text: str, step: int, **kwargs: int) -> list[str]:
    splitter = SentenceSplitter(**kwargs)
    out = []
    for at in range(0, len(text), step):
        out.extend(splitter.push(text[at : at + step]))
    return out + splitter.flush()


REPLY = (
    "Hello there! I am **Libra**. Dr. Kim says 3.14 is pi. 안녕하세요. 반갑습니다。좋아요\n"
    "- first item\n- second item"
)
SENTENCES = [
    "Hello there!",
    "I am Libra.",
    "Dr. Kim says 3.14 is pi.",
    "안녕하세요.",
    "반갑습니다。",
    "좋아요",
    "first item",
    "second item",
]


@pytest.mark.parametrize("step", [1, 3, 7, len(REPLY)])
def test_sentences_are_cut_the_same_however_the_reply_streams(step: int) -> None:
    assert _split(REPLY, step) == SENTENCES


def test_a_sentence_is_handed_out_as_soon_as_its_end_is_known() -> None:
    splitter = SentenceSplitter()
    assert splitter.push("Hello there.") == []  # "there.5" could still come
    assert splitter.push(" How") == ["Hello there."]
    assert splitter.push(" are you?") == []
    assert splitter.flush() == ["How are you?"]


def test_a_run_on_sentence_is_cut_at_a_comma_or_a_space() -> None:
    text = "this goes on, and on and on without ever coming to an end of any kind at all"
    parts = _split(text, 5, max_chars=30)
    assert all(len(p) <= 30 for p in parts) and " ".join(parts) == text
    assert parts[0] == "this goes on,"


def test_markdown_is_not_read_out() -> None:
    assert speakable("## Title\n**bold** and `code`") == "Title bold and code"
    assert _split("...", 1) == []
    assert _split("1. Apples.", 1) == ["1. Apples."]  # a list number is not a sentence
