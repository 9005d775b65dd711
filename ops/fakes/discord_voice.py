"""A loopback Discord voice server: websocket (protocol v8) and UDP on 127.0.0.1, with DAVE.

It plays Discord's part for one voice channel. The bot under test connects over the websocket
(identify or resume, heartbeats with ``seq_ack``, select protocol, session description) and
sends and receives RTP over UDP with transport encryption. The other people in the call are
simulated members, each with a DAVE session of its own: ``davey``, or Discord's libdave through
``dave.py`` to catch format differences. They speak RTP to the bot and hear what it sends.

For DAVE the server is MLS's external sender and delivery service, without an MLS library: it
signs external proposals (RFC 9420 public messages from an external sender, no membership tag,
signed with its P-256 key under the label "FramedContentTBS" over content that does not include
the group context), relays commits and welcomes, and tracks leaf indices itself (the first
committer is leaf 0, adds fill the leftmost free leaf).

This module shares no code with Libra's transport, so a mistake in one is not mirrored by the
other.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import ipaddress
import json
import os
import socket
import ssl
import struct
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import davey
from aiohttp import WSMsgType, web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)

__all__ = [
    "MODES",
    "ExternalSender",
    "FakeMember",
    "FakeVoiceServer",
    "Heard",
    "mls_vector",
    "open_rtp",
    "seal_rtp",
    "self_signed_tls",
]

MODES = ("aead_aes256_gcm_rtpsize", "aead_xchacha20_poly1305_rtpsize")

# Voice gateway opcodes, as Discord documents them.
IDENTIFY, SELECT_PROTOCOL, READY, HEARTBEAT, SESSION_DESCRIPTION, SPEAKING = 0, 1, 2, 3, 4, 5
HEARTBEAT_ACK, RESUME, HELLO, RESUMED, CLIENTS_CONNECT, CLIENT_DISCONNECT = 6, 7, 8, 9, 11, 13
EXECUTE_TRANSITION, TRANSITION_READY, PREPARE_EPOCH = 22, 23, 24
EXTERNAL_SENDER, KEY_PACKAGE, PROPOSALS, COMMIT_WELCOME = 25, 26, 27, 28
ANNOUNCE_COMMIT, WELCOME, INVALID_COMMIT_WELCOME = 29, 30, 31
# Messages about the connection itself carry no sequence number and are never replayed.
_UNSEQUENCED = {HELLO, HEARTBEAT_ACK, RESUMED}

OPUS_SILENCE = b"\xf8\xff\xfe"


# --- MLS, as much as a DAVE server needs (RFC 9420 wire format) -----------------------------


def _varint(n: int) -> bytes:
    if n < 0x40:
        return bytes((n,))
    if n < 0x4000:
        return struct.pack(">H", n | 0x4000)
    return struct.pack(">I", n | 0x80000000)


def mls_vector(data: bytes) -> bytes:
    """An MLS variable-length vector: a QUIC varint length, then the bytes."""
    return _varint(len(data)) + data


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated MLS message")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vec(self) -> bytes:
        prefix = self.data[self.pos] >> 6
        if prefix == 0:
            length = self.uint(1)
        elif prefix == 1:
            length = self.uint(2) & 0x3FFF
        elif prefix == 2:
            length = self.uint(4) & 0x3FFFFFFF
        else:
            raise ValueError("bad MLS varint")
        return self.take(length)


def _skip_leaf_node(r: _Reader) -> None:
    r.vec()  # encryption_key
    r.vec()  # signature_key
    r.uint(2)  # credential_type
    r.vec()  # identity (basic) or certificates (x509)
    for _ in range(5):  # capabilities: versions, cipher suites, extensions, proposals, credentials
        r.vec()
    source = r.uint(1)
    if source == 1:  # key_package: lifetime
        r.take(16)
    elif source == 3:  # commit: parent_hash
        r.vec()
    r.vec()  # extensions
    r.vec()  # signature


@dataclass(frozen=True)
class _Commit:
    message: bytes
    epoch: int
    sender_leaf: int
    refs: tuple[bytes, ...]


def _split_commit_welcome(data: bytes) -> tuple[_Commit, bytes | None]:
    """Op 28 is a commit (an MLSMessage) followed by an optional bare Welcome."""
    r = _Reader(data)
    r.uint(2)  # version
    if r.uint(2) != 1:
        raise ValueError("commit is not a public message")
    r.vec()  # group_id
    epoch = r.uint(8)
    sender_type = r.uint(1)
    sender_leaf = r.uint(4) if sender_type in (1, 2) else -1
    r.vec()  # authenticated_data
    if r.uint(1) != 3:
        raise ValueError("not a commit")
    proposals = _Reader(r.vec())
    refs = []
    while proposals.pos < len(proposals.data):
        if proposals.uint(1) != 2:
            raise ValueError("inline proposals are not expected from DAVE clients")
        refs.append(proposals.vec())
    if r.uint(1):  # optional<UpdatePath>
        _skip_leaf_node(r)
        r.vec()  # path nodes
    r.vec()  # signature
    r.vec()  # confirmation_tag
    if sender_type == 1:
        r.vec()  # membership_tag
    commit = _Commit(data[: r.pos], epoch, sender_leaf, tuple(refs))
    return commit, (data[r.pos :] or None)


class ExternalSender:
    """The server's MLS identity: signs proposals that add and remove members."""

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        public = self._key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        # ExternalSender: signature key, then a basic credential.
        self.package = mls_vector(public) + struct.pack(">H", 1) + mls_vector(b"discord")

    def proposal(self, group_id: bytes, epoch: int, body: bytes) -> bytes:
        """An MLSMessage: a public message from external sender 0 carrying one proposal."""
        wire = struct.pack(">HH", 1, 1)  # mls10, mls_public_message
        content = (
            mls_vector(group_id)
            + struct.pack(">Q", epoch)
            + struct.pack(">BI", 2, 0)  # sender: external, index 0
            + mls_vector(b"")  # authenticated_data
            + bytes((2,))  # content type: proposal
            + body
        )
        # FramedContentTBS for an external sender: version, wire format, content; no context.
        to_sign = mls_vector(b"MLS 1.0 FramedContentTBS") + mls_vector(wire + content)
        signature = self._key.sign(to_sign, ec.ECDSA(hashes.SHA256()))
        return wire + content + mls_vector(signature)

    @staticmethod
    def add(key_package: bytes) -> bytes:
        """An Add proposal's body."""
        return struct.pack(">H", 1) + key_package

    @staticmethod
    def remove(leaf: int) -> bytes:
        """A Remove proposal's body."""
        return struct.pack(">HI", 3, leaf)


