"""From an Authorization header to a user (and the API key it came with, if any): the one place that decides
who is calling.

Used by the credentials guard, the `CurrentUser` dependency and the relay endpoints alike. A credential is a
JWT from `/login` or an API key, sent as `Authorization: Bearer <credential>` (what the OpenAI SDKs send as
their api_key), or as the password of HTTP Basic (for clients that can only put credentials in a URL). A
token's user is found by the random identity it names (never a row id, which could have been given to someone
else: issue 9, item 2).

Who a credential belongs to comes from the cache (auth.cache) when it is known there, with no database round
trip; a disabled or removed user's credentials, a revoked key, a token from before a password change stop
working at once all the same, since every such change empties the cache.
"""

import base64
import binascii
import logging
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError

from auth.api_keys import ApiKey, ApiKeyStore, key_hash, looks_like_api_key
from auth.cache import CredentialCache
from auth.tokens import InvalidToken, TokenSigner
from auth.users import User, UserStore
from core.errors import Unauthorized
from core.storage_errors import StorageError
from db.engine import Database

logger = logging.getLogger("gateway.auth")

EXPECTED = "expected 'Authorization: Bearer <token>' (or HTTP Basic with the token as password)"


def token_from_header(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized("missing bearer token")
    scheme, _, credentials = authorization.partition(" ")
    credentials = credentials.strip()
    scheme = scheme.lower()
    if scheme == "bearer" and credentials:
        return credentials
    if scheme == "basic" and credentials:
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise Unauthorized(EXPECTED) from None
        _, colon, password = decoded.partition(":")
        if colon and password:
            return password
    raise Unauthorized(EXPECTED)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling, and with which API key (None: a token). The key's record comes from the same cache
    entry as its owner: knowing it costs nothing more."""

    user: User
    key: ApiKey | None = None


class Authenticator:
    def __init__(
        self,
        db: Database,
        signer: TokenSigner,
        users: UserStore,
        keys: ApiKeyStore,
        cache: CredentialCache,
    ) -> None:
        self._db = db
        self._signer = signer
        self._users = users
        self._keys = keys
        self._cache = cache

    async def authenticate(self, authorization: str | None) -> User:
        return (await self.identify(authorization)).user

    async def identify(self, authorization: str | None) -> Caller:
        """The caller, and the API key they came with, if they came with one."""
        credential = token_from_header(authorization)
        if looks_like_api_key(credential):
            caller: Caller | None = await self._key_caller(credential)
        else:
            user = await self._token_owner(credential)
            caller = Caller(user) if user is not None else None
        if caller is None or caller.user.disabled:
            raise Unauthorized("invalid or expired token")
        return caller

    async def _token_owner(self, token: str) -> User | None:
        try:
            claims = self._signer.verify(token)
        except InvalidToken:
            return None
        user = self._cache.user(claims.subject)
        if user is None:
            generation = self._cache.generation
            user = await self._db.run(self._users.get_by_identity, claims.subject)
            if user is not None:
                self._cache.remember_user(claims.subject, user, generation)
        if user is not None and user.token_version != claims.version:
            raise Unauthorized("this token was issued before a password change: sign in again")
        return user

    async def _key_caller(self, key: str) -> Caller:
        hashed = key_hash(key)
        found: tuple[ApiKey, User] | None = self._cache.key(hashed)
        if found is None:
            generation = self._cache.generation
            found = await self._db.run(self._keys.find_with_owner, key)
            if found is not None:
                self._cache.remember_key(hashed, found, generation)
        if found is None or found[0].is_expired():
            raise Unauthorized("invalid, expired or revoked API key")
        record, owner = found
        if self._keys.needs_touch(record.id):
            self._db.submit(self._touch, record.id)
        return Caller(owner, record)

    def _touch(self, key_id: int) -> None:
        try:
            self._keys.touch(key_id)
        except (SQLAlchemyError, StorageError):
            logger.warning("could not record the use of API key %s", key_id, exc_info=True)
