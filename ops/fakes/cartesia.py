"""A loopback fake of Cartesia's streaming TTS: ``POST /tts/sse``, as the SDK's
``tts.generate_sse`` calls it.

It checks the request as Cartesia does (model, transcript, voice, a raw ``output_format``) and
streams the audio as server-sent events: ``chunk`` events carrying base64 PCM in the encoding
and sample rate asked for, 40 ms each, then a ``done`` event. The audio is a hum as long as the
transcript would take to say. Point the SDK at it with ``CARTESIA_BASE_URL``.
"""

from __future__ import annotations

import base64
import itertools
from typing import Any

import msgspec
import numpy as np
from aiohttp import web

from .scripted import ScriptedFake, speech_like

__all__ = ["SSE", "FakeCartesia"]

SSE = "/tts/sse"
_ids = itertools.count(1)
_RATES = frozenset({8000, 16000, 22050, 24000, 44100, 48000})
_ENCODINGS = frozenset({"pcm_s16le", "pcm_f32le"})


class FakeCartesia(ScriptedFake):
    """Cartesia's SSE endpoint."""

    routes = (("POST", SSE),)

    def env(self) -> dict[str, str]:
        return {"CARTESIA_BASE_URL": self.url}

    async def answer(self, request: web.Request, body: Any, cut: bool) -> web.StreamResponse:
        problem = _invalid(body)
        if problem:
            return web.json_response(self.error_body(400, problem), status=400)
        fmt = body["output_format"]
        pcm = speech_like(body["transcript"], fmt["sample_rate"])
        if fmt["encoding"] == "pcm_f32le":
            pcm = (np.frombuffer(pcm, np.int16) / 32768.0).astype("<f4").tobytes()
        step = fmt["sample_rate"] * 40 // 1000 * (2 if fmt["encoding"] == "pcm_s16le" else 4)
        context = body.get("context_id")
        events = [
            _event(
                "chunk",
                {
                    "type": "chunk",
                    "data": base64.b64encode(pcm[at : at + step]).decode(),
                    "done": False,
                    "status_code": 206,
                    "step_time": 1.5,
                    "context_id": context,
                },
            )
            for at in range(0, len(pcm), step)
        ]
        done = {"type": "done", "done": True, "status_code": 200, "context_id": context}
        events.append(_event("done", done))
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        return await self.stream(request, response, events, cut)

    def garbage(self) -> web.Response:
        return web.Response(
            body=b"event: chunk\ndata: {this is not json\n\n", content_type="text/event-stream"
        )

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return {
            "title": "Too Many Requests" if status == 429 else "Error",
            "message": message,
            "error_code": "rate_limited" if status == 429 else "error",
            "status_code": status,
            "request_id": f"req_fake{next(_ids)}",
        }


def _invalid(body: Any) -> str:
    """Returns what is wrong with a request body, or ""."""
    if not isinstance(body, dict):
        return "the body is not a JSON object"
    for field in ("model_id", "transcript", "voice", "output_format"):
        if not body.get(field):
            return f"{field} is required"
    fmt = body["output_format"]
    if not isinstance(fmt, dict) or fmt.get("container") != "raw":
        return "this endpoint streams raw audio: output_format.container must be raw"
    if fmt.get("encoding") not in _ENCODINGS or fmt.get("sample_rate") not in _RATES:
        return "unsupported output_format"
    return ""


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + msgspec.json.encode(data) + b"\n\n"
