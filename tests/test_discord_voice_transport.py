"""The voice transport's parts on their own: RTP, transport encryption, jitter, DAVE, player."""

from __future__ import annotations

import asyncio
import itertools
import struct
import time
from collections.abc import Callable

import pytest

from libra.gateway.discord.voice.cipher import TransportCipher
from libra.gateway.discord.voice.dave import DaveError, DaveState
from libra.gateway.discord.voice.jitter import JitterBuffer, Late
from libra.gateway.discord.voice.link import gateway_url
from libra.gateway.discord.voice.player import SILENCE_FRAMES, Clip, Player
from libra.gateway.discord.voice.protocol import Op
from libra.gateway.discord.voice.rtp import (
    OPUS_SILENCE,
    MalformedPacket,
    build_header,
    parse_header,
)
from libra.ops.fakes import discord_voice as fake

MODES = ("aead_aes256_gcm_rtpsize", "aead_xchacha20_poly1305_rtpsize")
KEY = bytes(range(32))


def _rtp(*, csrcs: int = 0, extension_words: int | None = None, payload: bytes = b"") -> bytes:
    first = 0x80 | csrcs | (0x10 if extension_words is not None else 0)
    packet = struct.pack(">BBHII", first, 0x78, 7, 960, 1234) + bytes(4 * csrcs)
    if extension_words is not None:
        packet += struct.pack(">HH", 0xBEDE, extension_words) + bytes(4 * extension_words)
    return packet + payload


def test_header_with_csrcs_and_extension_tells_clear_and_encrypted_parts() -> None:
    header = parse_header(_rtp(csrcs=2, extension_words=3, payload=b"x"))
    assert (header.sequence, header.timestamp, header.ssrc) == (7, 960, 1234)
    assert header.payload_type == 0x78
    assert header.clear_size == 12 + 8 + 4
    assert header.extension_size == 12


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (b"\x80\x78\x00", "short"),
        (b"\x40" + bytes(11), "not_rtp"),
        (struct.pack(">BBHII", 0x90, 0x78, 1, 1, 1) + b"\xbe", "truncated"),
    ],
)
def test_headers_that_are_not_rtp_are_refused_with_a_reason(packet: bytes, reason: str) -> None:
    with pytest.raises(MalformedPacket) as refused:
        parse_header(packet)
    assert refused.value.reason == reason


@pytest.mark.parametrize("mode", MODES)
def test_sealed_packets_open_on_the_fake_server_with_the_nonce_counter_appended(mode: str) -> None:
    cipher = TransportCipher(mode, KEY)
    header = build_header(100, 96000, 55)
    first = cipher.seal(header, b"opus-1")
    second = cipher.seal(header, b"opus-2")
    assert first[:12] == header
    assert first[-4:] == struct.pack(">I", 1) and second[-4:] == struct.pack(">I", 2)
    assert len(first) == 12 + len(b"opus-1") + 16 + 4
    assert fake.open_rtp(mode, KEY, first) == (100, 96000, 55, b"opus-1")
    assert fake.open_rtp(mode, KEY, second)[3] == b"opus-2"


@pytest.mark.parametrize("mode", MODES)
def test_packets_sealed_by_the_fake_open_with_the_extension_body_stripped(mode: str) -> None:
    clear = struct.pack(">BBHII", 0x90, 0x78, 9, 1920, 77) + struct.pack(">HH", 0xBEDE, 1)
    packet = fake.seal_rtp(mode, KEY, 41, clear, b"\x10\x7f\x00\x00" + b"opus")
    assert TransportCipher(mode, KEY).open(packet, parse_header(packet)) == b"opus"


@pytest.mark.parametrize("mode", MODES)
def test_tampered_wrong_key_and_truncated_packets_are_refused(mode: str) -> None:
    packet = TransportCipher(mode, KEY).seal(build_header(1, 2, 3), b"opus")
    header = parse_header(packet)
    cipher = TransportCipher(mode, KEY)
    tampered = packet[:14] + bytes([packet[14] ^ 1]) + packet[15:]
    cases = [
        (cipher, tampered, "decrypt_failed"),
        (TransportCipher(mode, bytes(32)), packet, "decrypt_failed"),
        (cipher, packet[:20], "truncated"),
    ]
    for opener, data, reason in cases:
        with pytest.raises(MalformedPacket) as refused:
            opener.open(data, header)
        assert refused.value.reason == reason


def test_jitter_buffer_passes_order_through_and_reorders_within_its_depth() -> None:
    buffer: JitterBuffer[str] = JitterBuffer(depth=3)
    assert buffer.push(10, "a", 0.0) == ["a"]
    assert buffer.push(12, "c", 0.0) == []
    assert buffer.push(11, "b", 0.0) == ["b", "c"]
    with pytest.raises(Late, match="late"):
        buffer.push(11, "b", 0.0)
    assert buffer.push(13, "d", 0.0) == ["d"]
    assert buffer.push(15, "f", 0.0) == []
    with pytest.raises(Late, match="duplicate"):
        buffer.push(15, "f", 0.0)


def test_jitter_buffer_conceals_a_loss_once_the_window_is_full_or_too_old() -> None:
    buffer: JitterBuffer[int] = JitterBuffer(depth=2)
    buffer.push(65534, 0, 0.0)
    assert buffer.push(0, 2, 0.0) == []  # 65535 is missing; the sequence wraps
    assert buffer.push(1, 3, 0.0) == []
    assert buffer.push(2, 4, 0.0) == [None, 2, 3, 4]
    assert buffer.push(4, 6, 1.0) == []
    assert buffer.expire(1.05, 0.06) == []
    assert buffer.expire(1.07, 0.06) == [None, 6]


