"""The user records in the database."""

import sqlite3
from dataclasses import dataclass

from auth.passwords import hash_password
from core.database import Database


@dataclass(frozen=True)
class User:
    id: int
    email: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class StoredUser:
    user: User
    password_hash: str


def _user_from(row: sqlite3.Row) -> User:
    return User(id=row["id"], email=row["email"], role=row["role"])


class UserStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def get(self, user_id: int) -> User | None:
        row = self._db.fetch_one("SELECT id, email, role FROM users WHERE id = ?", (user_id,))
        return _user_from(row) if row else None

    def find_by_email(self, email: str) -> StoredUser | None:
        row = self._db.fetch_one("SELECT id, email, role, password_hash FROM users WHERE email = ?", (email,))
        return StoredUser(_user_from(row), row["password_hash"]) if row else None

    def has_admin(self) -> bool:
        return self._db.fetch_one("SELECT 1 FROM users WHERE role = 'admin' LIMIT 1") is not None

    def create(self, email: str, password: str, role: str) -> User:
        password_hash = hash_password(password)
        with self._db.transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO users (email, password_hash, role) VALUES (?, ?, ?)",
                (email, password_hash, role),
            )
        return User(id=cursor.lastrowid, email=email, role=role)
