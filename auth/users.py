"""The user records in the database: who may sign in, with which role, and which models they may use.

A user has two handles. `id`, the row id, names them in the admin API and in the tables that belong to them
(keys, uploads); `identity`, 128 random bits given by the database, is what tokens name. Neither is ever
given to anyone else (issue 9, item 2): ids come from AUTOINCREMENT, and identities are random.

Passwords reach the store already hashed: the routes hash through `auth.passwords.PasswordHasher`, which
waits for a hashing slot on the event loop rather than in a worker thread. Only `create` hashes by itself, for
synchronous callers that add someone once (tests).
"""

import json
import sqlite3
from dataclasses import dataclass

from auth.passwords import hash_password
from core.database import Database
from core.storage_errors import Conflict

ROLES = ("admin", "user")


@dataclass(frozen=True)
class User:
    id: int
    identity: str
    email: str
    role: str
    disabled: bool = False
    models: tuple[str, ...] | None = None  # None: every model
    token_version: int = 0
    created_at: str = ""

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def public(self) -> dict:
        return {
            "id": self.id,
            "email": self.email,
            "role": self.role,
            "models": list(self.models) if self.models is not None else None,
            "disabled": self.disabled,
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class StoredUser:
    user: User
    password_hash: str


_COLUMNS = "id, identity, email, role, disabled, models, token_version, created_at"


def _user_from(row: sqlite3.Row) -> User:
    models = json.loads(row["models"]) if row["models"] is not None else None
    return User(
        id=row["id"],
        identity=row["identity"],
        email=row["email"],
        role=row["role"],
        disabled=bool(row["disabled"]),
        models=tuple(models) if models is not None else None,
        token_version=row["token_version"],
        created_at=row["created_at"],
    )


def _models_column(models: list[str] | tuple[str, ...] | None) -> str | None:
    return json.dumps(list(models)) if models is not None else None


class UserStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def get(self, user_id: int) -> User | None:
        row = self._db.fetch_one(f"SELECT {_COLUMNS} FROM users WHERE id = ?", (user_id,))
        return _user_from(row) if row else None

    def get_by_identity(self, identity: str) -> User | None:
        """The user a token names (an indexed, unique column)."""
        row = self._db.fetch_one(f"SELECT {_COLUMNS} FROM users WHERE identity = ?", (identity,))
        return _user_from(row) if row else None

    def find_by_email(self, email: str) -> StoredUser | None:
        row = self._db.fetch_one(f"SELECT {_COLUMNS}, password_hash FROM users WHERE email = ?", (email,))
        return StoredUser(_user_from(row), row["password_hash"]) if row else None

    def stored(self, user_id: int) -> StoredUser | None:
        """The user with their password hash, by id: the same person, even if their email was given to
        someone else meanwhile."""
        row = self._db.fetch_one(f"SELECT {_COLUMNS}, password_hash FROM users WHERE id = ?", (user_id,))
        return StoredUser(_user_from(row), row["password_hash"]) if row else None

    def all(self) -> list[User]:
        return [_user_from(row) for row in self._db.fetch_all(f"SELECT {_COLUMNS} FROM users ORDER BY id")]

    def has_admin(self) -> bool:
        return self._db.fetch_one("SELECT 1 FROM users WHERE role = 'admin' LIMIT 1") is not None

    def create(
        self, email: str, password: str, role: str, models: list[str] | tuple[str, ...] | None = None
    ) -> User:
        """Add a user with a password hashed here (blocking, about 0.1 s): for synchronous callers that
        hash once, such as tests. From async code, hash with `PasswordHasher` and call `create_with_hash`."""
        return self.create_with_hash(email, hash_password(password), role, models)

    def create_with_hash(
        self, email: str, password_hash: str, role: str, models: list[str] | tuple[str, ...] | None = None
    ) -> User:
        """Add a user (blocking). Conflict if the email is taken."""
        try:
            with self._db.transaction() as conn:
                cursor = conn.execute(
                    "INSERT INTO users (email, password_hash, role, models) VALUES (?, ?, ?, ?)",
                    (email, password_hash, role, _models_column(models)),
                )
        except sqlite3.IntegrityError:
            raise Conflict(f"a user with the email {email} already exists") from None
        assert cursor.lastrowid is not None  # an INSERT sets it
        created = self.get(cursor.lastrowid)
        assert created is not None
        return created

    def update(
        self,
        user_id: int,
        *,
        role: str | None = None,
        models: list[str] | None = None,
        clear_models: bool = False,
        disabled: bool | None = None,
        password_hash: str | None = None,
    ) -> User | None:
        """Change what is given, in one transaction (blocking); a new password hash also ends every token
        issued before. Refuses (Conflict) to leave the gateway without an enabled admin."""
        with self._db.transaction() as conn:
            if conn.execute("SELECT 1 FROM users WHERE id = ?", (user_id,)).fetchone() is None:
                return None
            if role is not None:
                conn.execute("UPDATE users SET role = ? WHERE id = ?", (role, user_id))
            if models is not None or clear_models:
                conn.execute("UPDATE users SET models = ? WHERE id = ?", (_models_column(models), user_id))
            if disabled is not None:
                conn.execute("UPDATE users SET disabled = ? WHERE id = ?", (int(disabled), user_id))
            if password_hash is not None:
                conn.execute(
                    "UPDATE users SET password_hash = ?, token_version = token_version + 1 WHERE id = ?",
                    (password_hash, user_id),
                )
            _require_an_enabled_admin(conn)
        return self.get(user_id)

    def delete(self, user_id: int) -> bool:
        """Remove a user with their keys and upload records. Refuses (Conflict) to remove the last enabled
        admin."""
        with self._db.transaction() as conn:
            deleted = conn.execute("DELETE FROM users WHERE id = ?", (user_id,)).rowcount
            _require_an_enabled_admin(conn)
        return bool(deleted)


def _require_an_enabled_admin(conn: sqlite3.Connection) -> None:
    """Raised inside the transaction, so the change that would lock everyone out is rolled back."""
    if conn.execute("SELECT 1 FROM users WHERE role = 'admin' AND disabled = 0 LIMIT 1").fetchone() is None:
        raise Conflict("the gateway must keep at least one enabled admin")