async def test_dave_starts_over_when_a_welcome_cannot_be_applied() -> None:
    state = DaveState(user_id=7, channel_id=99, protocol_version=1)
    [key_package] = state.start()
    assert key_package.op == Op.DAVE_MLS_KEY_PACKAGE and isinstance(key_package.data, bytes)
    assert state.handle(Op.DAVE_MLS_EXTERNAL_SENDER, fake.ExternalSender().package) == []
    replies = state.handle(Op.DAVE_MLS_WELCOME, struct.pack(">H", 5) + b"not a welcome")
    assert [reply.op for reply in replies] == [
        Op.DAVE_MLS_INVALID_COMMIT_WELCOME,
        Op.DAVE_MLS_KEY_PACKAGE,
    ]
    assert replies[0].data == {"transition_id": 5}
    assert replies[1].data != key_package.data


async def test_dave_announces_a_new_group_with_a_fresh_key_package() -> None:
    state = DaveState(user_id=7, channel_id=99, protocol_version=1)
    replies = state.handle(Op.DAVE_PREPARE_EPOCH, {"epoch": 1, "protocol_version": 1})
    assert [reply.op for reply in replies] == [Op.DAVE_MLS_KEY_PACKAGE]
    assert state.handle(Op.DAVE_PREPARE_EPOCH, {"epoch": 5, "protocol_version": 1}) == []


def test_dave_sends_nothing_before_its_group_exists_but_silence() -> None:
    state = DaveState(user_id=7, channel_id=99, protocol_version=1)
    with pytest.raises(DaveError, match="dave_not_ready"):
        state.encrypt(b"\xfc\x01\x02")
    assert state.encrypt(OPUS_SILENCE) == OPUS_SILENCE
    with pytest.raises(DaveError, match="dave_decrypt_failed"):
        state.decrypt(8, b"\xfc\x01\x02")


def test_dave_transitions_wait_for_execute_unless_their_id_is_zero() -> None:
    state = DaveState(user_id=7, channel_id=99, protocol_version=1)
    replies = state.handle(Op.DAVE_PREPARE_TRANSITION, {"transition_id": 3, "protocol_version": 0})
    assert replies[0].op == Op.DAVE_TRANSITION_READY and replies[0].data == {"transition_id": 3}
    assert state.active
    state.handle(Op.DAVE_EXECUTE_TRANSITION, {"transition_id": 3})
    assert not state.active
    assert state.encrypt(b"\xfc\x01") == b"\xfc\x01"  # downgraded: frames go as they are


def test_gateway_url_names_version_8() -> None:
    assert gateway_url("wss://voice.example:443") == "wss://voice.example:443/?v=8"
    assert gateway_url("voice.example:443") == "wss://voice.example:443/?v=8"
    assert gateway_url("ws://127.0.0.1:5000/?v=4") == "ws://127.0.0.1:5000/?v=8"


class _Wire:
    def __init__(self) -> None:
        self.frames: list[tuple[bytes, float, float]] = []
        self.speaking: list[tuple[bool, int]] = []

    def send(self, frame: bytes, slot: float) -> None:
        self.frames.append((frame, slot, time.monotonic()))

    async def set_speaking(self, speaking: bool) -> None:
        self.speaking.append((speaking, len(self.frames)))


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_player_paces_frames_on_the_20ms_grid_and_ends_with_silence() -> None:
    wire = _Wire()
    player = Player(send=wire.send, speaking=wire.set_speaking)
    clips = [Clip.from_opus("a", [b"a%d" % i for i in range(10)]), Clip.from_opus("b", [b"b"] * 5)]
    done = [player.play(clip) for clip in clips]
    results = await asyncio.gather(*done)
    await _until(lambda: wire.speaking[-1][0] is False)  # the silence after the clips went out
    assert [r.frames_sent for r in results] == [10, 5] and not any(r.interrupted for r in results)
    frames = [frame for frame, _, _ in wire.frames]
    assert frames == [*clips[0].frames, *clips[1].frames] + [OPUS_SILENCE] * SILENCE_FRAMES
    slots = [slot for _, slot, _ in wire.frames]
    assert all(abs(b - a - 0.02) < 1e-9 for a, b in itertools.pairwise(slots))
    assert max(sent - slot for _, slot, sent in wire.frames) < 0.01
    assert wire.speaking == [(True, 0), (False, 20)]
    await player.close()


async def test_player_stop_cuts_the_clip_drops_the_queue_and_says_what_was_heard() -> None:
    wire = _Wire()
    player = Player(send=wire.send, speaking=wire.set_speaking)
    long, queued = Clip.from_opus("long", [b"x"] * 100), Clip.from_opus("next", [b"y"] * 10)
    first, second = player.play(long), player.play(queued)
    await _until(lambda: len(wire.frames) >= 10)
    cut = player.stop()
    assert cut.clip == long and cut.dropped == (queued,)
    assert 200 <= cut.played_ms < 2000  # cut short of the clip's 100 frames
    assert (await first).interrupted and (await second).frames_sent == 0
    await _until(lambda: wire.speaking[-1][0] is False)  # its silence went out
    spoken = [frame for frame, _, _ in wire.frames if frame != OPUS_SILENCE]
    assert len(spoken) * 20 == cut.played_ms
    assert [frame for frame, _, _ in wire.frames[len(spoken) :]] == [OPUS_SILENCE] * 5
    assert wire.speaking[-1] == (False, len(spoken) + 5)
    await player.close()
