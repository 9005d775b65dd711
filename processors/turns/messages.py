"""What a person reads when a turn is refused, in their language (English and Korean)."""

from __future__ import annotations

import math

__all__ = ["refusal"]

_TEXTS = {
    "empty": {
        "en": "I didn't get any text — say something and I'll answer.",
        "ko": "메시지가 비어 있어요. 무엇이든 말씀해 주세요.",
    },
    "too_long": {
        "en": (
            "That message is {length:,} characters long, counting its files;"
            " I can read up to {limit:,}."
        ),
        "ko": "메시지가 너무 길어요 (첨부 파일 포함 {length:,}자). {limit:,}자까지 읽을 수 있어요.",
    },
    "rate_limited": {
        "en": "Slow down — try again in {seconds} s.",
        "ko": "조금 천천히요 — {seconds}초 후에 다시 말해 주세요.",
    },
    "invalid": {
        "en": "That message holds characters I can't read (it is not valid UTF-8).",
        "ko": "읽을 수 없는 문자가 들어 있어요 (올바른 UTF-8이 아니에요).",
    },
    "moderated": {
        "en": "I can't help with that message.",
        "ko": "그 메시지에는 답할 수 없어요.",
    },
}


def refusal(
    reason: str, language: str, *, length: int = 0, limit: int = 0, retry_after_s: float = 0
) -> str:
    """Returns the refusal for ``reason`` in ``language`` (English when there is none)."""
    texts = _TEXTS[reason]
    text = texts.get(language, texts["en"])
    return text.format(length=length, limit=limit, seconds=max(1, math.ceil(retry_after_s)))
