"""Passwords: the one rule every password meets, and hashing with Argon2 (through libpass, the maintained fork
of passlib).

Argon2 has no 72-byte limit, unlike bcrypt, and is what current guidance prefers. Each hash or check holds
64 MiB while it runs, and they run in a pool of up to 40 worker threads: at most MAX_CONCURRENT_HASHES run at
once (found by the soak: a burst of logins briefly took 250 MB), the rest wait their turn.
"""

import threading
from functools import cache

from passlib.context import CryptContext

MIN_PASSWORD_LENGTH = 8
# In characters: 1024 of them take at most 4096 bytes in UTF-8, within passlib's own limit (4096), past which
# it raises PasswordSizeError, which was a 500 on /admin/users and /me/password (issue 9, item 7).
MAX_PASSWORD_LENGTH = 1024
# Defaults published by this gateway's predecessors and the first guesses of anyone trying: never accepted.
WELL_KNOWN_PASSWORDS = frozenset(
    {
        "changeme",
        "password",
        "12345678",
        "123456789",
        "admin123",
        "adminadmin",
        "changeit",
        "letmein1",
        "ollama123",
    }
)

_context = CryptContext(schemes=["argon2"])

MAX_CONCURRENT_HASHES = 4
_hashing = threading.BoundedSemaphore(MAX_CONCURRENT_HASHES)


def password_problem(password: str) -> str | None:
    """Why a password may not be used, or None if it may. The one rule: the admin API, `/me/password`,
    `manage.py` and ADMIN_PASSWORD all ask it."""
    if len(password) < MIN_PASSWORD_LENGTH:
        return f"must be at least {MIN_PASSWORD_LENGTH} characters"
    if len(password) > MAX_PASSWORD_LENGTH:
        return f"must be at most {MAX_PASSWORD_LENGTH} characters"
    if password.lower() in WELL_KNOWN_PASSWORDS:
        return "is a well-known default password"
    return None


def hash_password(password: str) -> str:
    with _hashing:
        return _context.hash(password)


def verify_password(password: str, password_hash: str) -> bool:
    """A password longer than any the rule allows can't be anyone's: it is simply wrong (passlib would raise
    for it)."""
    if len(password) > MAX_PASSWORD_LENGTH:
        return False
    with _hashing:
        return _context.verify(password, password_hash)


@cache
def _dummy_hash() -> str:
    return hash_password("not a real password: only spends the time a real check would")


def spend_verification_time(password: str) -> None:
    """Do the work of a failed check, so an unknown email answers as slowly as a wrong password."""
    verify_password(password, _dummy_hash())
