"""Contracts: every event round-trips; bad payloads fail with one clear error; subjects are safe."""

from __future__ import annotations

import typing

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from libra.contracts import (
    LIVE_SUBJECTS,
    LOG_SUBJECTS,
    AnyEvent,
    EventDecodeError,
    SubjectError,
    TextReceived,
    conversation_id,
    decode_event,
    derive_id,
    encode_event,
    id_time,
    new_id,
    parse_subject,
    safe_token,
    subject,
    subject_of,
    unescape_token,
)

from .factories import every_event, text


def test_every_event_type_has_a_factory() -> None:
    union = set(typing.get_args(AnyEvent))
    assert {type(e) for e in every_event()} == union


@pytest.mark.parametrize("event", every_event(), ids=lambda e: type(e).__struct_config__.tag)
def test_round_trip(event) -> None:
    wire = encode_event(event)
    assert decode_event(wire) == event
    assert msgspec.json.decode(wire)["type"] == type(event).__struct_config__.tag
    parts = parse_subject(subject_of(event))
    assert parts.conversation == event.conversation


def test_wire_is_readable_json() -> None:
    wire = encode_event(text(message="안녕"))
    assert "안녕".encode() in wire  # not escaped: `nats sub` shows it as people wrote it
    assert b'"type":"text.received"' in wire and b'"v":1' in wire


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"{not json", "malformed"),
        (b"", "malformed"),
        (b"\xff\xfe", "malformed"),
        (b'{"type":"text.unknown","id":"x"}', "Invalid value 'text.unknown'"),
        (b"[1,2]", "invalid event"),
    ],
)
def test_bad_payloads_raise_one_error_type(payload: bytes, why: str) -> None:
    with pytest.raises(EventDecodeError, match=why):
        decode_event(payload)


def test_unknown_version_is_refused() -> None:
    wire = encode_event(text()).replace(b'"v":1', b'"v":2')
    with pytest.raises(EventDecodeError, match="unsupported schema version 2"):
        decode_event(wire)


def test_bad_field_names_its_location() -> None:
    wire = encode_event(text()).replace(b'"user":"discord:u1"', b'"user":5')
    with pytest.raises(EventDecodeError, match=r"\$\.user"):
        decode_event(wire)


def test_bad_conversation_is_refused_at_decode() -> None:
    wire = encode_event(text()).replace(b'"conversation":"discord-1-2"', b'"conversation":"a.b"')
    with pytest.raises(EventDecodeError, match="subject token"):
        decode_event(wire)


def test_derived_ids_are_stable_and_time_ordered() -> None:
    parent = new_id()
    assert derive_id(parent, "out") == derive_id(parent, "out")
    assert derive_id(parent, "out") != derive_id(parent, "other")
    assert id_time(derive_id(parent, "out")) == id_time(parent)
    earlier, later = new_id(at_ms=1_700_000_000_000), new_id(at_ms=1_700_000_000_001)
    assert earlier < later


@given(st.text(min_size=1, max_size=60))
def test_tokens_are_safe_and_reversible(value: str) -> None:
    token = safe_token(value)
    assert not set(token) & set(". *>\t\r\n")
    assert token.isascii()
    if "~~" not in token:  # long values keep a readable head and a hash instead
        assert unescape_token(token) == value


@given(
    st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=3),
    st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=3),
)
def test_conversation_ids_do_not_collide(a: list[str], b: list[str]) -> None:
    if a != b:
        assert conversation_id("http", *a) != conversation_id("http", *b)


def test_subjects() -> None:
    assert subject("text", "received", "http-alice") == "libra.text.received.http-alice"
    with pytest.raises(SubjectError):
        subject("text", "received", "a.b")
    with pytest.raises(SubjectError):
        parse_subject("libra.text.received")
    assert conversation_id("discord", 1, 2) == "discord-1-2"


def test_streams_do_not_overlap() -> None:
    assert "libra.llm.delta.>" in LIVE_SUBJECTS
    assert not any(s.startswith("libra.llm.delta") or s == "libra.llm.>" for s in LOG_SUBJECTS)


def test_constructing_an_invalid_event_fails() -> None:
    with pytest.raises(ValueError, match="not an event id"):
        TextReceived(id="nope", at=text().at, conversation="c", text="x", origin=text().origin)
