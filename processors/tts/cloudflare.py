"""Cloudflare Workers AI text-to-speech, through its REST API.

``POST {CF_BASE_URL}/accounts/{CF_ACCOUNT_ID}/ai/run/{model}`` with ``CF_API_TOKEN``. The default
model, MeloTTS, takes ``{"prompt", "lang"}`` and answers in Cloudflare's JSON envelope with the
MP3 base64-encoded in ``result.audio``; models that answer with audio bytes directly work too.
Either way the MP3 is decoded here, to 48 kHz mono.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

import httpx

from libra.runtime.audio import decode_audio

from .base import primary_language

__all__ = ["CloudflareEngine"]

_BASE_URL = "https://api.cloudflare.com/client/v4"
_MELO_LANGUAGES = frozenset({"en", "es", "fr", "zh", "ja", "ko"})
_SAMPLE_RATE = 48_000


class CloudflareError(RuntimeError):
    """Workers AI refused the request or answered with something that is not audio."""


class CloudflareEngine:
    """Speaks with a Workers AI text-to-speech model."""

    name = "cloudflare"
    sample_rate = _SAMPLE_RATE

    def __init__(
        self,
        *,
        api_token: str,
        account_id: str,
        base_url: str = "",
        model: str,
        timeout_s: float = 10.0,
    ) -> None:
        self.model = model
        self.path = f"/accounts/{account_id}/ai/run/{model}"
        self.http = httpx.AsyncClient(
            base_url=(base_url or _BASE_URL).rstrip("/"),
            headers={"Authorization": f"Bearer {api_token}"},
            timeout=timeout_s,
        )

    def voice(self, language: str) -> str:
        code = primary_language(language)
        return code if code in _MELO_LANGUAGES else "en"  # MeloTTS has one voice per language

    async def synthesize(self, text: str, *, voice: str, language: str) -> AsyncIterator[bytes]:
        response = await self.http.post(self.path, json={"prompt": text, "lang": voice})
        if response.status_code >= 400:
            raise CloudflareError(f"HTTP {response.status_code}: {_errors(response)}")
        if response.headers.get("content-type", "").startswith("application/json"):
            body = response.json()
            try:
                audio = base64.b64decode(body["result"]["audio"], validate=True)
            except (KeyError, TypeError, ValueError) as exc:
                raise CloudflareError(f"no audio in the answer: {exc!r}") from None
        else:
            audio = response.content
        try:
            yield await asyncio.to_thread(decode_audio, audio, to_rate=_SAMPLE_RATE)
        except Exception as exc:  # av raises its own errors for bytes that are not audio
            raise CloudflareError(f"the answer is not audio: {exc}") from None


def _errors(response: httpx.Response) -> str:
    try:
        errors = response.json().get("errors") or []
        return "; ".join(str(e.get("message", e)) for e in errors) or response.text[:200]
    except ValueError:
        return response.text[:200]
