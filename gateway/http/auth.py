"""Who is calling: a service with BFF_API_KEY, or a person with a JWT signed by JWT_SECRET.

A service key may act for any user; a person's token (HS256, its ``sub`` the user id) may only
chat as, and read the history of, that user. With neither secret set the API is open, and so it
refuses to listen anywhere but on loopback.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass

import jwt
from fastapi import HTTPException, Request

__all__ = ["Authenticator", "Principal", "is_loopback"]


@dataclass(frozen=True)
class Principal:
    """The caller: a service (any user) or one person."""

    user: str | None  # None: a service, or anyone on an open loopback API

    def may_act_as(self, user: str) -> bool:
        return self.user is None or self.user == user


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(
        401, {"error": "unauthorized", "message": message}, headers={"WWW-Authenticate": "Bearer"}
    )


class Authenticator:
    """Checks each request's credentials against the configured secrets."""

    def __init__(self, *, api_key: str = "", jwt_secret: str = "") -> None:
        self.api_key, self.jwt_secret = api_key, jwt_secret

    @property
    def open(self) -> bool:
        return not self.api_key and not self.jwt_secret

    def __call__(self, request: Request) -> Principal:
        if self.open:
            return Principal(user=None)
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        key = request.headers.get("x-api-key", "") or token
        if self.api_key and key and hmac.compare_digest(key.encode(), self.api_key.encode()):
            return Principal(user=None)
        if self.jwt_secret and token:
            try:
                claims = jwt.decode(
                    token, self.jwt_secret, algorithms=["HS256"], options={"require": ["sub"]}
                )
            except jwt.PyJWTError as exc:
                raise _unauthorized(f"invalid token: {exc}") from None
            return Principal(user=str(claims["sub"]))
        raise _unauthorized("send a service key (X-API-Key or Bearer) or a user's bearer token")