def _proposal_ref(message: bytes) -> bytes:
    """RefHash over the AuthenticatedContent: the message without its version field."""
    label = mls_vector(b"MLS 1.0 Proposal Reference")
    return hashlib.sha256(label + mls_vector(message[2:])).digest()


# --- the members' DAVE sessions ---------------------------------------------------------------


class _DaveyMls:
    """A member's DAVE session with ``davey``."""

    def __init__(self, user_id: int, channel_id: int) -> None:
        self.user_id = user_id
        self._session = davey.DaveSession(1, user_id, channel_id)

    def key_package(self) -> bytes:
        return self._session.get_serialized_key_package()

    def set_external_sender(self, package: bytes) -> None:
        self._session.set_external_sender(package)

    def process_proposals(self, payload: bytes, known: Iterable[int]) -> bytes | None:
        operation = (davey.ProposalsOperationType.append, davey.ProposalsOperationType.revoke)[
            payload[0]
        ]
        result = self._session.process_proposals(operation, payload[1:], list(known))
        return None if result is None else result.commit + (result.welcome or b"")

    def process_commit(self, commit: bytes, transition: int) -> None:
        self._session.process_commit(commit)
        self._session.prepare_transition(transition, 1)

    def process_welcome(self, welcome: bytes, known: Iterable[int], transition: int) -> None:
        self._session.process_welcome(welcome)
        self._session.prepare_transition(transition, 1)

    def execute(self, transition: int) -> None:
        self._session.execute_transition(transition)

    def encrypt(self, opus: bytes, ssrc: int) -> bytes:
        return self._session.encrypt_opus(opus)

    def decrypt(self, sender: int, frame: bytes) -> bytes:
        return self._session.decrypt(sender, davey.MediaType.audio, frame)


