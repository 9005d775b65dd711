"""Llama Guard through Groq's chat API, with the official ``groq`` SDK.

The model reads the text as a user message and answers ``safe``, or ``unsafe`` with a second
line of hazard codes (``unsafe\\nS1,S10``). It gives no scores: a flagged category scores 1.0.
Any other answer is not a verdict and raises ``ModerationUnavailable``, so the next engine is
asked. The codes (MLCommons' hazard taxonomy) map onto Libra's categories; a code without an
obvious match, and one a later model adds, counts as ``illicit``:

| code | hazard | Libra |
|---|---|---|
| S1 | violent crimes | violence |
| S2 | non-violent crimes | illicit |
| S3 | sex-related crimes | sexual |
| S4 | child sexual exploitation | sexual_minors |
| S5 | defamation | harassment |
| S6 | specialized advice | illicit |
| S7 | privacy | harassment (exposing a person's private data targets that person) |
| S8 | intellectual property | illicit |
| S9 | indiscriminate weapons | illicit (OpenAI's illicit/violent) |
| S10 | hate | hate |
| S11 | suicide and self-harm | self_harm |
| S12 | sexual content | sexual |
| S13 | elections | illicit |
| S14 | code interpreter abuse | illicit |
"""

from __future__ import annotations

import re
from time import perf_counter

import groq

from libra.processors.llm.providers._errors import provider_error
from libra.processors.llm.providers.groq import CONNECTION_LIMITS, GROQ_ERRORS, GROQ_URL

from .base import ModerationUnavailable, Verdict

__all__ = ["GUARD_CODES", "GUARD_MODEL", "LlamaGuard", "parse_guard_answer"]

GUARD_MODEL = "meta-llama/llama-guard-4-12b"
GUARD_CODES = {
    "S1": "violence",
    "S2": "illicit",
    "S3": "sexual",
    "S4": "sexual_minors",
    "S5": "harassment",
    "S6": "illicit",
    "S7": "harassment",
    "S8": "illicit",
    "S9": "illicit",
    "S10": "hate",
    "S11": "self_harm",
    "S12": "sexual",
    "S13": "illicit",
    "S14": "illicit",
}
_CODE = re.compile(r"^S\d{1,2}$")
_MAX_ANSWER_TOKENS = 20  # "unsafe" and a few codes; a longer answer is not a verdict anyway


def parse_guard_answer(answer: str) -> tuple[str, ...] | None:
    """Libra's categories for a Llama Guard answer: () for safe; None when it is no verdict."""
    lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
    if not lines or len(lines) > 2:
        return None
    word = lines[0].lower()
    if word == "safe" and len(lines) == 1:
        return ()
    if word != "unsafe":
        return None
    codes = [code.strip().upper() for code in lines[1].split(",")] if len(lines) == 2 else []
    if not all(_CODE.match(code) for code in codes):
        return None
    # "unsafe" without a code is still a verdict: the model says harm, not which.
    return tuple(sorted({GUARD_CODES.get(code, "illicit") for code in codes} or {"illicit"}))


class LlamaGuard:
    """Asks a Llama Guard model on Groq about one text."""

    name = "llama_guard"
    covers = frozenset(GUARD_CODES.values())

    def __init__(
        self, *, api_key: str, timeout: float, model: str = GUARD_MODEL, base_url: str = GROQ_URL
    ) -> None:
        self.model = model
        self._secrets = (api_key,)
        self._client = groq.AsyncGroq(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            max_retries=0,  # the moderator's chain moves on instead
            http_client=groq.DefaultAioHttpClient(limits=CONNECTION_LIMITS),
        )

    async def check(self, text: str) -> Verdict:
        """Llama Guard's verdict on ``text`` in Libra's categories (flagged ones score 1.0)."""
        began = perf_counter()
        try:
            completion = await self._client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": text}],
                max_tokens=_MAX_ANSWER_TOKENS,
                temperature=0,
            )
        except Exception as exc:
            error = provider_error(self.name, exc, GROQ_ERRORS, self._secrets)
            if error is None:
                raise
            raise ModerationUnavailable(str(error)) from None
        # The SDK does not validate a body: one without a message gets no further than here.
        choices = getattr(completion, "choices", None) or [None]
        answer = getattr(getattr(choices[0], "message", None), "content", None)
        categories = parse_guard_answer(answer) if isinstance(answer, str) else None
        if categories is None:
            # Not the answer itself: it may repeat the person's text, which stays out of logs.
            size = len(answer) if isinstance(answer, str) else 0
            raise ModerationUnavailable(f"{self.name}: malformed answer ({size} characters)")
        return Verdict(
            flagged=bool(categories),
            categories=categories,
            scores=dict.fromkeys(categories, 1.0),
            engine=self.name,
            latency_ms=(perf_counter() - began) * 1000,
        )

    async def close(self) -> None:
        """Closes the SDK client and its connections."""
        await self._client.close()
