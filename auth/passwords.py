"""Passwords: the one rule every password meets, and hashing with Argon2 (through libpass, the maintained fork
of passlib).

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

from auth.common_passwords import is_common_password
from core.text import is_valid_text

MIN_PASSWORD_LENGTH = 8
# In characters: 1024 of them take at most 4096 bytes in UTF-8, within passlib's own limit (4096), past which
# it raises PasswordSizeError, which was a 500 on /admin/users and /me/password (issue 9, item 7).
MAX_PASSWORD_LENGTH = 1024

_context = CryptContext(schemes=["argon2"])

MAX_CONCURRENT_HASHES = 4


def password_problem(password: str) -> str | None:
    """Why a password may not be used, or None if it may. The one rule: the admin API, `/me/password`,
    `manage.py` and ADMIN_PASSWORD all ask it."""
    if not is_valid_text(password):
        return "must be valid text (it holds a lone surrogate, such as \\ud800)"
    if len(password) < MIN_PASSWORD_LENGTH:
        return f"must be at least {MIN_PASSWORD_LENGTH} characters"
    if len(password) > MAX_PASSWORD_LENGTH:
        return f"must be at most {MAX_PASSWORD_LENGTH} characters"
    if is_common_password(password):
        return (
            "is too common (one of the 10,000 most common passwords, "
            "perhaps with a few digits or symbols added)"
        )
    return None


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