class _LibdaveMls:
    """A member's DAVE session with Discord's libdave (``dave.py``).

    A strict member: it takes an epoch's keys, its own and the others', only at its own
    execute transition (op 22), so anyone who switched earlier is not heard by it meanwhile.
    """

    def __init__(self, user_id: int, channel_id: int) -> None:
        import dave  # optional: only the scenarios run against libdave need it

        self._dave = dave
        self.user_id = user_id
        self.failures: list[tuple[str, str]] = []
        self._session = dave.Session(lambda source, reason: self.failures.append((source, reason)))
        self._session.init(1, channel_id, str(user_id), None)
        self._encryptor = dave.Encryptor()
        self._decryptors: dict[int, Any] = {}
        self._prepared: dict[int, dict[int, list[int]]] = {}

    def key_package(self) -> bytes:
        return self._session.get_marshalled_key_package()

    def set_external_sender(self, package: bytes) -> None:
        self._session.set_external_sender(package)

    def process_proposals(self, payload: bytes, known: Iterable[int]) -> bytes | None:
        # libdave reads the operation type itself, in front of the proposals.
        return self._session.process_proposals(payload, {str(user) for user in known})

    def process_commit(self, commit: bytes, transition: int) -> None:
        roster = self._session.process_commit(commit)
        if not isinstance(roster, dict):
            raise RuntimeError(f"libdave rejected the commit: {roster!r}")
        self._prepare(transition, roster)

    def process_welcome(self, welcome: bytes, known: Iterable[int], transition: int) -> None:
        roster = self._session.process_welcome(welcome, {str(user) for user in known})
        if roster is None:
            raise RuntimeError("libdave rejected the welcome")
        self._prepare(transition, roster)

    def _prepare(self, transition: int, roster: dict[int, list[int]]) -> None:
        if transition == 0:
            self._rekey(roster)
        else:
            self._prepared[transition] = roster

    def execute(self, transition: int) -> None:
        roster = self._prepared.pop(transition, None)
        if roster is not None:
            self._rekey(roster)

    def _rekey(self, roster: dict[int, list[int]]) -> None:
        # The roster lists what changed: members added (with a key) and removed (without).
        for user, key in roster.items():
            if not key:
                self._decryptors.pop(user, None)
            elif user != self.user_id:
                self._decryptors.setdefault(user, self._dave.Decryptor())
        # Every epoch has new media keys, for the members who stayed too.
        self._encryptor.set_key_ratchet(self._session.get_key_ratchet(str(self.user_id)))
        for user, decryptor in self._decryptors.items():
            decryptor.transition_to_key_ratchet(self._session.get_key_ratchet(str(user)))

    def encrypt(self, opus: bytes, ssrc: int) -> bytes:
        self._encryptor.assign_ssrc_to_codec(ssrc, self._dave.Codec.opus)
        frame = self._encryptor.encrypt(self._dave.MediaType.audio, ssrc, opus)
        if frame is None:
            raise RuntimeError("libdave could not encrypt")
        return frame

    def decrypt(self, sender: int, frame: bytes) -> bytes:
        decryptor = self._decryptors.get(sender)
        plain = decryptor.decrypt(self._dave.MediaType.audio, frame) if decryptor else None
        if plain is None:
            raise RuntimeError("libdave could not decrypt")
        return plain


_LIBRARIES: dict[str, Callable[[int, int], Any]] = {"davey": _DaveyMls, "libdave": _LibdaveMls}


# --- transport encryption, the server's side ---------------------------------------------------


def seal_rtp(mode: str, key: bytes, counter: int, clear: bytes, secret: bytes) -> bytes:
    """A packet as the server sends it: clear part, ciphertext and tag, nonce counter."""
    trailer = struct.pack(">I", counter)
    if mode == MODES[0]:
        sealed = AESGCM(key).encrypt(trailer + bytes(8), secret, clear)
    else:
        sealed = crypto_aead_xchacha20poly1305_ietf_encrypt(secret, clear, trailer + bytes(20), key)
    return clear + sealed + trailer


