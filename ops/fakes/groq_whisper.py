"""A loopback fake of Groq's Whisper API: ``POST /openai/v1/audio/transcriptions``.

It reads the multipart upload as Groq does (``file``, ``model``, ``language``,
``response_format``, ``temperature``) and answers with what it is told it heard: ``json``
(``{"text"}``), ``text``, or ``verbose_json`` (task, language, duration, segments with
``avg_logprob`` and ``no_speech_prob``, ``x_groq``). Point the groq SDK at it with
``GROQ_BASE_URL``.
"""

from __future__ import annotations

import io
import itertools
import wave
from typing import Any

from aiohttp import web

from .scripted import ScriptedFake

__all__ = ["TRANSCRIPTIONS", "FakeGroqWhisper"]

TRANSCRIPTIONS = "/openai/v1/audio/transcriptions"
_ids = itertools.count(1)


class FakeGroqWhisper(ScriptedFake):
    """Groq's transcription endpoint, hearing ``transcript`` in ``language`` in every upload.

    ``no_speech_prob`` and ``avg_logprob`` go into each segment: a high ``no_speech_prob`` with
    a low ``avg_logprob`` is how Whisper says an upload was silence.
    """

    routes = (("POST", TRANSCRIPTIONS),)

    def __init__(
        self,
        *,
        transcript: str = "Hello from the fake Whisper.",
        language: str = "english",
        no_speech_prob: float = 0.01,
        avg_logprob: float = -0.2,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.transcript = transcript
        self.language = language
        self.no_speech_prob = no_speech_prob
        self.avg_logprob = avg_logprob

    def env(self) -> dict[str, str]:
        return {"GROQ_BASE_URL": self.url}

    async def read_body(self, request: web.Request) -> Any:
        """The form's fields; the file as its name, size and (for WAV) duration in seconds."""
        form = await request.post()
        fields: dict[str, Any] = {}
        for name, value in form.items():
            if isinstance(value, web.FileField):
                data = value.file.read()
                fields[name] = {
                    "filename": value.filename,
                    "size": len(data),
                    "seconds": _wav_seconds(data),
                }
            else:
                fields[name] = value
        return fields

    async def answer(self, request: web.Request, body: Any, cut: bool) -> web.StreamResponse:
        upload = body.get("file") if isinstance(body, dict) else None
        if not isinstance(upload, dict) or not body.get("model"):
            return web.json_response(
                self.error_body(400, "file and model are required"), status=400
            )
        text = self.transcript
        x_groq = {"id": f"req_fake{next(_ids)}"}
        fmt = body.get("response_format", "json")
        if fmt == "text":
            return web.Response(text=text)
        if fmt != "verbose_json":
            return web.json_response({"text": text, "x_groq": x_groq})
        seconds = upload["seconds"] or 0.0
        segment = {
            "id": 0,
            "seek": 0,
            "start": 0.0,
            "end": seconds,
            "text": f" {text}",
            "tokens": [50365, *range(1000, 1000 + len(text.split())), 50257],
            "temperature": float(body.get("temperature") or 0.0),
            "avg_logprob": self.avg_logprob,
            "compression_ratio": 1.1,
            "no_speech_prob": self.no_speech_prob,
        }
        return web.json_response(
            {
                "task": "transcribe",
                "language": body.get("language") or self.language,
                "duration": seconds,
                "text": f" {text}",
                "segments": [segment] if text else [],
                "x_groq": x_groq,
            }
        )

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        kind = "rate_limit_exceeded" if status == 429 else "invalid_request_error"
        return {"error": {"message": message, "type": kind, "code": kind}}


def _wav_seconds(data: bytes) -> float | None:
    try:
        with wave.open(io.BytesIO(data)) as w:
            return w.getnframes() / w.getframerate()
    except (wave.Error, EOFError):
        return None
