"""What a person reads when a turn is refused, in their language (English and Korean)."""

from __future__ import annotations

import math
from collections.abc import Sequence

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
    "moderated_as": {
        "en": "I can't help with that message — flagged as {what}.",
        "ko": "그 메시지에는 답할 수 없어요 (사유: {what}).",
    },
    # Someone who may be in danger is pointed to help, not just refused.
    "moderated_self_harm": {
        "en": (
            "I can't talk about that here. If you are thinking about hurting yourself, please"
            " reach out to someone you trust or a local crisis line."
        ),
        "ko": (
            "여기서는 그 이야기를 할 수 없어요. 스스로를 해칠 생각이 든다면 믿을 수 있는"
            " 사람이나 자살예방상담전화 109에 연락해 주세요."
        ),
    },
}

# Libra's moderation categories (processors/moderation/base.py CATEGORIES) in plain words.
_CATEGORY_WORDS = {
    "harassment": {"en": "harassment", "ko": "괴롭힘"},
    "hate": {"en": "hate speech", "ko": "혐오 표현"},
    "illicit": {"en": "a request for something illegal", "ko": "불법 행위 요청"},
    "self_harm": {"en": "self-harm", "ko": "자해"},
    "sexual": {"en": "sexual content", "ko": "성적인 내용"},
    "sexual_minors": {"en": "sexual content involving minors", "ko": "미성년자 관련 성적인 내용"},
    "violence": {"en": "violence", "ko": "폭력"},
    "blocked_word": {"en": "a word blocked here", "ko": "금지된 단어"},
}
_AND = {"en": " and ", "ko": ", "}


def refusal(
    reason: str,
    language: str,
    *,
    length: int = 0,
    limit: int = 0,
    retry_after_s: float = 0,
    categories: Sequence[str] = (),
) -> str:
    """Returns the refusal for ``reason`` in ``language`` (English when there is none); a
    ``moderated`` one names its flagged ``categories`` in plain words."""
    if reason == "moderated" and categories:
        return _moderated(language, categories)
    texts = _TEXTS[reason]
    text = texts.get(language, texts["en"])
    return text.format(length=length, limit=limit, seconds=max(1, math.ceil(retry_after_s)))


def _moderated(language: str, categories: Sequence[str]) -> str:
    lang = language if language in _AND else "en"
    if "self_harm" in categories:
        return _TEXTS["moderated_self_harm"][lang]
    known = [_CATEGORY_WORDS[c][lang] for c in categories if c in _CATEGORY_WORDS]
    if not known:
        return _TEXTS["moderated"][lang]
    return _TEXTS["moderated_as"][lang].format(what=_AND[lang].join(known))