def open_rtp(mode: str, key: bytes, packet: bytes) -> tuple[int, int, int, bytes]:
    """Sequence, timestamp, SSRC and payload (extension body stripped) of a packet."""
    first = packet[0]
    clear = 12 + 4 * (first & 0x0F) + (4 if first & 0x10 else 0)
    extension = 4 * struct.unpack_from(">H", packet, clear - 2)[0] if first & 0x10 else 0
    trailer = packet[-4:]
    if mode == MODES[0]:
        plain = AESGCM(key).decrypt(trailer + bytes(8), packet[clear:-4], packet[:clear])
    else:
        plain = crypto_aead_xchacha20poly1305_ietf_decrypt(
            packet[clear:-4], packet[:clear], trailer + bytes(20), key
        )
    _, _, sequence, timestamp, ssrc = struct.unpack_from(">BBHII", packet)
    return sequence, timestamp, ssrc, plain[extension:]


# --- the call ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Heard:
    """One frame the bot sent, as a member heard it: both encryption layers removed."""

    sequence: int
    timestamp: int
    opus: bytes
    arrived: float


@dataclass
class FakeMember:
    """A simulated person in the call."""

    user_id: int
    ssrc: int
    library: str
    server: FakeVoiceServer
    mls: Any
    heard: list[Heard] = field(default_factory=list)
    undecryptable: int = 0
    epoch: int | None = None
    # A member that does not listen skips decrypting what the bot sends (benchmarks).
    listening: bool = True
    errors: list[str] = field(default_factory=list)
    _sequence: int = 0
    _timestamp: int = 0

    def packets(self, frames: Sequence[bytes]) -> list[bytes]:
        """RTP datagrams to the bot for these Opus frames, consecutive in sequence and time.

        Each is DAVE-encrypted by this member and transport-encrypted with the bot's key; the
        header carries a one-byte-header extension, as Discord's clients send.
        """
        return [self._packet(frame) for frame in frames]

    def _packet(self, opus: bytes) -> bytes:
        bot = self.server.bot
        if bot.key is None:
            raise RuntimeError("the bot has no session description yet")
        self._sequence = (self._sequence + 1) & 0xFFFF
        self._timestamp = (self._timestamp + 960) & 0xFFFFFFFF
        payload = opus if opus == OPUS_SILENCE else self.mls.encrypt(opus, self.ssrc)
        header = struct.pack(">BBHII", 0x90, 0x78, self._sequence, self._timestamp, self.ssrc)
        # The extension header is in the clear; its body (audio level, padded) is encrypted.
        clear = header + struct.pack(">HH", 0xBEDE, 1)
        secret = bytes((0x10, 0x7F, 0, 0)) + payload
        bot.nonce = (bot.nonce + 1) & 0xFFFFFFFF
        return seal_rtp(bot.mode, bot.key, bot.nonce, clear, secret)

    def announce(self) -> None:
        """Tells the bot which SSRC this member speaks on (op 5)."""
        self.server.to_bot(
            SPEAKING, {"user_id": str(self.user_id), "ssrc": self.ssrc, "speaking": 1}
        )

    async def speak(self, frames: Sequence[bytes], *, interval: float = 0.02) -> None:
        """Sends frames to the bot in real time (op 5 first), paced on a monotonic grid."""
        self.announce()
        start = time.monotonic()
        for index, datagram in enumerate(self.packets(frames)):
            await asyncio.sleep(max(0.0, start + index * interval - time.monotonic()))
            self.server.send_to_bot(datagram)

    def hear(self, sender: int, sequence: int, timestamp: int, frame: bytes) -> None:
        try:
            opus = frame if frame == OPUS_SILENCE else self.mls.decrypt(sender, frame)
        except Exception:  # wrong key, not in the group yet: what the test looks at
            self.undecryptable += 1
            return
        self.heard.append(Heard(sequence, timestamp, opus, time.perf_counter()))


@dataclass
class _Bot:
    """The connected bot: its session, websocket and UDP state."""

    user_id: int = 0
    session_id: str = ""
    ssrc: int = 0
    mode: str = MODES[0]
    key: bytes | None = None
    nonce: int = 0
    address: tuple[str, int] | None = None
    seq: int = 0
    sent: list[tuple[int, str | bytes]] = field(default_factory=list)
    ws: web.WebSocketResponse | None = None
    outbox: asyncio.Queue[str | bytes] | None = None
    transport: asyncio.Transport | None = None


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: FakeVoiceServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.server.udp_received(data, addr)


