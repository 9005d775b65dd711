"""Prometheus metrics shared by every component; each component serves them on ``/metrics``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from nats.js import JetStreamContext
from prometheus_client import Counter, Gauge, Histogram, start_http_server

__all__ = [
    "CONSUMER_DEAD_LETTERS",
    "CONSUMER_FAILED",
    "CONSUMER_HANDLED",
    "CONSUMER_HANDLER_SECONDS",
    "CONSUMER_PENDING",
    "CONSUMER_REDELIVERED",
    "EVENTS_PUBLISHED",
    "VOICE_PROCESSING_SECONDS",
    "refresh_consumer_lag",
    "serve_metrics",
]

log = logging.getLogger("libra.metrics")

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)

CONSUMER_HANDLED = Counter(
    "libra_consumer_handled_total", "Messages a consumer handled and acked", ["consumer"]
)
CONSUMER_FAILED = Counter(
    "libra_consumer_failed_total", "Handler attempts that raised", ["consumer"]
)
CONSUMER_REDELIVERED = Counter(
    "libra_consumer_redelivered_total", "Messages delivered more than once", ["consumer"]
)
CONSUMER_DEAD_LETTERS = Counter(
    "libra_consumer_dead_letters_total", "Messages given up on and dead-lettered", ["consumer"]
)
CONSUMER_HANDLER_SECONDS = Histogram(
    "libra_consumer_handler_seconds", "Time a handler took", ["consumer"], buckets=_LATENCY_BUCKETS
)
CONSUMER_PENDING = Gauge(
    "libra_consumer_pending",
    "Messages in the stream not yet delivered (consumer lag)",
    ["consumer"],
)
EVENTS_PUBLISHED = Counter("libra_events_published_total", "Events written to the log", ["type"])
VOICE_PROCESSING_SECONDS = Histogram(
    "voice_processing_duration_seconds",
    "Time a stage of the voice pipeline took (stage: vad, asr, tts_first_audio, tts ...)",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
)


async def refresh_consumer_lag(
    js: JetStreamContext, consumers: Iterable[tuple[str, str]], *, every_s: float = 10.0
) -> None:
    """Sets ``libra_consumer_pending`` from each (stream, consumer)'s info, every ``every_s``.

    A consumer's runtime sets it from each message it gets; a consumer that gets none (stuck,
    or not running) would show its last value for ever, so the server is asked as well.
    """
    consumers = list(consumers)
    while True:
        for stream, name in consumers:
            try:
                info = await js.consumer_info(stream, name)
            except Exception as exc:  # not there yet, or the server is away: the next round
                log.debug("no lag for %s: %s", name, exc)
                continue
            CONSUMER_PENDING.labels(name).set(info.num_pending)
        await asyncio.sleep(every_s)


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Serves ``/metrics`` on a background thread (for components without an HTTP API)."""
    start_http_server(port, addr=host)
