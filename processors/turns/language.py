"""Language of a turn, from the scripts its letters are written in.

Hangul is Korean, kana is Japanese, Han without kana is Chinese; Latin script is taken as English
(the default the reply and the voice fall back to). Cheap, deterministic and right for the
languages Libra's voices cover; the ASR's own detection wins for voice turns.
"""

from __future__ import annotations

__all__ = ["detect_language"]


def _script(ch: str) -> str:
    code = ord(ch)
    if 0xAC00 <= code <= 0xD7A3 or 0x1100 <= code <= 0x11FF or 0x3130 <= code <= 0x318F:
        return "ko"
    if 0x3040 <= code <= 0x30FF or 0x31F0 <= code <= 0x31FF:
        return "ja"
    if 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF:
        return "han"
    if ch.isalpha() and code < 0x250:
        return "latin"
    return ""


def detect_language(text: str, *, default: str = "en") -> str:
    """Returns ``ko``, ``ja``, ``zh`` or ``en`` (or ``default`` when there are no letters)."""
    counts = {"ko": 0, "ja": 0, "han": 0, "latin": 0}
    for ch in text[:2000]:
        script = _script(ch)
        if script:
            counts[script] += 1
    if counts["ja"]:
        return "ja"  # Japanese mixes kana with Han; any kana decides it
    best = max(counts, key=counts.__getitem__)
    if counts[best] == 0:
        return default
    return {"ko": "ko", "han": "zh", "latin": "en"}[best]
