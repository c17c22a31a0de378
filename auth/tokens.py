"""Issuing and checking the gateway's JWTs.

The only module that imports python-jose: if the library has to be swapped, it is swapped here.
Decoding pins the algorithm (no "none", no key confusion) and requires `exp`, `iat` and `sub`
(python-jose accepts tokens without `exp` unless told otherwise).

`sub` is the user's random identity, never their row id: a row id could be handed to the next account
created, and with it a removed person's unexpired token (issue 9, item 2).
"""

import time
from dataclasses import dataclass

from jose import JWTError, jwt

ALGORITHM = "HS256"


class InvalidToken(Exception):
    pass


@dataclass(frozen=True)
class IssuedToken:
    access_token: str
    expires_in: int


@dataclass(frozen=True)
class TokenClaims:
    subject: str  # the user's identity (`auth.users.User.identity`)
    issued_at: int
    # The user's token version when issued; changing the password bumps it, which ends older tokens.
    version: int


# Scripts and pages send the same token request after request; checking its signature once is enough.
# The expiry is still checked on every use.
VERIFIED_CACHE_SIZE = 4096


class TokenSigner:
    def __init__(self, secret_key: str, lifetime_seconds: int) -> None:
        self._key = secret_key
        self._lifetime = lifetime_seconds
        self._verified: dict[str, tuple[TokenClaims, int]] = {}

    def issue(self, subject: str, version: int) -> IssuedToken:
        now = int(time.time())
        claims = {"sub": subject, "iat": now, "exp": now + self._lifetime, "ver": version}
        return IssuedToken(jwt.encode(claims, self._key, algorithm=ALGORITHM), self._lifetime)

    def verify(self, token: str) -> TokenClaims:
        cached = self._verified.get(token)
        if cached is not None:
            claims, expires_at = cached
            if time.time() < expires_at:
                return claims
            del self._verified[token]
            raise InvalidToken("token expired")
        claims, expires_at = self._decode(token)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            self._verified.clear()
        self._verified[token] = (claims, expires_at)
        return claims

    def _decode(self, token: str) -> tuple[TokenClaims, int]:
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[ALGORITHM],
                options={"require_exp": True, "require_iat": True, "require_sub": True},
            )
            version, subject = claims.get("ver"), claims["sub"]
            if not isinstance(version, int):
                raise InvalidToken("no token version")
            if not isinstance(subject, str):
                raise InvalidToken("the subject is not a string")
            return TokenClaims(subject, int(claims["iat"]), version), int(claims["exp"])
        except (JWTError, ValueError, TypeError) as exc:
            raise InvalidToken(str(exc)) from exc
