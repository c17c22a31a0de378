"""API keys for scripts: long-lived credentials accepted wherever a JWT is.

A key reads `ogw_<id part>_<secret>`. The recognisable prefix lets a leaked key be spotted (and a secret
scanner be taught it); its first 12 characters, shown in lists, tell keys apart. Only a SHA-256 hash of the
whole key is stored. Keys carry 256 bits of randomness, so a fast hash is the right tool here: unlike a
password, a key can't be guessed from a dictionary.
"""

import hashlib
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from core.storage_errors import NotFound
from db.engine import Database, affected
from db.models import INTERACTIVE, ApiKey, User, stamp

__all__ = ["ApiKey", "ApiKeyStore", "looks_like_api_key"]

KEY_PREFIX = "ogw_"
SHOWN_PREFIX_LENGTH = 12
# last_used_at is informative: writing it once a minute per key keeps authentication from being a write.
TOUCH_INTERVAL_SECONDS = 60.0


def looks_like_api_key(token: str) -> bool:
    return token.startswith(KEY_PREFIX)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeyStore:
    """Every method blocks: from async code, call it through `Database.run`. A revocation tells `on_change`
    (the authentication cache forgets the key at once)."""

    def __init__(self, db: Database, on_change: Callable[[], None] = lambda: None) -> None:
        self._db = db
        self.on_change = on_change
        # By key id, which is never given to another key (db.models): a revoked key's entry can't hold back
        # the recording of a newer key's use.
        self._touched: dict[int, float] = {}

    def create(
        self, user_id: int, name: str, expires_in_days: int | None = None, priority: str = INTERACTIVE
    ) -> tuple[ApiKey, str]:
        """A new key for the user: its record, and the full key, which is never available again. NotFound if
        the user is gone. A batch key's requests wait behind everyone's interactive ones (fleet.scheduler)."""
        key = f"{KEY_PREFIX}{secrets.token_urlsafe(6)}_{secrets.token_urlsafe(32)}"
        expires_at = (
            stamp(datetime.now(UTC) + timedelta(days=expires_in_days))
            if expires_in_days is not None
            else None
        )
        record = ApiKey(
            user_id=user_id,
            name=name,
            prefix=key[:SHOWN_PREFIX_LENGTH],
            key_hash=key_hash(key),
            expires_at=expires_at,
            priority=priority,
        )
        try:
            with self._db.transaction() as session:
                session.add(record)
        except IntegrityError:
            # The account was removed after its request was authenticated (the key can't name a missing user).
            raise NotFound("this account no longer exists") from None
        return record, key

    def find(self, key: str) -> ApiKey | None:
        with self._db.session() as session:
            return session.scalars(select(ApiKey).where(ApiKey.key_hash == key_hash(key))).one_or_none()

    def find_with_owner(self, key: str) -> tuple[ApiKey, User] | None:
        """The key's record and its owner, in one round trip (authentication)."""
        query = (
            select(ApiKey, User).join(User, User.id == ApiKey.user_id).where(ApiKey.key_hash == key_hash(key))
        )
        with self._db.session() as session:
            row = session.execute(query).one_or_none()
        return (row[0], row[1]) if row is not None else None

    def of_user(self, user_id: int) -> list[ApiKey]:
        with self._db.session() as session:
            return list(session.scalars(select(ApiKey).where(ApiKey.user_id == user_id).order_by(ApiKey.id)))

    def all(self, key_id: int | None = None) -> list[tuple[ApiKey, str]]:
        """Every key (or the one `key_id`), with its owner's email."""
        query = select(ApiKey, User.email).join(User, User.id == ApiKey.user_id).order_by(ApiKey.id)
        if key_id is not None:
            query = query.where(ApiKey.id == key_id)
        with self._db.session() as session:
            return [(key, email) for key, email in session.execute(query)]

    def revoke(self, key_id: int, user_id: int | None = None) -> bool:
        """Delete a key; with `user_id`, only if it is that user's."""
        statement = delete(ApiKey).where(ApiKey.id == key_id)
        if user_id is not None:
            statement = statement.where(ApiKey.user_id == user_id)
        with self._db.transaction() as session:
            deleted = affected(session.execute(statement))
            self._db.announce_credentials_changed(session)
        self._touched.pop(key_id, None)
        self.on_change()
        return bool(deleted)

    def set_quota(self, key_id: int, quota: dict[str, Any] | None) -> ApiKey | None:
        """Give a key its own quota (None: unlimited); None when there is no such key."""
        with self._db.transaction() as session:
            key = session.get(ApiKey, key_id, with_for_update=True)
            if key is None:
                return None
            key.quota = quota
            self._db.announce_credentials_changed(session)  # the quota travels with the cached key
        self.on_change()
        return key

    def needs_touch(self, key_id: int) -> bool:
        now = time.monotonic()
        if now - self._touched.get(key_id, float("-inf")) < TOUCH_INTERVAL_SECONDS:
            return False
        self._touched[key_id] = now
        return True

    def touch(self, key_id: int) -> None:
        """Record that the key was used (blocking: run it off the event loop)."""
        with self._db.transaction() as session:
            session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=stamp()))
