"""A loopback fake of ElevenLabs' streaming TTS: ``POST /v1/text-to-speech/{voice_id}/stream``.

It answers as ElevenLabs does: the audio in the ``output_format`` query parameter (``pcm_*``
as raw s16le, ``mp3_*`` as MP3), streamed in chunks; errors as ``{"detail": {...}}``. The audio
is a hum as long as the text would take to say. Point the SDK at it with
``ELEVENLABS_BASE_URL``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .scripted import ScriptedFake, mp3_bytes, speech_like

__all__ = ["STREAM", "FakeElevenLabs"]

STREAM = "/v1/text-to-speech/{voice_id}/stream"
_CHUNK = 4096


class FakeElevenLabs(ScriptedFake):
    """ElevenLabs' streaming text-to-speech endpoint."""

    routes = (("POST", STREAM),)

    def env(self) -> dict[str, str]:
        return {"ELEVENLABS_BASE_URL": self.url}

    async def answer(self, request: web.Request, body: Any, cut: bool) -> web.StreamResponse:
        fmt = request.query.get("output_format", "mp3_44100_128")
        kind, _, rest = fmt.partition("_")
        text = body.get("text") if isinstance(body, dict) else None
        if not text or kind not in ("pcm", "mp3"):
            return web.json_response(self.error_body(422, f"bad text or format {fmt}"), status=422)
        rate = int(rest.split("_")[0])
        audio = speech_like(text, rate)
        if kind == "mp3":
            audio = mp3_bytes(audio, rate)
        response = web.StreamResponse(
            headers={"Content-Type": "audio/mpeg" if kind == "mp3" else "audio/pcm"}
        )
        parts = [audio[at : at + _CHUNK] for at in range(0, len(audio), _CHUNK)]
        return await self.stream(request, response, parts, cut)

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        status_name = {
            401: "invalid_api_key",
            422: "invalid_request",
            429: "too_many_concurrent_requests",
        }.get(status, "internal_error")
        return {"detail": {"status": status_name, "message": message}}
