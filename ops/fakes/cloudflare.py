"""A loopback fake of Cloudflare Workers AI text-to-speech:
``POST /accounts/{account_id}/ai/run/{model}``.

It answers as MeloTTS on Workers AI does: Cloudflare's JSON envelope with the MP3,
base64-encoded, in ``result.audio``; errors in the envelope's ``errors``. The audio is a hum as
long as the prompt would take to say. Point Libra at it with ``CF_BASE_URL``.
"""

from __future__ import annotations

import base64
from typing import Any

from aiohttp import web

from .scripted import ScriptedFake, mp3_bytes, speech_like

__all__ = ["RUN", "FakeCloudflare"]

RUN = "/accounts/{account_id}/ai/run/{model:.+}"
_RATE = 44_100


class FakeCloudflare(ScriptedFake):
    """Workers AI's model endpoint, for a text-to-speech model."""

    routes = (("POST", RUN),)

    def env(self) -> dict[str, str]:
        return {"CF_BASE_URL": self.url}

    async def answer(self, request: web.Request, body: Any, cut: bool) -> web.StreamResponse:
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if not prompt:
            return web.json_response(self.error_body(400, "prompt is required"), status=400)
        audio = base64.b64encode(mp3_bytes(speech_like(prompt, _RATE), _RATE)).decode()
        return web.json_response(
            {"result": {"audio": audio}, "success": True, "errors": [], "messages": []}
        )

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        code = 3040 if status == 429 else 7000
        return {
            "result": None,
            "success": False,
            "errors": [{"code": code, "message": message}],
            "messages": [],
        }
