"""The user records in the database: who may sign in, with which role, and which models they may use.

A user has two handles. `id`, the row id, names them in the admin API and in the tables that belong to them
(keys, uploads); `identity`, 128 random bits, is what tokens name. Neither is ever given to anyone else
(issue 9, item 2; db.models).

Passwords reach the store already hashed: the routes hash through `auth.passwords.PasswordHasher`, which
waits for a hashing slot on the event loop rather than in a worker thread. Only `create` hashes by itself, for
synchronous callers that add someone once (tests).

Every method blocks: from async code, call it through `Database.run`. Every change that ends or narrows what
a person's credentials may do tells `on_change`, so that the authentication cache (auth.cache) forgets it at
once.
"""

from collections.abc import Callable
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from auth.passwords import hash_password
from core.storage_errors import Conflict
from db.engine import Database, affected
from db.models import ROLES, User

__all__ = ["ROLES", "User", "UserStore"]

# The lock taken by every change that could leave the gateway without an enabled admin (db.engine.serialize).
_ADMINS = "users: the last enabled admin"


class UserStore:
    def __init__(self, db: Database, on_change: Callable[[], None] = lambda: None) -> None:
        self._db = db
        self.on_change = on_change

    def get(self, user_id: int) -> User | None:
        with self._db.session() as session:
            return session.get(User, user_id)

    def get_by_identity(self, identity: str) -> User | None:
        """The user a token names (an indexed, unique column)."""
        with self._db.session() as session:
            return session.scalars(select(User).where(User.identity == identity)).one_or_none()

    def find_by_email(self, email: str) -> User | None:
        with self._db.session() as session:
            return session.scalars(select(User).where(self._db.same_email(User.email, email))).one_or_none()

    def all(self) -> list[User]:
        with self._db.session() as session:
            return list(session.scalars(select(User).order_by(User.id)))

    def has_admin(self) -> bool:
        with self._db.session() as session:
            return session.scalar(select(User.id).where(User.role == "admin").limit(1)) is not None

    def create(
        self, email: str, password: str, role: str, models: list[str] | tuple[str, ...] | None = None
    ) -> User:
        """Add a user with a password hashed here (blocking, about 0.1 s): for synchronous callers that
        hash once, such as tests. From async code, hash with `PasswordHasher` and call `create_with_hash`."""
        return self.create_with_hash(email, hash_password(password), role, models)

    def create_with_hash(
        self, email: str, password_hash: str, role: str, models: list[str] | tuple[str, ...] | None = None
    ) -> User:
        """Add a user. Conflict if the email is taken."""
        user = User(
            email=email,
            password_hash=password_hash,
            role=role,
            models=list(models) if models is not None else None,
        )
        try:
            with self._db.transaction() as session:
                session.add(user)
        except IntegrityError:
            raise Conflict(f"a user with the email {email} already exists") from None
        return user

    def update(
        self,
        user_id: int,
        *,
        role: str | None = None,
        models: list[str] | None = None,
        clear_models: bool = False,
        disabled: bool | None = None,
        password_hash: str | None = None,
        max_inflight: int | None = None,
        max_waiting: int | None = None,
        default_inflight: bool = False,
        default_waiting: bool = False,
        quota: dict[str, Any] | None = None,
        clear_quota: bool = False,
    ) -> User | None:
        """Change what is given, in one transaction; a new password hash also ends every token issued before.
        Refuses (Conflict) to leave the gateway without an enabled admin. `max_inflight`, `max_waiting`: the
        person's own caps in the fair queue (0: none); `default_...`: back to the settings'."""
        with self._db.transaction() as session:
            self._db.serialize(session, _ADMINS)
            user = session.get(User, user_id, with_for_update=True)
            if user is None:
                return None
            if role is not None:
                user.role = role
            if models is not None or clear_models:
                user.models = list(models) if models is not None else None
            if disabled is not None:
                user.disabled = disabled
            if password_hash is not None:
                user.password_hash = password_hash
                user.token_version += 1
            if max_inflight is not None or default_inflight:
                user.max_inflight = max_inflight
            if max_waiting is not None or default_waiting:
                user.max_waiting = max_waiting
            if quota is not None or clear_quota:
                user.quota = quota
            session.flush()
            _require_an_enabled_admin(session)
            self._db.announce_credentials_changed(session)
        self.on_change()
        return user

    def delete(self, user_id: int) -> bool:
        """Remove a user with their keys and upload records (ON DELETE CASCADE). Refuses (Conflict) to remove
        the last enabled admin."""
        with self._db.transaction() as session:
            self._db.serialize(session, _ADMINS)
            deleted = affected(session.execute(delete(User).where(User.id == user_id)))
            _require_an_enabled_admin(session)
            self._db.announce_credentials_changed(session)
        self.on_change()
        return bool(deleted)


def _require_an_enabled_admin(session: Session) -> None:
    """Raised inside the transaction, so the change that would lock everyone out is rolled back."""
    enabled_admin = select(User.id).where(User.role == "admin", User.disabled.is_(False)).limit(1)
    if session.scalar(enabled_admin) is None:
        raise Conflict("the gateway must keep at least one enabled admin")
