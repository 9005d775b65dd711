"""Who is calling: a service with BFF_API_KEY, or a person with a JWT signed by JWT_SECRET.

A service key may act for any user; a person's token (HS256, its ``sub`` the user id) may only
chat as, and read the history of, that user. Users named here are HTTP users (``alice`` is
``http:alice`` in the log); only a service may read the history of another platform's person, by
naming them in full (``discord:123``). With neither secret set the API is open, and so it
refuses to listen anywhere but on loopback.

A token must expire (``exp``: one that never does is refused), and when ``JWT_AUDIENCE`` /
``JWT_ISSUER`` are set its ``aud`` / ``iss`` must match.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass

import jwt
from fastapi import HTTPException
from starlette.requests import HTTPConnection

from libra.contracts import PLATFORMS, platform_of, user_id

from .inputs import id_problem

__all__ = ["Authenticator", "Principal", "is_loopback"]


@dataclass(frozen=True)
class Principal:
    """The caller: a service (any user) or one person."""

    user: str | None  # None: a service, or anyone on an open loopback API

    def may_act_as(self, user: str) -> bool:
        return self.user is None or self.user == user

    def reads_history_of(self, user: str) -> str:
        """The person whose history a request for ``user`` reads: ``http:<user>``, or, for a
        service, any platform's person named in full (``discord:123``)."""
        if self.user is None and platform_of(user) in PLATFORMS:
            return user
        return user_id("http", user)


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

    def __init__(
        self, *, api_key: str = "", jwt_secret: str = "", audience: str = "", issuer: str = ""
    ) -> None:
        self.api_key, self.jwt_secret = api_key, jwt_secret
        self.audience, self.issuer = audience, issuer

    @property
    def open(self) -> bool:
        return not self.api_key and not self.jwt_secret

    def __call__(self, request: HTTPConnection) -> Principal:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        return self._check(request.headers.get("x-api-key", "") or token, token)

    def from_token(self, token: str) -> Principal:
        """The caller a ``?token=`` names (a service key or a user's token): what a browser's
        WebSocket can send, as it cannot set headers."""
        return self._check(token, token)

    def _check(self, key: str, token: str) -> Principal:
        if self.open:
            return Principal(user=None)
        if self.api_key and key and hmac.compare_digest(key.encode(), self.api_key.encode()):
            return Principal(user=None)
        if self.jwt_secret and token:
            return Principal(user=self._person(token))
        raise _unauthorized("send a service key (X-API-Key or Bearer) or a user's bearer token")

    def _person(self, token: str) -> str:
        """The user a token names; it must be signed with the secret, unexpired, and for this
        API when ``JWT_AUDIENCE`` / ``JWT_ISSUER`` are set."""
        required = [
            "sub",
            "exp",
            *(["aud"] if self.audience else []),
            *(["iss"] if self.issuer else []),
        ]
        try:
            claims = jwt.decode(
                token,
                self.jwt_secret,
                algorithms=["HS256"],
                audience=self.audience or None,
                issuer=self.issuer or None,
                options={"require": required},
            )
        except jwt.PyJWTError as exc:
            raise _unauthorized(_token_problem(exc)) from None
        if (problem := id_problem(claims["sub"])) is not None:
            raise _unauthorized(f"the token's subject (sub) {problem}")
        return claims["sub"]


# PyJWT's errors in Libra's words, subclasses before their bases.
_TOKEN_PROBLEMS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "the token has expired"),
    (jwt.ImmatureSignatureError, "the token is not valid yet (nbf or iat is in the future)"),
    (jwt.InvalidAudienceError, "the token is not for this API (its audience, aud, is wrong)"),
    (jwt.InvalidIssuerError, "the token was not issued by the expected issuer (iss)"),
    (jwt.InvalidSignatureError, "the token's signature does not match JWT_SECRET"),
    (jwt.InvalidAlgorithmError, "the token must be signed with HS256"),
    (jwt.exceptions.InvalidSubjectError, "the token's subject (sub) must be a string"),
    (jwt.DecodeError, "the token is not a well-formed JWT"),
)


def _token_problem(exc: jwt.PyJWTError) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"the token has no {exc.claim!r} claim; it needs sub and exp"
    for kind, problem in _TOKEN_PROBLEMS:
        if isinstance(exc, kind):
            return problem
    return "the token is not valid"
