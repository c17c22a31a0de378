"""Passwords: hashing with Argon2 (through libpass, the maintained fork of passlib). The rule every password
meets is `core.password_rule`'s.

Argon2 has no 72-byte limit, unlike bcrypt, and is what current guidance prefers. Each hash or check takes
about a tenth of a second of CPU and holds 64 MiB while it runs, so the gateway runs at most
MAX_CONCURRENT_HASHES at once (found by the soak: a burst of logins briefly took 250 MB). `PasswordHasher`
makes the others wait for their turn on the event loop, where waiting costs nothing, and only then hands the
hash to a worker thread: a queue of logins waiting in worker threads held every thread of the pool, and an
admin's `GET /keys`, which needs one, waited 8.5 s (issue 9, item 4).

`hash_password` and `verify_password` are the blocking forms, for the synchronous callers that hash once
(`manage.py`, the first start's admin).
"""

import asyncio

from anyio import to_thread
from passlib.context import CryptContext

from core.password_rule import MAX_PASSWORD_LENGTH

_context = CryptContext(schemes=["argon2"])

MAX_CONCURRENT_HASHES = 4


def hash_password(password: str) -> str:
    """Blocking: about a tenth of a second of CPU."""
    return _context.hash(password)


def verify_password(password: str, password_hash: str) -> bool:
    """Blocking. A password longer than any the rule allows can't be anyone's: it is simply wrong (passlib
    would raise for it)."""
    if len(password) > MAX_PASSWORD_LENGTH:
        return False
    return _context.verify(password, password_hash)


class PasswordHasher:
    """Hashing and checking for async code: at most `max_concurrent` at once, the rest waiting on the event
    loop (not in a worker thread each). One per process; it belongs to the event loop that first uses it."""

    def __init__(self, max_concurrent: int = MAX_CONCURRENT_HASHES) -> None:
        self._slots = asyncio.Semaphore(max_concurrent)
        self._dummy_hash: str | None = None

    async def hash(self, password: str) -> str:
        async with self._slots:
            return await to_thread.run_sync(hash_password, password)

    async def verify(self, password: str, password_hash: str) -> bool:
        async with self._slots:
            return await to_thread.run_sync(verify_password, password, password_hash)

    async def spend_verification_time(self, password: str) -> None:
        """Do the work of a failed check, so an unknown email answers as slowly as a wrong password."""
        if self._dummy_hash is None:
            self._dummy_hash = await self.hash("not a real password: only spends the time a real check would")
        await self.verify(password, self._dummy_hash)
