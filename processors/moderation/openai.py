"""OpenAI's moderation endpoint (``omni-moderation-latest``), through the official ``openai`` SDK.

The client is built as the LLM provider builds it (``OPENAI_API_KEY``, ``OPENAI_BASE_URL``, the
aiohttp transport, no SDK retries: the moderator's chain has its own timeout and breaker). The
answer is read from the raw body with msgspec: the SDK's models are not validated, so a body
missing a field would pass as a clean verdict; here it fails as ``ModerationUnavailable``.

OpenAI's categories map onto Libra's (the score of a Libra category is the highest of its
OpenAI ones; a category OpenAI adds later counts as ``illicit``):

| OpenAI | Libra |
|---|---|
| harassment, harassment/threatening | harassment |
| hate, hate/threatening | hate |
| illicit, illicit/violent | illicit |
| self-harm, self-harm/intent, self-harm/instructions | self_harm |
| sexual | sexual |
| sexual/minors | sexual_minors |
| violence, violence/graphic | violence |
"""

from __future__ import annotations

from time import perf_counter

import msgspec
import openai

from libra.processors.llm.providers._errors import provider_error
from libra.processors.llm.providers.openai_compat import (
    CONNECTION_LIMITS,
    OPENAI_ERRORS,
    OPENAI_URL,
)

from .base import ModerationUnavailable, Verdict

__all__ = ["OPENAI_CATEGORIES", "OPENAI_MODERATION_MODEL", "OpenAIModeration"]

OPENAI_MODERATION_MODEL = "omni-moderation-latest"
OPENAI_CATEGORIES = {
    "harassment": "harassment",
    "harassment/threatening": "harassment",
    "hate": "hate",
    "hate/threatening": "hate",
    "illicit": "illicit",
    "illicit/violent": "illicit",
    "self-harm": "self_harm",
    "self-harm/intent": "self_harm",
    "self-harm/instructions": "self_harm",
    "sexual": "sexual",
    "sexual/minors": "sexual_minors",
    "violence": "violence",
    "violence/graphic": "violence",
}


class _Result(msgspec.Struct):
    flagged: bool
    categories: dict[str, bool | None]  # OpenAI sends null for a category a model lacks
    category_scores: dict[str, float]


class _Answer(msgspec.Struct):
    results: list[_Result]


_decode_answer = msgspec.json.Decoder(_Answer).decode


class OpenAIModeration:
    """Asks OpenAI's moderation endpoint about one text."""

    name = "openai"
    covers = frozenset(OPENAI_CATEGORIES.values())

    def __init__(
        self,
        *,
        api_key: str,
        timeout: float,
        base_url: str = OPENAI_URL,
        model: str = OPENAI_MODERATION_MODEL,
    ) -> None:
        self.model = model
        self._secrets = (api_key,)
        self._client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            max_retries=0,  # the moderator's chain moves on instead
            http_client=openai.DefaultAioHttpClient(limits=CONNECTION_LIMITS),
        )

    async def check(self, text: str) -> Verdict:
        """OpenAI's verdict on ``text`` in Libra's categories, with their scores."""
        began = perf_counter()
        try:
            raw = await self._client.moderations.with_raw_response.create(
                model=self.model, input=text
            )
            answer = _decode_answer(raw.content)
        except msgspec.DecodeError as exc:
            raise ModerationUnavailable(f"{self.name}: malformed answer: {exc}") from None
        except Exception as exc:
            error = provider_error(self.name, exc, OPENAI_ERRORS, self._secrets)
            if error is None:
                raise
            raise ModerationUnavailable(str(error)) from None
        if not answer.results:
            raise ModerationUnavailable(f"{self.name}: malformed answer: no results")
        return _verdict(answer.results[0], self.name, (perf_counter() - began) * 1000)

    async def close(self) -> None:
        """Closes the SDK client and its connections."""
        await self._client.close()


def _verdict(result: _Result, engine: str, latency_ms: float) -> Verdict:
    scores: dict[str, float] = {}
    for name, score in result.category_scores.items():
        category = OPENAI_CATEGORIES.get(name, "illicit")
        scores[category] = max(scores.get(category, 0.0), score)
    flagged = {
        OPENAI_CATEGORIES.get(name, "illicit") for name, on in result.categories.items() if on
    }
    return Verdict(
        flagged=result.flagged or bool(flagged),
        categories=tuple(sorted(flagged)),
        scores=scores,
        engine=engine,
        latency_ms=latency_ms,
    )