class FakeVoiceServer:
    """Discord's voice server for one channel, on loopback."""

    def __init__(
        self,
        *,
        guild_id: int,
        channel_id: int,
        token: str = "voice-token",
        modes: Sequence[str] = MODES,
        dave: bool = True,
        heartbeat_interval_ms: int = 13_750,
        member_commit_delay: float = 0.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.guild_id = guild_id
        self.channel_id = channel_id
        self.token = token
        self.modes = list(modes)
        self.dave = dave
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.member_commit_delay = member_commit_delay
        self._tls = tls
        self.bot = _Bot()
        self.members: dict[int, FakeMember] = {}
        self.identifies = 0
        self.resumes = 0
        self.seq_acks: list[int] = []
        self.invalid: list[int] = []  # the transitions Libra refused (op 31)
        self.bot_speaking: list[tuple[float, int]] = []
        self.executed: list[int] = []
        # A test's lever: when set, a transition every participant is ready for waits (in
        # ``held``) until ``release_transition``, so what is sent between commit and op 22 shows.
        self.hold_transitions = False
        self.held: int | None = None
        self._sender = ExternalSender()
        self._group_id = channel_id.to_bytes(8, "big")
        self._epoch: int | None = None
        self._leaves: dict[int, int] = {}
        self._departed: set[int] = set()
        # Who committed into which epoch, in order.
        self.commits: list[tuple[int, int]] = []
        self._key_packages: dict[int, bytes] = {}
        self._proposed: dict[bytes, tuple[str, int]] = {}
        self._transition: tuple[int, set[int], list[int]] | None = None
        self._next_transition = 1
        self._ssrcs = iter(range(1000, 1 << 31, 7))
        self._runner: web.AppRunner | None = None
        self._udp: _Udp | None = None
        self.port = 0
        self.udp_port = 0

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/", self._websocket)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock, ssl_context=self._tls).start()
        loop = asyncio.get_running_loop()
        _, self._udp = await loop.create_datagram_endpoint(
            lambda: _Udp(self), local_addr=("127.0.0.1", 0)
        )
        self.udp_port = self._udp.transport.get_extra_info("sockname")[1]

    async def stop(self) -> None:
        if self.bot.ws is not None:
            await self.bot.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._udp is not None and self._udp.transport is not None:
            self._udp.transport.close()

    async def __aenter__(self) -> FakeVoiceServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def endpoint(self) -> str:
        """What VOICE_SERVER_UPDATE would carry: host and port, no scheme."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'wss' if self._tls else 'ws'}://{self.endpoint}"

    @property
    def epoch(self) -> int | None:
        """The MLS group's epoch, as the server tracks it (None: no group yet)."""
        return self._epoch

    @property
    def connected(self) -> bool:
        return self.bot.ws is not None and not self.bot.ws.closed

    @property
    def settled(self) -> bool:
        """A group exists, no transition is pending, and every member is in its epoch."""
        return (
            self._epoch is not None
            and self._transition is None
            and all(m.epoch == self._epoch for m in self.members.values())
        )

    # --- the test's levers --------------------------------------------------------------------

    async def join(self, user_id: int, *, library: str = "davey") -> FakeMember:
        """A person joins the call: client connect, op 5, and (with DAVE) their key package."""
        member = FakeMember(
            user_id=user_id,
            ssrc=next(self._ssrcs),
            library=library,
            server=self,
            mls=_LIBRARIES[library](user_id, self.channel_id) if self.dave else None,
        )
        self.members[user_id] = member
        if self.bot.key is not None:
            self.to_bot(CLIENTS_CONNECT, {"user_ids": [str(user_id)]})
            member.announce()
        if self.dave:
            member.mls.set_external_sender(self._sender.package)
            self._key_packages[user_id] = member.mls.key_package()
            self._propose()
        return member

    async def leave(self, user_id: int) -> None:
        """A person leaves: client disconnect, and a proposal to remove their leaf."""
        self.members.pop(user_id, None)
        self.to_bot(CLIENT_DISCONNECT, {"user_id": str(user_id)})
        if self.dave:
            self._depart(user_id)

    def drop(self) -> None:
        """Cuts the websocket without a close frame, as a network failure would."""
        if self.bot.transport is not None:
            self.bot.transport.abort()

    async def close_websocket(self, code: int) -> None:
        """Closes the websocket with a close code."""
        if self.bot.ws is not None:
            await self.bot.ws.close(code=code)

    def sender_socket(self) -> socket.socket:
        """A socket that sends from the server's UDP address, for senders on other threads."""
        if self._udp is None or self._udp.transport is None:
            raise RuntimeError("the server is not started")
        fileno = self._udp.transport.get_extra_info("socket").fileno()
        return socket.socket(fileno=os.dup(fileno))

    def send_to_bot(self, datagram: bytes) -> None:
        """Sends a raw datagram to the bot's UDP address."""
        if self.bot.address is None or self._udp is None or self._udp.transport is None:
            raise RuntimeError("the bot has not done IP discovery")
        self._udp.transport.sendto(datagram, self.bot.address)

    # --- websocket ----------------------------------------------------------------------------

    def to_bot(self, op: int, data: Any) -> None:
        """Sends a message to the bot; sequenced ones are kept for replay after a resume."""
        if op in _UNSEQUENCED:
            raw: str | bytes = json.dumps({"op": op, "d": data})
        else:
            self.bot.seq += 1
            if isinstance(data, bytes):
                raw = struct.pack(">HB", self.bot.seq & 0xFFFF, op) + data
            else:
                raw = json.dumps({"op": op, "d": data, "seq": self.bot.seq})
            self.bot.sent.append((self.bot.seq, raw))
        if self.bot.outbox is not None:
            self.bot.outbox.put_nowait(raw)

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        if request.query.get("v") != "8":
            raise web.HTTPBadRequest(text="voice gateway version 8 only")
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        if self.bot.ws is not None:
            await self.bot.ws.close()
        outbox: asyncio.Queue[str | bytes] = asyncio.Queue()
        self.bot.ws, self.bot.outbox, self.bot.transport = ws, outbox, request.transport
        writer = asyncio.create_task(self._write(ws, outbox))
        self.to_bot(HELLO, {"heartbeat_interval": self.heartbeat_interval_ms})
        try:
            async for message in ws:
                if message.type == WSMsgType.TEXT:
                    body = json.loads(message.data)
                    await self._on_json(ws, body["op"], body.get("d"))
                elif message.type == WSMsgType.BINARY:
                    self._on_binary(message.data[0], message.data[1:])
        finally:
            writer.cancel()
            if self.bot.ws is ws:
                self.bot.ws, self.bot.outbox, self.bot.transport = None, None, None
        return ws

    @staticmethod
    async def _write(ws: web.WebSocketResponse, outbox: asyncio.Queue[str | bytes]) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            while True:
                raw = await outbox.get()
                if isinstance(raw, bytes):
                    await ws.send_bytes(raw)
                else:
                    await ws.send_str(raw)

    async def _on_json(self, ws: web.WebSocketResponse, op: int, data: Any) -> None:
        if op == IDENTIFY:
            await self._identify(ws, data)
        elif op == RESUME:
            await self._resume(ws, data)
        elif op == HEARTBEAT:
            self.seq_acks.append(int(data["seq_ack"]))
            self.to_bot(HEARTBEAT_ACK, {"t": data["t"]})
        elif op == SELECT_PROTOCOL:
            await self._select_protocol(ws, data)
        elif op == SPEAKING:
            self.bot_speaking.append((time.perf_counter(), int(data["speaking"])))
        elif op == TRANSITION_READY:
            self._ready(self.bot.user_id, int(data["transition_id"]))
        elif op == INVALID_COMMIT_WELCOME:
            self.invalid.append(int(data["transition_id"]))
            self._depart(self.bot.user_id)

    async def _identify(self, ws: web.WebSocketResponse, data: dict[str, Any]) -> None:
        if str(data["server_id"]) != str(self.guild_id) or data["token"] != self.token:
            await ws.close(code=4004)
            return
        if self.dave and int(data.get("max_dave_protocol_version", 0)) < 1:
            await ws.close(code=4017)
            return
        self.identifies += 1
        if self.bot.user_id and self.dave:
            self._depart(self.bot.user_id)
        self.bot.user_id = int(data["user_id"])
        self.bot.session_id = str(data["session_id"])
        self.bot.ssrc = next(self._ssrcs)
        self.bot.key, self.bot.address, self.bot.sent = None, None, []
        self.to_bot(
            READY,
            {"ssrc": self.bot.ssrc, "ip": "127.0.0.1", "port": self.udp_port, "modes": self.modes},
        )

    async def _resume(self, ws: web.WebSocketResponse, data: dict[str, Any]) -> None:
        if data["token"] != self.token or data["session_id"] != self.bot.session_id:
            await ws.close(code=4006)
            return
        self.resumes += 1
        seq_ack = int(data["seq_ack"])
        self.to_bot(RESUMED, None)
        for seq, raw in self.bot.sent:
            if seq > seq_ack and self.bot.outbox is not None:
                self.bot.outbox.put_nowait(raw)

    async def _select_protocol(self, ws: web.WebSocketResponse, data: dict[str, Any]) -> None:
        mode = data["data"]["mode"]
        if mode not in self.modes:
            await ws.close(code=4016)
            return
        self.bot.mode, self.bot.key, self.bot.nonce = mode, os.urandom(32), 0
        self.to_bot(
            SESSION_DESCRIPTION,
            {
                "mode": mode,
                "secret_key": list(self.bot.key),
                "dave_protocol_version": 1 if self.dave else 0,
                "audio_codec": "opus",
            },
        )
        if self.members:
            self.to_bot(CLIENTS_CONNECT, {"user_ids": [str(user) for user in self.members]})
            for member in self.members.values():
                member.announce()
        if self.dave:
            self.to_bot(EXTERNAL_SENDER, self._sender.package)

    def _on_binary(self, op: int, payload: bytes) -> None:
        if op == KEY_PACKAGE:
            self._key_packages[self.bot.user_id] = payload
            self._propose()
        elif op == COMMIT_WELCOME:
            self._commit_welcome(self.bot.user_id, payload)

    # --- DAVE: the delivery service -----------------------------------------------------------

    def _present(self) -> set[int]:
        return set(self.members) | ({self.bot.user_id} if self.bot.user_id else set())

    def _live(self) -> dict[int, int]:
        """Leaves whose member is still in the call, leaf index to user."""
        return {leaf: user for leaf, user in self._leaves.items() if leaf not in self._departed}

    def _depart(self, user_id: int) -> None:
        """A participant's leaf is to be removed (they left, or start over)."""
        self._key_packages.pop(user_id, None)
        self._departed.update(leaf for leaf, user in self._live().items() if user == user_id)
        self._propose()

    def _deliver(self, user_id: int, op: int, payload: bytes) -> None:
        if user_id == self.bot.user_id:
            self.to_bot(op, payload)
            return
        member = self.members.get(user_id)
        if member is not None:
            loop = asyncio.get_running_loop()
            loop.call_soon(self._member_receives, member, op, payload, self._epoch)

    def _member_receives(
        self, member: FakeMember, op: int, payload: bytes, epoch: int | None
    ) -> None:
        if member.user_id not in self.members:
            return
        known = self._present()
        try:
            if op == PROPOSALS:
                result = member.mls.process_proposals(payload, known)
                if result is not None:
                    asyncio.get_running_loop().call_later(
                        self.member_commit_delay, self._commit_welcome, member.user_id, result
                    )
                return
            transition = struct.unpack_from(">H", payload)[0]
            if op == ANNOUNCE_COMMIT:
                member.mls.process_commit(payload[2:], transition)
            else:
                member.mls.process_welcome(payload[2:], known, transition)
        except Exception as exc:  # a member that fails is what the test looks at
            member.errors.append(repr(exc))
            return
        member.epoch = epoch
        if transition:
            self._ready(member.user_id, transition)

    def _propose(self) -> None:
        """Proposes what the group lacks: adds for new key packages, removes for departures."""
        if self._transition is not None:
            return
        live = self._live()
        if self._epoch is not None and not live:
            self._epoch, self._leaves, self._departed, self._proposed = None, {}, set(), {}
        if self._epoch is None:
            self._propose_new_group()
            return
        outstanding = set(self._proposed.values())
        bodies = [
            (("remove", leaf), self._sender.remove(leaf))
            for leaf in sorted(self._departed)
            if ("remove", leaf) not in outstanding
        ] + [
            (("add", user), self._sender.add(kp))
            for user, kp in self._key_packages.items()
            if user not in live.values() and ("add", user) not in outstanding
        ]
        if not bodies:
            return
        messages = []
        for meaning, body in bodies:
            message = self._sender.proposal(self._group_id, self._epoch, body)
            self._proposed[_proposal_ref(message)] = meaning
            messages.append(message)
        for user in live.values():
            self._deliver(user, PROPOSALS, b"\x00" + mls_vector(b"".join(messages)))

    def _propose_new_group(self) -> None:
        # No group yet: each participant creates one and is proposed all the others.
        if self._proposed or len(self._key_packages) < 2:
            return
        messages = {
            user: self._sender.proposal(self._group_id, 0, self._sender.add(kp))
            for user, kp in self._key_packages.items()
        }
        for user, message in messages.items():
            self._proposed[_proposal_ref(message)] = ("add", user)
        for user in messages:
            others = b"".join(m for u, m in messages.items() if u != user)
            self._deliver(user, PROPOSALS, b"\x00" + mls_vector(others))

    def _commit_welcome(self, sender: int, payload: bytes) -> None:
        """The first valid commit for the current epoch wins; later ones lost the race."""
        commit, welcome = _split_commit_welcome(payload)
        creating = self._epoch is None
        if commit.epoch != (0 if creating else self._epoch) or self._transition is not None:
            return
        before = [sender] if creating else list(self._live().values())
        leaves = {0: sender} if creating else dict(self._leaves)
        meanings = [self._proposed.get(ref, ("", 0)) for ref in commit.refs]
        # RFC 9420 applies removes before adds; an add takes the leftmost free leaf.
        for kind, leaf in meanings:
            if kind == "remove":
                leaves.pop(leaf, None)
                self._departed.discard(leaf)
        added = [user for kind, user in meanings if kind == "add"]
        for user in added:
            leaves[next(i for i in range(len(leaves) + 1) if i not in leaves)] = user
            self._key_packages.pop(user, None)
        self._leaves, self._epoch, self._proposed = leaves, commit.epoch + 1, {}
        self.commits.append((sender, self._epoch))
        transition = 0 if creating else self._next_transition
        if not creating:
            self._next_transition += 1
        recipients = [user for user in before if user in self._live().values()]
        for user in recipients:
            self._deliver(user, ANNOUNCE_COMMIT, struct.pack(">H", transition) + commit.message)
        for user in added:
            self._deliver(user, WELCOME, struct.pack(">H", transition) + (welcome or b""))
        if transition:
            self._transition = (transition, set(recipients + added), recipients + added)
        else:
            self._propose()

    def _ready(self, user_id: int, transition: int) -> None:
        if self._transition is None or self._transition[0] != transition:
            return
        self._transition[1].discard(user_id)
        if self._transition[1]:
            return
        if self.hold_transitions:
            self.held = transition
            return
        self._execute()

    def release_transition(self) -> None:
        """Executes the transition held back by ``hold_transitions``."""
        self.hold_transitions = False
        if self.held is not None:
            self.held = None
            self._execute()

    def _execute(self) -> None:
        """Op 22 to everyone in the transition: each switches its own sending key now."""
        assert self._transition is not None
        transition, _, participants = self._transition
        self.executed.append(transition)
        for user in participants:
            member = self.members.get(user)
            if member is not None:
                member.mls.execute(transition)
        if self.bot.user_id in participants:
            self.to_bot(EXECUTE_TRANSITION, {"transition_id": transition})
        self._transition = None
        self._propose()

    # --- UDP ----------------------------------------------------------------------------------

    def udp_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) == 74 and data[:2] == b"\x00\x01":
            self.bot.address = addr
            ip = addr[0].encode().ljust(64, b"\0")
            answer = struct.pack(
                ">HHI64sH", 2, 70, struct.unpack_from(">I", data, 4)[0], ip, addr[1]
            )
            self._udp.transport.sendto(answer, addr)  # type: ignore[union-attr]
            return
        if self.bot.key is None:
            return
        sequence, timestamp, ssrc, frame = open_rtp(self.bot.mode, self.bot.key, data)
        if ssrc != self.bot.ssrc:
            return
        for member in self.members.values():
            if member.listening:
                member.hear(self.bot.user_id, sequence, timestamp, frame)


def self_signed_tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A certificate for 127.0.0.1: the server's TLS context, and a client's that trusts it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory() as folder:
        cert_file, key_file = Path(folder, "cert.pem"), Path(folder, "key.pem")
        cert_file.write_bytes(cert_pem)
        key_file.write_bytes(key_pem)
        server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cadata=cert_pem.decode())
    return server, client
