"""API keys for scripts: long-lived credentials accepted wherever a JWT is.

A key reads `ogw_<id part>_<secret>`. The recognisable prefix lets a leaked key be spotted (and a secret
scanner be taught it); its first 12 characters, shown in lists, tell keys apart. Only a SHA-256 hash of the
whole key is stored. Keys carry 256 bits of randomness, so a fast hash is the right tool here: unlike a
password, a key can't be guessed from a dictionary.
"""

import hashlib
import secrets
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from core.database import Database
from core.storage_errors import NotFound

KEY_PREFIX = "ogw_"
SHOWN_PREFIX_LENGTH = 12
# last_used_at is informative: writing it once a minute per key keeps authentication from being a write.
TOUCH_INTERVAL_SECONDS = 60.0


@dataclass(frozen=True)
class ApiKey:
    id: int
    user_id: int
    name: str
    prefix: str
    created_at: str
    last_used_at: str | None
    expires_at: str | None

    def is_expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and _parse(self.expires_at) <= (now or datetime.now(UTC))

    def public(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "prefix": self.prefix,
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
            "expires_at": self.expires_at,
        }


def looks_like_api_key(token: str) -> bool:
    return token.startswith(KEY_PREFIX)


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _timestamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse(stamp: str) -> datetime:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def _key_from(row: sqlite3.Row) -> ApiKey:
    return ApiKey(
        id=row["id"],
        user_id=row["user_id"],
        name=row["name"],
        prefix=row["prefix"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        expires_at=row["expires_at"],
    )


_COLUMNS = "id, user_id, name, prefix, created_at, last_used_at, expires_at"


class ApiKeyStore:
    def __init__(self, db: Database) -> None:
        self._db = db
        # By key id, which is never given to another key (AUTOINCREMENT, core.database): a revoked key's entry
        # can't hold back the recording of a newer key's use.
        self._touched: dict[int, float] = {}

    def create(self, user_id: int, name: str, expires_in_days: int | None = None) -> tuple[ApiKey, str]:
        """A new key for the user: its record, and the full key, which is never available again."""
        key = f"{KEY_PREFIX}{secrets.token_urlsafe(6)}_{secrets.token_urlsafe(32)}"
        expires_at = (
            _timestamp(datetime.now(UTC) + timedelta(days=expires_in_days))
            if expires_in_days is not None
            else None
        )
        try:
            with self._db.transaction() as conn:
                cursor = conn.execute(
                    "INSERT INTO api_keys (user_id, name, prefix, key_hash, expires_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (user_id, name, key[:SHOWN_PREFIX_LENGTH], _hash(key), expires_at),
                )
        except sqlite3.IntegrityError:
            # The account was removed after its request was authenticated (the key can't name a missing user).
            raise NotFound("this account no longer exists") from None
        row = self._db.fetch_one(f"SELECT {_COLUMNS} FROM api_keys WHERE id = ?", (cursor.lastrowid,))
        assert row is not None  # just written, in this process
        return _key_from(row), key

    def find(self, key: str) -> ApiKey | None:
        row = self._db.fetch_one(f"SELECT {_COLUMNS} FROM api_keys WHERE key_hash = ?", (_hash(key),))
        return _key_from(row) if row else None

    def of_user(self, user_id: int) -> list[ApiKey]:
        rows = self._db.fetch_all(
            f"SELECT {_COLUMNS} FROM api_keys WHERE user_id = ? ORDER BY id", (user_id,)
        )
        return [_key_from(row) for row in rows]

    def all(self) -> list[tuple[ApiKey, str]]:
        """Every key, with its owner's email."""
        rows = self._db.fetch_all(
            f"SELECT {', '.join('k.' + c for c in _COLUMNS.split(', '))}, u.email"
            " FROM api_keys k JOIN users u ON u.id = k.user_id ORDER BY k.id"
        )
        return [(_key_from(row), row["email"]) for row in rows]

    def revoke(self, key_id: int, user_id: int | None = None) -> bool:
        """Delete a key; with `user_id`, only if it is that user's."""
        with self._db.transaction() as conn:
            if user_id is None:
                deleted = conn.execute("DELETE FROM api_keys WHERE id = ?", (key_id,)).rowcount
            else:
                deleted = conn.execute(
                    "DELETE FROM api_keys WHERE id = ? AND user_id = ?", (key_id, user_id)
                ).rowcount
        self._touched.pop(key_id, None)
        return bool(deleted)

    def needs_touch(self, key_id: int) -> bool:
        now = time.monotonic()
        if now - self._touched.get(key_id, float("-inf")) < TOUCH_INTERVAL_SECONDS:
            return False
        self._touched[key_id] = now
        return True

    def touch(self, key_id: int) -> None:
        """Record that the key was used (blocking: run it off the event loop)."""
        with self._db.transaction() as conn:
            conn.execute(
                "UPDATE api_keys SET last_used_at = ? WHERE id = ?", (_timestamp(datetime.now(UTC)), key_id)
            )
