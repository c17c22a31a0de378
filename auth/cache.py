"""Who a credential belongs to, remembered: authenticating a request costs no database round trip while the
answer is known (issue 11, item 3).

It maps a token's identity to its user, and an API key's hash to the key and its owner. Every change that
ends or narrows what credentials may do (a password change, a disable, a removal, a role or allow-list change,
a key revocation) forgets everything at once:
- made by this process: its stores say so as they commit (`forget_all`, their `on_change`);
- made by another process (`manage.py`, another worker or replica): `db.changes` notices it before the next
  lookup (SQLite's change counter, Postgres' LISTEN/NOTIFY).
Forgetting everything rather than the entries concerned can't miss one (a key whose owner was disabled), and
such changes are rare next to the requests they serve. Unknown credentials are never remembered, so guesses
can't fill the cache; it holds at most MAX_ENTRIES, each for at most ENTRY_SECONDS.

A lookup that was already reading the database when everything was forgotten does not store what it read
(`generation`): it may have read the state from before the change.
"""

import time
from typing import TypeVar

from db.changes import ChangeWatcher
from db.models import ApiKey, User

V = TypeVar("V")

MAX_ENTRIES = 10_000
ENTRY_SECONDS = 300.0


class CredentialCache:
    """Used from the event loop only (a change noticed by another thread is asked for, never pushed)."""

    def __init__(
        self, watcher: ChangeWatcher, max_entries: int = MAX_ENTRIES, entry_seconds: float = ENTRY_SECONDS
    ) -> None:
        self._watcher = watcher
        self._max_entries = max_entries
        self._entry_seconds = entry_seconds
        self._users: dict[str, tuple[float, User]] = {}
        self._keys: dict[str, tuple[float, tuple[ApiKey, User]]] = {}
        self.generation = 0

    def forget_all(self) -> None:
        self._users, self._keys = {}, {}
        self.generation += 1

    def user(self, identity: str) -> User | None:
        """The user a token's identity names, if known and unchanged."""
        self._forget_if_changed()
        return _fresh(self._users, identity)

    def key(self, hashed: str) -> tuple[ApiKey, User] | None:
        """The key with that hash and its owner, if known and unchanged."""
        self._forget_if_changed()
        return _fresh(self._keys, hashed)

    def remember_user(self, identity: str, user: User, generation: int) -> None:
        """Remember what was read from the database since `generation` was current."""
        if generation == self.generation:
            self._make_room()
            self._users[identity] = (time.monotonic() + self._entry_seconds, user)

    def remember_key(self, hashed: str, found: tuple[ApiKey, User], generation: int) -> None:
        if generation == self.generation:
            self._make_room()
            self._keys[hashed] = (time.monotonic() + self._entry_seconds, found)

    def _forget_if_changed(self) -> None:
        if self._watcher.changed():
            self.forget_all()

    def _make_room(self) -> None:
        if len(self._users) + len(self._keys) >= self._max_entries:
            self._users, self._keys = {}, {}


def _fresh(entries: dict[str, tuple[float, V]], name: str) -> V | None:
    entry = entries.get(name)
    if entry is None:
        return None
    stored_until, value = entry
    if time.monotonic() > stored_until:
        del entries[name]
        return None
    return value
