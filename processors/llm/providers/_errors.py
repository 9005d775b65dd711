"""Turns the exceptions of the vendors' SDKs into :class:`ProviderError` with the right kind.

The three SDKs share one shape (``APIStatusError`` with ``status_code`` and ``response``,
``APITimeoutError`` under ``APIConnectionError``, all under ``APIError``), so one mapping serves
them all; each adapter names its SDK's classes in an :class:`SdkErrors`. Errors raised while a
stream is read may come straight from the HTTP library (``httpx`` for groq, ``httpx2`` for openai
and anthropic) or from ``json`` (a broken event), so those are mapped too.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from typing import NamedTuple

import httpx
import httpx2

from .base import ErrorKind, ProviderError

__all__ = ["SdkErrors", "provider_error"]

_MESSAGE_LIMIT = 300
_TIMEOUTS = (httpx.TimeoutException, httpx2.TimeoutException)
_UNDECODABLE = (httpx.DecodingError, httpx2.DecodingError)
_TRANSPORT = (httpx.TransportError, httpx2.TransportError)
# Anthropic reports failures inside a 200 stream as an `error` event with these types.
_STREAM_ERROR_KINDS: dict[str, ErrorKind] = {
    "rate_limit_error": "rate_limited",
    "authentication_error": "auth",
    "permission_error": "auth",
    "invalid_request_error": "bad_request",
    "not_found_error": "bad_request",
    "request_too_large": "bad_request",
}


class SdkErrors(NamedTuple):
    """One SDK's exception classes, most specific first where they nest."""

    status: type[Exception]
    timeout: type[Exception]
    connection: type[Exception]
    validation: type[Exception]
    api: type[Exception]


def provider_error(
    provider: str, exc: Exception, sdk: SdkErrors, secrets: tuple[str, ...] = ()
) -> ProviderError | None:
    """Returns the ProviderError for ``exc``, or None for an exception no SDK call raises."""
    if isinstance(exc, sdk.status):
        return _status_error(provider, exc, secrets)
    kind = _kind(exc, sdk)
    if kind is None:
        return None
    return ProviderError(provider, kind, _describe(exc, secrets))


def _kind(exc: Exception, sdk: SdkErrors) -> ErrorKind | None:
    if isinstance(exc, (sdk.timeout, *_TIMEOUTS)):
        return "timeout"
    if isinstance(exc, (sdk.validation, *_UNDECODABLE, ValueError)):
        return "malformed"
    if isinstance(exc, (sdk.connection, *_TRANSPORT)):
        return "connection"
    if isinstance(exc, sdk.api):
        return "server"  # an error payload in the middle of a stream
    return None


def _status_error(provider: str, exc: Exception, secrets: tuple[str, ...]) -> ProviderError:
    status: int = getattr(exc, "status_code", 0)
    response = getattr(exc, "response", None)
    headers: Mapping[str, str] = response.headers if response is not None else {}
    kind = _status_kind(status, getattr(exc, "body", None))
    retry_after = _retry_after(headers) if kind in ("rate_limited", "server") else None
    return ProviderError(
        provider,
        kind,
        _describe(exc, secrets),
        status=status or None,
        retry_after=retry_after,
    )


def _status_kind(status: int, body: object) -> ErrorKind:
    if status == 429:
        return "rate_limited"
    if status in (401, 403):
        return "auth"
    if status == 408:
        return "timeout"
    if status >= 500 or status == 409:
        return "server"
    if status >= 400:
        return "bad_request"
    error = body.get("error") if isinstance(body, dict) else None
    error_type = error.get("type") if isinstance(error, dict) else None
    return _STREAM_ERROR_KINDS.get(str(error_type), "server")


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Reads ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date)."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _describe(exc: Exception, secrets: tuple[str, ...]) -> str:
    """Returns a short message without any of ``secrets`` (servers may echo a key back)."""
    text = str(exc) or type(exc).__name__
    for secret in secrets:
        text = text.replace(secret, "***")
    if len(text) > _MESSAGE_LIMIT:
        text = text[: _MESSAGE_LIMIT - 1] + "…"
    return f"{type(exc).__name__}: {text}"
