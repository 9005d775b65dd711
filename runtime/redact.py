"""What may be said about a failure where others read it: dead letters, failure events, logs.

Anyone may read the log (the anonymous observer reads every ``libra.>`` subject on a personal
machine), and an exception's text may quote a URL with its password, a vendor's answer that
echoes the API key, or a token. :func:`describe` keeps what an operator needs (the exception's
class and a short message) and replaces with ``***``: the credentials of a URL, every configured
secret (and its base64 and URL-encoded forms), bearer and basic credentials, JWTs, and any long
token-like string (upper and lower case letters with digits, or a long run of hex).
"""

from __future__ import annotations

import base64
import re
from urllib.parse import quote

__all__ = ["describe", "keep_secret", "redact"]

MESSAGE_LIMIT = 300

_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@'\"]+@")
_AUTHORIZATION = re.compile(r"(?i)\b(bearer|basic)\s+[^\s'\",)]+")
_JWT = re.compile(r"\beyJ[\w-]*\.[\w-]*\.[\w-]*")
_WORD = re.compile(r"[A-Za-z0-9_\-+/=]{20,}")
_HEX_RUN = re.compile(r"[0-9a-fA-F]{32,}")
_known: set[str] = set()


def keep_secret(*values: str) -> None:
    """Remembers configured secret values, so that :func:`redact` removes them wherever seen."""
    for value in values:
        if len(value) < 4:  # too short to replace without mangling ordinary words
            continue
        raw = value.encode()
        _known.update(
            {
                value,
                quote(value, safe=""),
                base64.b64encode(raw).decode().rstrip("="),
                base64.urlsafe_b64encode(raw).decode().rstrip("="),
            }
        )


def redact(text: str, *, limit: int = MESSAGE_LIMIT) -> str:
    """Returns ``text`` without credentials, secrets or tokens, at most ``limit`` characters."""
    text = _URL_CREDENTIALS.sub(r"\1***@", text)
    text = _AUTHORIZATION.sub(r"\1 ***", text)
    text = _JWT.sub("***", text)
    for secret in sorted(_known, key=len, reverse=True):
        text = text.replace(secret, "***")
    text = _WORD.sub(_hide_token, text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe(exc: BaseException, *, limit: int = MESSAGE_LIMIT) -> str:
    """Returns ``"ErrorClass: message"`` with the message redacted and shortened."""
    name = type(exc).__name__
    message = " ".join(str(exc).split())  # one line, as `libra dead list` shows it
    return f"{name}: {redact(message, limit=limit)}" if message else name


def _hide_token(match: re.Match[str]) -> str:
    word = match.group(0)
    mixed = (
        any(c.isupper() for c in word)
        and any(c.islower() for c in word)
        and any(c.isdigit() for c in word)
    )
    return "***" if mixed or _HEX_RUN.search(word) else word
