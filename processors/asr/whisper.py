"""faster-whisper, locally: a CTranslate2 Whisper model, loaded once per process.

``WHISPER_MODEL`` is a model name (downloaded to the Hugging Face cache on first use) or the path
of a converted model. The device is CUDA when one is present (``WHISPER_DEVICE=auto``), else the
CPU; int8 on CPU, float16 on CUDA unless ``WHISPER_COMPUTE_TYPE`` says otherwise. Decoding runs
in a worker thread, so the event loop keeps serving other messages meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import ctranslate2
import numpy as np
from faster_whisper import WhisperModel

from .base import Transcript, confidence

__all__ = ["WhisperEngine", "resolve_device"]

log = logging.getLogger("libra.asr.whisper")

_models: dict[tuple[str, str, str], WhisperModel] = {}
_loading = threading.Lock()


def resolve_device(device: str, compute_type: str) -> tuple[str, str]:
    """Returns the concrete device and compute type for ``auto`` and empty settings."""
    if device == "auto":
        device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    return device, compute_type or ("float16" if device == "cuda" else "int8")


def _model(name: str, device: str, compute_type: str) -> WhisperModel:
    """Returns the process's one instance of a model, loading it on first use."""
    key = (name, device, compute_type)
    with _loading:  # two first utterances at once must not load the model twice
        if key not in _models:
            log.info("loading whisper model %s on %s (%s)", name, device, compute_type)
            _models[key] = WhisperModel(name, device=device, compute_type=compute_type)
        return _models[key]


class WhisperEngine:
    """Transcribes with faster-whisper in a worker thread."""

    name = "whisper"

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        compute_type: str = "",
        beam_size: int = 1,
        temperature: float = 0.0,
    ) -> None:
        self.model = model
        self.device, self.compute_type = resolve_device(device, compute_type)
        self.beam_size = beam_size
        self.temperature = temperature

    async def load(self) -> None:
        """Loads the model now (in a thread) rather than on the first utterance."""
        await asyncio.to_thread(_model, self.model, self.device, self.compute_type)

    async def transcribe(self, pcm16k: bytes, language_hint: str | None) -> Transcript:
        return await asyncio.to_thread(self._transcribe, pcm16k, language_hint)

    def _transcribe(self, pcm16k: bytes, language_hint: str | None) -> Transcript:
        model = _model(self.model, self.device, self.compute_type)
        audio = np.frombuffer(pcm16k, np.int16).astype(np.float32) / 32768.0
        segments, info = model.transcribe(
            audio,
            language=language_hint or None,
            beam_size=self.beam_size,
            temperature=self.temperature,
            # Each utterance stands alone, is already cut by Libra's VAD, and needs no times.
            condition_on_previous_text=False,
            vad_filter=False,
            without_timestamps=True,
        )
        heard = list(segments)  # decoding happens while the generator is read
        return Transcript(
            text="".join(s.text for s in heard).strip(),
            language=info.language,
            confidence=confidence((s.avg_logprob, s.end - s.start) for s in heard),
        )
