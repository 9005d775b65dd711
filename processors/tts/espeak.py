"""espeak-ng, locally: the offline default voice (the ``espeak-ng`` system package).

Robotic, but instant and always there: an utterance takes a few milliseconds of CPU. The text
goes in on stdin (never as an argument, so it cannot be taken for an option); the WAV that
comes out on stdout is 22,050 Hz mono.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

from .base import primary_language

__all__ = ["EspeakEngine"]

_SAMPLE_RATE = 22_050


class EspeakEngine:
    """Speaks with the ``espeak-ng`` command."""

    name = "espeak"
    sample_rate = _SAMPLE_RATE

    def __init__(self, voices: Mapping[str, str], *, command: str = "espeak-ng") -> None:
        self.voices = dict(voices)
        self.command = command

    def voice(self, language: str) -> str:
        code = primary_language(language)
        return self.voices.get(code) or code  # espeak-ng names its voices by language code

    async def synthesize(self, text: str, *, voice: str, language: str) -> AsyncIterator[bytes]:
        process = await asyncio.create_subprocess_exec(
            self.command,
            "-v",
            voice,
            "--stdout",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            wav, error = await process.communicate(text.encode())
        finally:
            if process.returncode is None:  # cancelled (a timeout): leave no process behind
                process.kill()
                await process.wait()
        if process.returncode != 0:
            raise RuntimeError(f"espeak-ng exited {process.returncode}: {error.decode()[:200]}")
        yield _wav_data(wav)


def _wav_data(wav: bytes) -> bytes:
    """Returns the samples of espeak-ng's streamed WAV (its sizes are placeholders)."""
    if wav[:4] != b"RIFF" or wav[8:12] != b"WAVE":
        raise ValueError("espeak-ng did not write a WAV file")
    rate = int.from_bytes(wav[24:28], "little")
    if rate != _SAMPLE_RATE or wav[22:24] != b"\x01\x00":
        raise ValueError(f"espeak-ng wrote {rate} Hz audio, expected {_SAMPLE_RATE} Hz mono")
    at = wav.find(b"data", 12)
    if at < 0:
        raise ValueError("espeak-ng's WAV has no data chunk")
    data = wav[at + 8 :]
    return data[: len(data) - len(data) % 2]
