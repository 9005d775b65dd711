"""espeak-ng, locally: the offline default voice.

Robotic, but instant and always there: an utterance takes a few milliseconds of CPU. The
library and its voice data come from the ``espeakng-loader`` package, so nothing has to be
installed beside Libra; it is called through ctypes, one utterance at a time (the library keeps
global state), in a worker thread so the event loop never waits on it. The audio is 22,050 Hz
mono s16le.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
from collections.abc import AsyncIterator, Mapping

import espeakng_loader

from libra.runtime.audio import resample_pcm

from .base import primary_language

__all__ = ["SAMPLE_RATE", "TRAILING_PAUSE", "EspeakEngine", "speak", "utterance"]

SAMPLE_RATE = 22_050
# espeak-ng's command line ends each utterance with this pause; the library leaves it out, and
# the engine puts it back between sentences, or they run into each other.
TRAILING_PAUSE = bytes(2 * SAMPLE_RATE * 300 // 1000)
_SYNCHRONOUS = 2  # AUDIO_OUTPUT_SYNCHRONOUS: samples come to the callback, nothing plays
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_RATE = 1  # espeakRATE, words per minute
_Callback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class _Espeak:
    """The espeak-ng library, loaded once per process; one utterance at a time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.lib.espeak_Initialize.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_int,
        ]
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        rate = self.lib.espeak_Initialize(
            _SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0
        )
        if rate != SAMPLE_RATE:
            raise RuntimeError(f"espeak-ng would speak at {rate} Hz, expected {SAMPLE_RATE}")
        self._chunks: list[bytes] = []
        self._callback = _Callback(self._collect)  # kept: the library holds a pointer to it
        self.lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, samples, count: int, _events) -> int:
        if samples and count > 0:
            self._chunks.append(ctypes.string_at(samples, count * 2))
        return 0  # 0: go on

    def speak(self, text: str, voice: str, words_per_minute: int) -> bytes:
        data = text.encode("utf-8") + b"\0"
        with self.lock:
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"espeak-ng has no voice {voice!r}")
            self.lib.espeak_SetParameter(_RATE, words_per_minute, 0)
            self._chunks = []
            status = self.lib.espeak_Synth(
                data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
            )
            pcm, self._chunks = b"".join(self._chunks), []
        if status != 0:
            raise RuntimeError(f"espeak-ng could not speak (error {status})")
        return pcm


_library: _Espeak | None = None
_loading = threading.Lock()


def speak(text: str, voice: str = "en", *, words_per_minute: int = 175) -> bytes:
    """Returns ``text`` spoken with ``voice`` as 22,050 Hz mono s16le (blocking, a few ms)."""
    global _library
    with _loading:
        if _library is None:
            _library = _Espeak()
    return _library.speak(text, voice, words_per_minute)


def utterance(
    text: str, voice: str = "en", *, rate: int, channels: int = 1, words_per_minute: int = 175
) -> bytes:
    """``text`` as the espeak-ng command says it (its trailing pause included), as s16le PCM at
    ``rate`` Hz with ``channels``: speech made for tests and benchmarks."""
    pcm = speak(text, voice, words_per_minute=words_per_minute) + TRAILING_PAUSE
    return resample_pcm(pcm, rate=SAMPLE_RATE, channels=1, to_rate=rate, to_channels=channels)


class EspeakEngine:
    """Speaks with the espeak-ng library."""

    name = "espeak"
    sample_rate = SAMPLE_RATE

    def __init__(self, voices: Mapping[str, str]) -> None:
        self.voices = dict(voices)

    def voice(self, language: str) -> str:
        code = primary_language(language)
        return self.voices.get(code) or code  # espeak-ng names its voices by language code

    async def synthesize(self, text: str, *, voice: str, language: str) -> AsyncIterator[bytes]:
        yield await asyncio.to_thread(speak, text, voice)
        yield TRAILING_PAUSE
