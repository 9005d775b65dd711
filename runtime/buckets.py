"""The log's buckets, made by whichever component starts first.

Every component provisions the log as it starts, and `libra up` starts them together: a bucket
that another component made a moment before, and may have changed since (the audio bucket takes
no rollups), is opened as it is, not refused as one configured otherwise.
"""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, ObjectStoreConfig
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

__all__ = ["STREAM_NAME_IN_USE", "ensure_key_value", "ensure_object_store"]

log = logging.getLogger("libra.buckets")

STREAM_NAME_IN_USE = 10058  # JetStream: a stream of that name exists, configured otherwise


async def ensure_object_store(js: JetStreamContext, config: ObjectStoreConfig) -> ObjectStore:
    """Opens the object store, creating it first if it is not there; safe to repeat."""
    try:
        return await js.object_store(config.bucket)
    except NotFoundError:
        pass
    try:
        return await js.create_object_store(config.bucket, config=config)
    except BadRequestError as exc:
        _made_meanwhile(exc)
    return await js.object_store(config.bucket)


async def ensure_key_value(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    """Creates the key-value bucket, or opens the one there; safe to repeat."""
    try:
        return await js.create_key_value(config)
    except BadRequestError as exc:
        _made_meanwhile(exc)
    return await js.key_value(config.bucket)


def _made_meanwhile(exc: BadRequestError) -> None:
    if exc.err_code != STREAM_NAME_IN_USE:
        raise exc
    log.info("bucket made by another component meanwhile: %s", exc.description)
