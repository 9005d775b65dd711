"""One logger setup: JSON lines by default (``LOG_FORMAT=console`` for people).

Each line carries the component, and the conversation and turn being handled where known; they
come from context variables that the runtime sets around each message. Known secret values are
replaced by ``***`` before a line is written.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import msgspec

__all__ = ["bind", "component", "configure_logging", "log_context"]

component: contextvars.ContextVar[str] = contextvars.ContextVar("component", default="")
_conversation: contextvars.ContextVar[str] = contextvars.ContextVar("conversation", default="")
_turn: contextvars.ContextVar[str] = contextvars.ContextVar("turn", default="")

_encoder = msgspec.json.Encoder()
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def bind(*, conversation: str = "", turn: str = "") -> None:
    """Names the conversation and turn that the current task is working on."""
    _conversation.set(conversation)
    _turn.set(turn)


@contextmanager
def log_context(*, name: str) -> Iterator[None]:
    """Runs a block as the component ``name``: its log lines say so."""
    token = component.set(name)
    try:
        yield
    finally:
        component.reset(token)


class _Redactor:
    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if comp := component.get():
        out["component"] = comp
    if conv := _conversation.get():
        out["conversation"] = conv
    if turn := _turn.get():
        out["turn"] = turn
    for key, value in record.__dict__.items():
        if key not in _STANDARD and not key.startswith("_"):
            out[key] = value
    return out


class _JsonFormatter(logging.Formatter):
    def __init__(self, redact: _Redactor) -> None:
        super().__init__()
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return self.redact(_encoder.encode(line).decode("utf-8", "replace"))


class _ConsoleFormatter(logging.Formatter):
    def __init__(self, redact: _Redactor) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        text = super().format(record)
        return self.redact(f"{text}  [{extra}]" if extra else text)


def configure_logging(
    *,
    fmt: str = "json",
    level: str = "INFO",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    """Sends every log line to ``stream`` (stderr) as JSON or console text, secrets redacted."""
    redact = _Redactor(secrets)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_ConsoleFormatter(redact) if fmt == "console" else _JsonFormatter(redact))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("nats", "asyncio", "httpx", "httpcore", "hikari.ratelimits"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
