"""Transport encryption of RTP: ``aead_aes256_gcm_rtpsize`` and ``aead_xchacha20_poly1305_rtpsize``.

Both modes authenticate the clear part of the header (fixed header, CSRCs, extension header)
as additional data and encrypt the rest: the extension's body and the payload. The nonce is a
32-bit counter that the sender increments per packet and appends, big-endian, after the tag; it
fills the first 4 bytes of the cipher's nonce, the rest being zero.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

from .rtp import MalformedPacket, RtpHeader

__all__ = ["TransportCipher"]

_TAG = 16
_NONCE_TRAILER = 4


class TransportCipher:
    """Seals Libra's packets and opens received ones with the key from the session description."""

    def __init__(self, mode: str, secret_key: bytes) -> None:
        if len(secret_key) != 32:
            raise ValueError("the voice secret key has 32 bytes")
        if mode == "aead_aes256_gcm_rtpsize":
            self._aes = AESGCM(secret_key)
            self._nonce_size = 12
        elif mode == "aead_xchacha20_poly1305_rtpsize":
            self._aes = None
            self._nonce_size = 24
        else:
            raise ValueError(f"unsupported encryption mode {mode!r}")
        self.mode = mode
        self._key = secret_key
        self._counter = 0

    def seal(self, header: bytes, payload: bytes) -> bytes:
        """Returns the packet: header, ciphertext with tag, then the 4-byte nonce counter."""
        self._counter = (self._counter + 1) & 0xFFFFFFFF
        trailer = struct.pack(">I", self._counter)
        nonce = trailer + bytes(self._nonce_size - _NONCE_TRAILER)
        if self._aes is not None:
            sealed = self._aes.encrypt(nonce, payload, header)
        else:
            sealed = crypto_aead_xchacha20poly1305_ietf_encrypt(payload, header, nonce, self._key)
        return header + sealed + trailer

    def open(self, packet: bytes, header: RtpHeader) -> bytes:
        """Returns the payload of a received packet, its extension body stripped.

        Raises MalformedPacket("truncated") when the packet cannot hold what its header
        announces, and MalformedPacket("decrypt_failed") when authentication fails.
        """
        end = len(packet) - _NONCE_TRAILER
        if end - header.clear_size < _TAG + header.extension_size:
            raise MalformedPacket("truncated")
        nonce = packet[end:] + bytes(self._nonce_size - _NONCE_TRAILER)
        aad = packet[: header.clear_size]
        sealed = packet[header.clear_size : end]
        try:
            if self._aes is not None:
                plain = self._aes.decrypt(nonce, sealed, aad)
            else:
                plain = crypto_aead_xchacha20poly1305_ietf_decrypt(sealed, aad, nonce, self._key)
        except (InvalidTag, CryptoError):
            raise MalformedPacket("decrypt_failed") from None
        return plain[header.extension_size :]
